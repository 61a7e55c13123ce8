"""The gateway's own cost, against the instant upstream: added latency and requests per second at each
concurrency (auth and screening on), and its memory over thousands of requests carrying 1 MB images."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import aiohttp
import psutil

from server.runtime import QUIET_S

from .load import Run, chat_request, closed_loop, merged, open_loop, side_by_side

TEXT = "Describe the attached invoice in one sentence."


@dataclass(frozen=True)
class ProxyCost:
    concurrency: int
    stream: bool
    direct: Run
    gateway: Run

    def added_ms(self, q: float) -> float:
        """How much later the whole answer came through the gateway, at the q-th percentile."""
        return (self.gateway.e2e(q) - self.direct.e2e(q)) * 1e3


async def proxy_costs(direct: aiohttp.ClientSession, gateway: aiohttp.ClientSession, headers: dict[str, str],
                      concurrencies: list[int], requests: int) -> list[ProxyCost]:
    """For each concurrency, streamed and whole, side by side."""
    costs = []
    for concurrency in concurrencies:
        for stream in (True, False):
            body = chat_request(TEXT, stream=stream, max_tokens=16)
            direct_runs, gateway_runs = await side_by_side(direct, gateway, headers, body, concurrency,
                                                           max(requests, 8 * concurrency), rounds=1, warm_up=True)
            costs.append(ProxyCost(concurrency, stream, merged(direct_runs), merged(gateway_runs)))
    return costs


@dataclass(frozen=True)
class PacedStreams:
    """Streams at a GPU's pace, arriving at random, about ``concurrency`` open at once: the gateway is not
    saturated, so what it adds is its own latency."""

    concurrency: int
    tokens: int
    interval_ms: float
    direct: Run
    gateway: Run

    def figures(self) -> dict[str, float | int]:
        d, g = self.direct, self.gateway
        return {"concurrency": self.concurrency, "tokens": self.tokens, "interval_ms": self.interval_ms,
                "requests": len(g.samples),
                "direct_ttft_p50_ms": d.ttft(50) * 1e3, "gateway_ttft_p50_ms": g.ttft(50) * 1e3,
                "added_ttft_p50_ms": (g.ttft(50) - d.ttft(50)) * 1e3,
                "direct_ttft_p99_ms": d.ttft(99) * 1e3, "gateway_ttft_p99_ms": g.ttft(99) * 1e3,
                "added_ttft_p99_ms": (g.ttft(99) - d.ttft(99)) * 1e3,
                "added_e2e_p50_ms": (g.e2e(50) - d.e2e(50)) * 1e3, "added_e2e_p99_ms": (g.e2e(99) - d.e2e(99)) * 1e3}


async def paced_streams(direct: aiohttp.ClientSession, gateway: aiohttp.ClientSession, headers: dict[str, str],
                        concurrency: int, tokens: int, interval_ms: float, requests: int) -> PacedStreams:
    """The same random arrivals (same seed) straight upstream and through the gateway, twice each, alternating."""
    body = chat_request(TEXT, stream=True, max_tokens=tokens)
    rate = concurrency / (tokens * interval_ms / 1000)  # Little's law: that many streams open on average
    runs: dict[str, list[Run]] = {"direct": [], "gateway": []}
    for turn in range(2):
        for path in (("direct", "gateway") if turn % 2 == 0 else ("gateway", "direct")):
            client, sent = (direct, {"content-type": "application/json"}) if path == "direct" else (gateway, headers)
            runs[path].append(await open_loop(client, body, sent, rate, requests, seed=turn))
    return PacedStreams(concurrency, tokens, interval_ms, merged(runs["direct"]), merged(runs["gateway"]))


class PeakRss:
    """The highest resident memory of a process while the block runs (sampled every few milliseconds)."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class MemoryUse:
    requests: int
    image_mb: float
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    in_flight: int
    peak_per_image_mb: float
    requests_per_s: float

    @property
    def growth(self) -> float:
        """RSS growth over the run, from after the warm-up (first allocations: pools, threads, buffers)."""
        return self.rss_end_mb / self.rss_warm_mb - 1


# Before each reading of the RSS: the last requests' buffers go back to the system once the gateway has seen no
# request start or finish for QUIET_S to twice that (``server.runtime.HeapTrimmer``): each reading is of it settled.
SETTLE_S = 2 * QUIET_S + 1


async def memory_use(gateway: aiohttp.ClientSession, headers: dict[str, str], pid: int, body: bytes,
                     image_mb: float, requests: int, concurrency: int = 8, in_flight: int = 32) -> MemoryUse:
    def rss_mb() -> float:
        return float(psutil.Process(pid).memory_info().rss) / 1e6

    start = rss_mb()
    await closed_loop(gateway, body, headers, concurrency, 200)
    await asyncio.sleep(SETTLE_S)
    warm = rss_mb()
    run = await closed_loop(gateway, body, headers, concurrency, requests)
    await asyncio.sleep(SETTLE_S)
    end = rss_mb()
    # Peak memory per in-flight image: many at once, against the same process settled again.
    settled = rss_mb()
    with PeakRss(pid) as peak:
        await closed_loop(gateway, body, headers, in_flight, in_flight * 4)
    per_image = (peak.peak / 1e6 - settled) / in_flight
    return MemoryUse(len(run.samples), image_mb, start, warm, end, in_flight, per_image, run.requests_per_s)


def summary(costs: list[ProxyCost]) -> list[dict[str, float | int | bool]]:
    return [{"concurrency": cost.concurrency, "stream": cost.stream,
             "direct_p50_ms": cost.direct.e2e(50) * 1e3, "direct_p99_ms": cost.direct.e2e(99) * 1e3,
             "gateway_p50_ms": cost.gateway.e2e(50) * 1e3, "gateway_p99_ms": cost.gateway.e2e(99) * 1e3,
             "added_p50_ms": cost.added_ms(50), "added_p99_ms": cost.added_ms(99),
             "direct_rps": cost.direct.requests_per_s, "gateway_rps": cost.gateway.requests_per_s}
            for cost in costs]


