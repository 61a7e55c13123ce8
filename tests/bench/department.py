"""An eight-GPU department, simulated: eight paced stand-in engine replicas behind one real `airlock gateway`, and
the same arrivals sent straight to the stand-ins, alternating.

What is simulated, and why (issue 20, Build 4): a single host with 8 GPUs serving the 8B model, each replica
holding about 64 streams at a GPU's pace (about 40 tokens a second each, one event every 25 ms: vLLM sends one
event per token by default), i.e. ~512 streams open and ~20,000 events a second through one gateway process. The
engines are ``paced_upstream.py`` (the one accepted fake: a real engine's milliseconds would drown the gateway's
microseconds, and there are no GPUs here), 8 unix sockets served by one light process. The gateway is the real
`airlock gateway`: API keys for 64 users, screening and metrics on, the default per-user limits, 8 upstreams, the
fair queue admitting twice the streams a replica is given on average (so that the random peaks of the arrivals do
not queue in the gateway while nothing queues on the direct path: what is measured is the gateway's cost, not its
admission).

Requests arrive at random (Poisson; the rate from Little's law, streams = rate x stream duration, as
``proxy_cost.paced_streams`` does), each from one of the users, with a ~1,300-character prompt (instructions and
a pasted passage), and a share carrying one scanned A4 invoice page: a JPEG at 200 dpi (1654 x 2339, about 3.9
MP, which the 8B profile's image budget of 4,194,304 pixels reads whole) at quality 85, about 0.5 MB (0.7 MB of
base64 inside the JSON), the size of a colour office scan of a printed page. Answers are 300 tokens.

``--stream-interval N`` runs the engines as vLLM's option of that name does (see ``paced_upstream.py``): the first
token's event at once, then one event every N tokens carrying their text in one delta. The tokens' pace is the
same; the events a second, which the gateway's per-chunk cost multiplies, are about N times fewer. Every chunk
figure here is per relayed event (what the load generator counts), the TTFT is the first token's event's, as with
N = 1.

Checked against the profiles, not assumed: what the gateway gives an 8B replica at once is what its KV cache holds
at 4,096 tokens a request (README, the GPU table's "at once"): 30 on an A100 40 GB, 38-43 on 48 GB cards, 93-94 on
80 GB cards. 64 lies between; ``--streams-per-replica 94`` is eight 80 GB cards.

The load generator is light per event: it reads whatever has arrived (aiohttp's ``iter_any``) and counts the token
events in it by a byte pattern, without splitting or parsing events. It, the stand-ins and the gateway each report
their CPU (psutil user + system over the steady part of each run, as % of one core), so that a run limited by the
load generator or the stand-ins, not by the gateway, shows it.

Run: ``python -m tests.bench.department`` (or ``make bench-department``); ``--streams-per-replica`` and
``--duration`` scale it. ``department(Scale(...), run.Layout.of_this_machine(), work_dir)`` is the same for
``tests/bench/run.py``: it returns a :class:`Department` (``figures()`` for results.json, ``report()`` to print).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil
import uvloop
from PIL import Image, ImageDraw, ImageFilter

from server.auth.apikeys import format_keys, new_key

from .host import core_count, cpu_model, stolen_s
from .load import MODEL, percentile, session
from .paced_upstream import event_ends
from .stacks import airlock, running

if TYPE_CHECKING:
    from .run import Layout

# The department: 8 GPUs, 64 streams each, 40 tokens/s a stream (25 ms between events).
TARGET_ADDED_TTFT_P99_MS = 5.0
TARGET_CHUNKS_PER_S = 20_000
# CPU used plus run-queue wait, % of one core, at which the gateway counts as saturated (or crowded out).
SATURATED_PERCENT = 90.0
# A virtual machine's cores are shared with other guests: the time the hypervisor runs something else on a core
# (Linux's "steal" in /proc/stat) freezes whatever this guest had on it: the gateway's event loop, the stand-ins,
# the load generator. At this share of any run's cores or above, the added p99 measures the host, not the gateway.
STOLEN_PERCENT_LIMIT = 5.0
GATEWAY_CORES, OTHER_CORES = "gateway's cores", "other cores"
# A token event's delta, and no other event's (the role event's content is empty: '"content":""').
TOKEN_MARK = b'"delta":{"content":"'
PORT = 18630
STALL_PROBE_DIR = Path(__file__).parent / "stall_probe"


@dataclass(frozen=True)
class Scale:
    """How big the department is, and how long each run lasts."""

    replicas: int = 8
    streams_per_replica: int = 64
    tokens: int = 300
    interval_ms: float = 25.0
    duration_s: float = 60.0  # of arrivals, per run
    image_share: float = 0.2  # of requests carrying one scanned page
    users: int = 64
    rounds: int = 2  # (direct, gateway) pairs, the order swapped each round
    stream_interval: int = 1  # tokens an event after the first, as vLLM's --stream-interval (1: its default)

    @property
    def streams(self) -> int:
        return self.replicas * self.streams_per_replica

    @property
    def stream_s(self) -> float:
        return self.tokens * self.interval_ms / 1000

    @property
    def rate(self) -> float:
        """Arrivals a second that keep ``streams`` open on average (Little's law)."""
        return self.streams / self.stream_s

    @property
    def events_per_stream(self) -> int:
        """Token events in one answer, as the stand-ins send them."""
        return len(event_ends(self.tokens, self.stream_interval))

    @property
    def tokens_per_s(self) -> float:
        return self.streams * 1000 / self.interval_ms

    @property
    def chunks_per_s(self) -> float:
        """Token events a second with ``streams`` open: what the gateway relays."""
        return self.tokens_per_s * self.events_per_stream / self.tokens


# -- what is sent ----------------------------------------------------------------------------------------------

PROMPT = (
    "You are the accounts-payable assistant of the finance department. Read the document or passage below and answer "
    "in plain language. Give the supplier, the invoice number, the invoice date, the due date, the net amount, the "
    "VAT and the total, and say whether the bank details match the supplier master data quoted below. If a value is "
    "missing or unreadable, say so rather than guess. Supplier master data: Nordlicht Bürobedarf GmbH, "
    "Hafenstraße 12, 20457 Hamburg, VAT ID DE812345678, IBAN DE89 3704 0044 0532 0130 00, BIC COBADEFFXXX, payment "
    "terms 30 days net, 2% discount within 10 days. Passage from the supplier's covering e-mail: 'Dear colleagues, "
    "please find attached our invoice for the office furniture and supplies delivered to your Bremen site on 12 May, "
    "as ordered under purchase order PO-2026-04417. The delivery comprised 14 height-adjustable desks, 14 task "
    "chairs, 6 mobile pedestals and assorted stationery. Two chairs were delivered damaged and have been credited "
    "in full on this invoice. Please note our new bank account, effective 1 June, shown on the invoice.' Check in "
    "particular whether the credit for the two damaged chairs appears, whether the discount applies if paid today, "
    "and whether the new bank account is a reason to hold the payment until it is confirmed by telephone."
)


def scanned_invoice(seed: int = 0) -> bytes:
    """An A4 invoice page scanned at 200 dpi: printed lines and a table on off-white paper with the grain of a
    scanner, as a colour JPEG at quality 85 (what office scanners write by default)."""
    rng = random.Random(seed)
    width, height = 1654, 2339
    page = Image.new("RGB", (width, height), (246, 244, 238))
    draw = ImageDraw.Draw(page)
    draw.rectangle((120, 120, 700, 260), outline=(40, 40, 40), width=3)
    for y in range(320, 2150, 34):
        if rng.random() < 0.15:
            continue  # a blank line between blocks
        x = 130
        while x < width - 200:
            word = rng.randint(20, 140)
            draw.rectangle((x, y, x + word, y + 14), fill=(30 + rng.randint(0, 40),) * 3)
            x += word + rng.randint(12, 22)
        if 1100 < y < 1700:  # the table's rules
            draw.line((120, y - 8, width - 120, y - 8), fill=(90, 90, 90), width=2)
    grain = Image.effect_noise((width, height), 18).convert("RGB")
    scan = Image.blend(page, grain, 0.10).filter(ImageFilter.GaussianBlur(0.6))
    out = io.BytesIO()
    scan.save(out, "JPEG", quality=85)
    return out.getvalue()


def request_body(tokens: int, image: bytes | None) -> bytes:
    content: Any = PROMPT
    if image is not None:
        url = f"data:image/jpeg;base64,{base64.b64encode(image).decode()}"
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    return json.dumps({"model": MODEL, "max_tokens": tokens, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": content}]}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Arrival:
    at_s: float  # from the start of the run
    user: int
    image: bool


def arrivals(scale: Scale, seed: int) -> list[Arrival]:
    """Poisson arrivals over ``duration_s``; the same seed gives the same arrivals, users and images."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    at = 0.0
    while True:
        at += rng.expovariate(scale.rate)
        if at >= scale.duration_s:
            return out
        out.append(Arrival(at, rng.randrange(scale.users), rng.random() < scale.image_share))


# -- one run ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    ttft_s: float
    e2e_s: float
    token_events: int
    image: bool


@dataclass
class _Live:
    open: int = 0
    token_events: int = 0
    errors: int = 0


@dataclass(frozen=True)
class PathRun:
    """One run of the arrivals along one path. The steady window starts once the first arrivals' streams could
    have ended (one stream's duration) and ends with the last arrival."""

    path: str
    samples: list[Sample]
    errors: int
    window_s: float
    window_token_events: int
    open_mean: float
    open_max: int
    cpu_percent: dict[str, float]  # process -> % of one core over the window
    wait_percent: dict[str, float]  # process -> % of the window its threads waited, runnable, for a core
    # "gateway's cores", "other cores" -> % of their time the hypervisor took, from the first arrival to the last end
    stolen_percent: dict[str, float]
    sent_token_events: int  # what the stand-ins sent over the whole run (their own count)
    wall: tuple[float, float] = (0.0, 0.0)  # time.time() at the run's first arrival and at its last stream's end
    sent_tokens: int = 0  # the tokens those events carried (their own count)

    @property
    def chunks_per_s(self) -> float:
        return self.window_token_events / self.window_s

    @property
    def counted_token_events(self) -> int:
        return sum(sample.token_events for sample in self.samples)


class Processes:
    """CPU time (user + system, psutil) of the processes in a run, and how long their threads waited, runnable,
    for a core (the kernel's run-queue wait, /proc/PID/task/*/schedstat, second field): a process that used 60% of
    its core and waited 40% was saturated or crowded out, one that used 60% and waited 2% was not. And the time the
    hypervisor took from the cores (steal, psutil's per-CPU ``steal``; 0 where the kernel does not count it): on a
    virtual machine the gateway's core can stop for milliseconds while another guest runs, which no code of ours
    causes or can shorten."""

    def __init__(self, pids: dict[str, int], cores: dict[str, set[int] | None]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.cores = cores

    def read(self) -> dict[str, tuple[float, float]]:
        """Process -> (CPU seconds, run-queue wait seconds)."""
        return {name: (_cpu(process), _waited(process.pid)) for name, process in self._processes.items()}

    def stolen(self) -> dict[str, float]:
        """Cores' name -> seconds the hypervisor has taken from them, summed over the cores."""
        return {name: stolen_s(chosen) for name, chosen in self.cores.items()}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _waited(pid: int) -> float:
    """Seconds the process's threads spent runnable but not running (Linux schedstat; 0 where it is missing)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


async def run_path(path: str, clients: list[aiohttp.ClientSession], heads: list[dict[str, str]],
                   bodies: dict[bool, bytes], scale: Scale, schedule: list[Arrival], processes: Processes,
                   stats: aiohttp.ClientSession) -> PathRun:
    """Send ``schedule`` along one path. ``clients``: one session (the gateway) or one per replica (direct: the
    least busy, ties in turn, as the gateway's least-outstanding routing does). ``heads``: headers per user."""
    live = _Live()
    per_client = [0] * len(clients)
    turn = 0
    samples: list[Sample] = []

    async def one(arrival: Arrival) -> None:
        nonlocal turn
        turn += 1
        least = min(per_client)
        tied = [index for index, count in enumerate(per_client) if count == least]
        index = tied[turn % len(tied)]
        per_client[index] += 1
        live.open += 1
        started = time.perf_counter()
        first = 0.0
        counted = 0
        try:
            async with clients[index].post("/v1/chat/completions", data=bodies[arrival.image],
                                           headers=heads[arrival.user]) as response:
                if response.status != 200:
                    live.errors += 1
                    await response.read()
                    return
                tail = b""
                async for chunk in response.content.iter_any():
                    seen = tail + chunk
                    found = seen.count(TOKEN_MARK)
                    if found:
                        if not first:
                            first = time.perf_counter()
                        counted += found
                        live.token_events += found
                    tail = seen[-(len(TOKEN_MARK) - 1):]
        except (aiohttp.ClientError, OSError):
            live.errors += 1
            return
        finally:
            per_client[index] -= 1
            live.open -= 1
        ended = time.perf_counter()
        samples.append(Sample((first or ended) - started, ended - started, counted, arrival.image))

    gc.collect()  # the previous run's garbage, before the clock starts
    events_before, tokens_before = await _sent(stats)
    start, began = time.perf_counter(), time.time()
    stolen_from = processes.stolen()  # over every TTFT of the run, not only the steady window's
    window: dict[str, Any] = {}
    opens: list[int] = []

    async def watch() -> None:
        """The steady window: CPU and token events at its two ends, streams open sampled every 100 ms."""
        await asyncio.sleep(min(scale.stream_s, scale.duration_s / 2))
        window["start"] = (time.perf_counter(), live.token_events, processes.read())
        while time.perf_counter() - start < scale.duration_s:
            opens.append(live.open)
            await asyncio.sleep(0.1)
        window["end"] = (time.perf_counter(), live.token_events, processes.read())

    watcher = asyncio.create_task(watch())
    tasks = []
    # No garbage collection in the load generator while it times streams: with ~500 streams open its collections
    # took up to 68 ms of CPU (gen 2) and 16 ms (gen 1) (gc.callbacks, `--duration 30`), and every stream whose
    # first token arrived meanwhile had that added to its TTFT, along either path: the p99s of both, and the
    # difference of the two, were largely the load generator's pauses. What is left is collected at the next run.
    gc.disable()
    try:
        for arrival in schedule:
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            tasks.append(asyncio.create_task(one(arrival)))
        await watcher
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    stolen_to, ended = processes.stolen(), time.perf_counter()
    events_after, tokens_after = await _sent(stats)
    (t0, events0, cpu0), (t1, events1, cpu1) = window["start"], window["end"]
    cpu = {name: (cpu1[name][0] - cpu0[name][0]) / (t1 - t0) * 100 for name in cpu0}
    wait = {name: (cpu1[name][1] - cpu0[name][1]) / (t1 - t0) * 100 for name in cpu0}
    stolen = {name: (stolen_to[name] - stolen_from[name]) / (ended - start) / core_count(processes.cores[name]) * 100
              for name in stolen_from}
    return PathRun(path, samples, live.errors, t1 - t0, events1 - events0, sum(opens) / max(1, len(opens)),
                   max(opens, default=0), cpu, wait, stolen, events_after - events_before, (began, time.time()),
                   tokens_after - tokens_before)


async def _sent(stats: aiohttp.ClientSession) -> tuple[int, int]:
    """The stand-ins' token events and tokens sent so far."""
    async with stats.get("/stats") as response:
        counts = json.loads(await response.read())
    return int(counts["token_events"]), int(counts["tokens"])


# -- the result ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Department:
    scale: Scale
    layout: str
    image_kb: float
    direct: list[PathRun] = field(default_factory=list)
    gateway: list[PathRun] = field(default_factory=list)

    @staticmethod
    def _pct(runs: list[PathRun], what: str, q: float, image: bool | None = None) -> float:
        values = [getattr(sample, what) for run in runs for sample in run.samples
                  if image is None or sample.image == image]
        return percentile(values, q) * 1e3 if values else float("nan")

    def added_ms(self, what: str, q: float, image: bool | None = None) -> float:
        """Gateway minus direct at the same percentile, ms."""
        return self._pct(self.gateway, what, q, image) - self._pct(self.direct, what, q, image)

    def quiet_rounds(self) -> list[int]:
        """The rounds in which the hypervisor took less than STOLEN_PERCENT_LIMIT of every core, along both paths."""
        return [index for index, (d, g) in enumerate(zip(self.direct, self.gateway, strict=True))
                if max(*d.stolen_percent.values(), *g.stolen_percent.values()) < STOLEN_PERCENT_LIMIT]

    def added_quiet_ms(self, q: float, image: bool | None = None) -> float:
        """``added_ms`` of the TTFT over the quiet rounds only (nan if there were none)."""
        rounds = self.quiet_rounds()
        gateway = [self.gateway[index] for index in rounds]
        direct = [self.direct[index] for index in rounds]
        return self._pct(gateway, "ttft_s", q, image) - self._pct(direct, "ttft_s", q, image)

    def figures(self) -> dict[str, Any]:
        """Every figure of the run, flat (what run.py writes to results.json and what is printed)."""
        s = self.scale

        def mean(runs: list[PathRun], get: Callable[[PathRun], float]) -> float:
            return sum(get(run) for run in runs) / len(runs)

        gateway_cpu = mean(self.gateway, lambda run: run.cpu_percent["gateway"])
        chunks = mean(self.gateway, lambda run: run.chunks_per_s)
        per_chunk_us = gateway_cpu / 100 / chunks * 1e6 if chunks else float("nan")
        figures: dict[str, Any] = {
            "replicas": s.replicas, "streams_per_replica": s.streams_per_replica, "tokens": s.tokens,
            "interval_ms": s.interval_ms, "stream_interval": s.stream_interval,
            "events_per_stream": s.events_per_stream, "duration_s": s.duration_s, "rounds": s.rounds,
            "arrivals_per_s": s.rate, "image_share": s.image_share, "image_kb": self.image_kb, "users": s.users,
            "layout": self.layout, "processor": cpu_model(),
            "requests_direct": sum(len(run.samples) for run in self.direct),
            "requests_gateway": sum(len(run.samples) for run in self.gateway),
            "errors_direct": sum(run.errors for run in self.direct),
            "errors_gateway": sum(run.errors for run in self.gateway),
        }
        for q in (50, 99):
            for what, name in (("ttft_s", "ttft"), ("e2e_s", "e2e")):
                figures[f"direct_{name}_p{q}_ms"] = self._pct(self.direct, what, q)
                figures[f"gateway_{name}_p{q}_ms"] = self._pct(self.gateway, what, q)
                figures[f"added_{name}_p{q}_ms"] = self.added_ms(what, q)
            figures[f"added_ttft_p{q}_ms_text"] = self.added_ms("ttft_s", q, image=False)
            figures[f"added_ttft_p{q}_ms_image"] = self.added_ms("ttft_s", q, image=True)
        for path, runs in (("direct", self.direct), ("gateway", self.gateway)):
            figures[f"{path}_streams_open_mean"] = mean(runs, lambda run: run.open_mean)
            figures[f"{path}_streams_open_max"] = max(run.open_max for run in runs)
            figures[f"{path}_chunks_per_s"] = mean(runs, lambda run: run.chunks_per_s)
            figures[f"{path}_standins_cpu_percent"] = mean(runs, lambda run: run.cpu_percent["stand-ins"])
            figures[f"{path}_load_cpu_percent"] = mean(runs, lambda run: run.cpu_percent["load generator"])
            figures[f"{path}_token_events_sent"] = sum(run.sent_token_events for run in runs)
            figures[f"{path}_token_events_counted"] = sum(run.counted_token_events for run in runs)
            figures[f"{path}_tokens_sent"] = sum(run.sent_tokens for run in runs)
        figures["gateway_cpu_percent"] = gateway_cpu
        # Round by round (the same arrivals along both paths in each): a machine shared with other work crowds
        # the gateway out in some rounds and not others, and the merged percentiles hide which.
        figures["by_round"] = [{
            "added_ttft_p50_ms": (percentile([x.ttft_s for x in g.samples], 50)
                                  - percentile([x.ttft_s for x in d.samples], 50)) * 1e3,
            "added_ttft_p99_ms": (percentile([x.ttft_s for x in g.samples], 99)
                                  - percentile([x.ttft_s for x in d.samples], 99)) * 1e3,
            "added_e2e_p99_ms": (percentile([x.e2e_s for x in g.samples], 99)
                                 - percentile([x.e2e_s for x in d.samples], 99)) * 1e3,
            "gateway_cpu_percent": g.cpu_percent["gateway"], "gateway_wait_percent": g.wait_percent["gateway"],
            "gateway_chunks_per_s": g.chunks_per_s, "gateway_streams_open_mean": g.open_mean,
            "gateway_us_per_chunk": g.cpu_percent["gateway"] / 100 / g.chunks_per_s * 1e6,
            "gateway_cores_stolen_percent": g.stolen_percent[GATEWAY_CORES],
        } for d, g in zip(self.direct, self.gateway, strict=True)]
        figures["gateway_cpu_by_round"] = [run.cpu_percent["gateway"] for run in self.gateway]
        figures["gateway_wait_percent"] = mean(self.gateway, lambda run: run.wait_percent["gateway"])
        for path, runs in (("direct", self.direct), ("gateway", self.gateway)):
            figures[f"{path}_standins_wait_percent"] = mean(runs, lambda run: run.wait_percent["stand-ins"])
            figures[f"{path}_load_wait_percent"] = mean(runs, lambda run: run.wait_percent["load generator"])
            for cores, key in ((GATEWAY_CORES, "gateway_cores"), (OTHER_CORES, "other_cores")):
                figures[f"{path}_{key}_stolen_percent"] = sum(run.stolen_percent[cores] for run in runs) / len(runs)
        figures["gateway_us_per_chunk"] = per_chunk_us
        # Extrapolated, not measured: the gateway's CPU per chunk here (its per-request cost included) times the
        # issue's 20,000 chunks a second.
        figures["gateway_cores_at_20k_extrapolated"] = per_chunk_us * TARGET_CHUNKS_PER_S / 1e6
        # The same department's tokens (20,000 a second) at this run's stream interval: fewer events, each costing
        # what one did here (equal to the figure above at one token an event).
        figures["gateway_cores_at_20k_tokens_extrapolated"] = (
            per_chunk_us * TARGET_CHUNKS_PER_S * s.events_per_stream / s.tokens / 1e6)
        # Below saturation: the gateway neither used nearly all of its core nor waited long for it.
        figures["gateway_below_saturation"] = gateway_cpu + figures["gateway_wait_percent"] < SATURATED_PERCENT
        figures["target_met"] = (figures["added_ttft_p99_ms"] <= TARGET_ADDED_TTFT_P99_MS
                                 and figures["gateway_below_saturation"])
        # The host's share: every core had (nearly) all of every run to itself. The added p99 is one path's p99
        # minus the other's, so the load generator stalled in a direct run skews it as much as the gateway stalled.
        figures["most_stolen_percent"] = max(value for run in [*self.direct, *self.gateway]
                                             for value in run.stolen_percent.values())
        figures["quiet_rounds"] = self.quiet_rounds()
        figures["host_quiet"] = len(figures["quiet_rounds"]) == len(self.gateway)
        for q in (50, 99):
            figures[f"added_ttft_p{q}_ms_quiet_rounds"] = self.added_quiet_ms(q)
            figures[f"added_ttft_p{q}_ms_text_quiet_rounds"] = self.added_quiet_ms(q, image=False)
            figures[f"added_ttft_p{q}_ms_image_quiet_rounds"] = self.added_quiet_ms(q, image=True)
        return figures


def report(result: Department) -> str:
    f = result.figures()
    s = result.scale
    lines = [
        f"\nA department of {s.replicas} GPUs, simulated: {s.replicas} paced stand-in replicas (tests/bench/"
        f"paced_upstream.py, the one accepted fake), {s.streams_per_replica} streams each on average "
        f"({s.streams} in all), {s.tokens} tokens {s.interval_ms:g} ms apart"
        + (f", {s.stream_interval} tokens an event after the first (vLLM --stream-interval {s.stream_interval})"
           if s.stream_interval > 1 else "")
        + f", {f['arrivals_per_s']:.1f} "
        f"arrivals/s (Poisson), {s.image_share:.0%} with a {f['image_kb']:.0f} KB scanned page, {s.users} users; "
        f"{s.rounds} rounds of {s.duration_s:g} s of arrivals per path, alternating",
        f"layout: {f['layout']}; processor: {f['processor']}",
        f"requests: direct {f['requests_direct']} ({f['errors_direct']} failed), through the gateway "
        f"{f['requests_gateway']} ({f['errors_gateway']} failed)",
        "",
        f"{'':28}{'direct':>10}{'gateway':>10}{'added':>10}",
    ]
    for name, label in (("ttft_p50", "TTFT p50, ms"), ("ttft_p99", "TTFT p99, ms"), ("e2e_p50", "e2e p50, ms"),
                        ("e2e_p99", "e2e p99, ms")):
        lines.append(f"{label:28}{f[f'direct_{name}_ms']:>10.2f}{f[f'gateway_{name}_ms']:>10.2f}"
                     f"{f[f'added_{name}_ms']:>10.2f}")
    lines += [
        f"{'added TTFT p50/p99, text only':28}{'':20}{f['added_ttft_p50_ms_text']:>6.2f} / "
        f"{f['added_ttft_p99_ms_text']:.2f}",
        f"{'added TTFT p50/p99, image':28}{'':20}{f['added_ttft_p50_ms_image']:>6.2f} / "
        f"{f['added_ttft_p99_ms_image']:.2f}",
        f"{'streams open (mean / max)':28}{f['direct_streams_open_mean']:>6.0f} /{f['direct_streams_open_max']:>3}"
        f"{f['gateway_streams_open_mean']:>6.0f} /{f['gateway_streams_open_max']:>3}",
        f"{'chunks (events) per second':28}{f['direct_chunks_per_s']:>10.0f}{f['gateway_chunks_per_s']:>10.0f}"
        f"   (expected: events/s here {s.chunks_per_s:,.0f} (tokens/s {s.tokens_per_s:,.0f}), the issue's "
        f"department {TARGET_CHUNKS_PER_S:,} events/s at one token an event)",
        f"{'token events sent / counted':28}{f['direct_token_events_sent']:>10}{f['gateway_token_events_sent']:>10}"
        f"   counted {f['direct_token_events_counted']} / {f['gateway_token_events_counted']}"
        f" (tokens sent {f['direct_tokens_sent']} / {f['gateway_tokens_sent']})",
        f"{'CPU, % of one core':28}   (in brackets: % of the time it waited, runnable, for a core)",
        f"{'  gateway':28}{'-':>10}{f['gateway_cpu_percent']:>10.1f} ({f['gateway_wait_percent']:.0f})   by round: "
        + ", ".join(f"{value:.1f}" for value in f["gateway_cpu_by_round"]),
        f"{'  stand-ins (one process)':28}{f['direct_standins_cpu_percent']:>10.1f}"
        f"{f['gateway_standins_cpu_percent']:>10.1f}   ({f['direct_standins_wait_percent']:.0f} / "
        f"{f['gateway_standins_wait_percent']:.0f})",
        f"{'  load generator':28}{f['direct_load_cpu_percent']:>10.1f}{f['gateway_load_cpu_percent']:>10.1f}"
        f"   ({f['direct_load_wait_percent']:.0f} / {f['gateway_load_wait_percent']:.0f})",
        f"{'taken by the hypervisor, %':28}   (steal: of the cores' time, while another guest ran on them)",
        "  the gateway's cores".ljust(28) + f"{f['direct_gateway_cores_stolen_percent']:>10.1f}"
        f"{f['gateway_gateway_cores_stolen_percent']:>10.1f}",
        f"{'  the other cores':28}{f['direct_other_cores_stolen_percent']:>10.1f}"
        f"{f['gateway_other_cores_stolen_percent']:>10.1f}",
        "by round (gateway against direct, the same arrivals): "
        + "; ".join(f"{index}: added TTFT p50 {r['added_ttft_p50_ms']:.2f} / p99 {r['added_ttft_p99_ms']:.2f} ms, "
                    f"gateway {r['gateway_cpu_percent']:.0f}% CPU ({r['gateway_wait_percent']:.0f}% waited), "
                    f"{r['gateway_chunks_per_s']:,.0f} chunks/s, {r['gateway_us_per_chunk']:.1f} us a chunk, "
                    f"{r['gateway_cores_stolen_percent']:.0f}% of its core taken by the hypervisor"
                    for index, r in enumerate(f["by_round"])),
        f"gateway CPU per relayed chunk (event; its requests' cost included): {f['gateway_us_per_chunk']:.1f} us; "
        # With several tokens an event, the cost of an event holds the requests' work over fewer events: scaled to
        # one event a token it would overstate that rate's cost, so only the same events' rate is extrapolated.
        + (f"at {TARGET_CHUNKS_PER_S:,} tokens/s in events of {s.stream_interval} tokens that would be "
           f"{f['gateway_cores_at_20k_tokens_extrapolated']:.2f} cores" if s.stream_interval > 1 else
           f"at {TARGET_CHUNKS_PER_S:,} chunks/s that would be {f['gateway_cores_at_20k_extrapolated']:.2f} cores")
        + " (EXTRAPOLATED, not measured)",
        f"target: added TTFT p99 <= {TARGET_ADDED_TTFT_P99_MS:g} ms with the gateway below saturation (CPU + "
        f"wait < {SATURATED_PERCENT:g}% of its core): {f['added_ttft_p99_ms']:.2f} ms at "
        f"{f['gateway_cpu_percent']:.0f}% + {f['gateway_wait_percent']:.0f}%: "
        f"{'met' if f['target_met'] else 'MISSED'}"
        + ("" if f["host_quiet"] else
           f" (the hypervisor took up to {f['most_stolen_percent']:.0f}% of a core in a run, over "
           f"{STOLEN_PERCENT_LIMIT:g}%: what ran there stood still meanwhile, and the p99 holds those stalls)"),
    ]
    quiet = f["quiet_rounds"]
    if not f["host_quiet"]:
        lines.append(
            f"rounds in which the hypervisor took under {STOLEN_PERCENT_LIMIT:g}% of every core along both paths: "
            f"{len(quiet)} of {s.rounds}" + (
                f" ({', '.join(map(str, quiet))}): added TTFT p50 {f['added_ttft_p50_ms_quiet_rounds']:.2f} / p99 "
                f"{f['added_ttft_p99_ms_quiet_rounds']:.2f} ms (text {f['added_ttft_p50_ms_text_quiet_rounds']:.2f}"
                f" / {f['added_ttft_p99_ms_text_quiet_rounds']:.2f}, image "
                f"{f['added_ttft_p50_ms_image_quiet_rounds']:.2f} / {f['added_ttft_p99_ms_image_quiet_rounds']:.2f})"
                if quiet else ""))
    return "\n".join(lines)


def stall_report(probe: dict[str, Any], windows: list[tuple[float, float]]) -> str:
    """What the gateway's loop probe saw while it served the gateway runs (``windows``: their wall-clock spans):
    loop iterations that held the loop 10 ms or more (with the share of that time its thread was on a core; a beat
    is noted when it runs, so an iteration is counted by when it began), and garbage collections by generation
    (their CPU time). Start-up, and the idle time while the direct runs go, are left out."""
    def serving(began: float) -> bool:
        return any(start <= began <= end for start, end in windows)

    late = [(held, used) for at, held, used in probe["late"] if held >= 0.010 and serving(at - held)]
    held = sum(h for h, _ in late)
    lines = [f"gateway loop (stall probe): {probe['beats']} beats; {len(late)} iterations held it >= 10 ms "
             f"({sum(1 for h, _ in late if h >= 0.020)} >= 20 ms, {sum(1 for h, _ in late if h >= 0.050)} >= 50 ms, "
             f"{held:.2f} s in all, its thread on a core {sum(u for _, u in late) / held if held else 0:.0%} of that)"]
    collections = [entry for entry in probe["gc"] if entry[0] >= probe["settled"] and serving(entry[0] - entry[2])]
    for generation in (0, 1, 2):
        cpu_ms = sorted(entry[3] * 1e3 for entry in collections if entry[1] == generation)
        if cpu_ms:
            lines.append(f"  garbage collections of generation {generation} while serving: {len(cpu_ms)}, CPU ms "
                         f"median {cpu_ms[len(cpu_ms) // 2]:.1f}, max {cpu_ms[-1]:.1f}, {sum(cpu_ms):.0f} in all, "
                         f"{sum(1 for ms in cpu_ms if ms >= 5)} of >= 5 ms")
    return "\n".join(lines)


# -- the stack -------------------------------------------------------------------------------------------------

def _keys(keys_file: Path, users: int) -> list[dict[str, str]]:
    """An API key per user, in the file format `airlock keys create` writes (made in process: 64 CLI runs
    would take a minute)."""
    entries, heads = {}, []
    for number in range(users):
        key, entry = new_key(f"user-{number}", "bench", None)
        entries[entry.id] = entry
        heads.append({"authorization": f"Bearer {key}", "content-type": "application/json"})
    keys_file.write_text(format_keys(entries))
    keys_file.chmod(0o600)
    return heads


async def _measure(scale: Scale, layout: Layout, port: int, gateway_pid: int, standins_pid: int,
                   sockets: list[Path], heads: list[dict[str, str]], image: bytes) -> Department:
    bodies = {False: request_body(scale.tokens, None), True: request_body(scale.tokens, image)}
    plain = [{"content-type": "application/json"}] * scale.users
    connections = 4 * scale.streams + 64  # Poisson peaks, and connections closing while others open
    direct = [session("http://localhost", uds=str(path), connections=connections) for path in sockets]
    through = session(f"http://127.0.0.1:{port}", connections=connections)
    stats = session("http://localhost", uds=str(sockets[0]), connections=4)
    result = Department(scale, layout.describe(), len(image) / 1e3)
    pids = {"gateway": gateway_pid, "stand-ins": standins_pid, "load generator": os.getpid()}
    try:
        processes = Processes(pids, {GATEWAY_CORES: layout.measured, OTHER_CORES: layout.others})
        for turn in range(scale.rounds):
            schedule = arrivals(scale, seed=turn)
            for path in (("direct", "gateway") if turn % 2 == 0 else ("gateway", "direct")):
                if path == "direct":
                    run = await run_path(path, direct, plain, bodies, scale, schedule, processes, stats)
                    result.direct.append(run)
                else:
                    run = await run_path(path, [through], heads, bodies, scale, schedule, processes, stats)
                    result.gateway.append(run)
                print(f"  round {turn} {path}: {len(run.samples)} streams, {run.errors} failed, "
                      f"{run.chunks_per_s:,.0f} chunks/s, CPU % (waited %): " +
                      ", ".join(f"{name} {value:.0f} ({run.wait_percent[name]:.0f})"
                                for name, value in run.cpu_percent.items()) + "; taken by the hypervisor: " +
                      ", ".join(f"{name} {value:.0f}%" for name, value in run.stolen_percent.items()), flush=True)
    finally:
        for client in [*direct, through, stats]:
            await client.close()
        await asyncio.sleep(0.1)  # the transports' close callbacks run before the loop ends
    return result


def department(scale: Scale, layout: Layout, work: Path, port: int = PORT,
               stall_probe: Path | None = None) -> Department:
    """Start the stand-ins and `airlock gateway` under ``work``, run the rounds, stop them. Pinned as
    ``layout`` says: the gateway on the measured cores, the stand-ins and this process (the load generator) on the
    others. Runs its own event loop (uvloop, as the gateway does): call it outside one. ``stall_probe``: where the
    gateway's loop probe (``stall_probe/sitecustomize.py``) writes what it saw; None runs the gateway as it is."""
    work.mkdir(parents=True, exist_ok=True)
    sockets = [work / f"replica-{index}.sock" for index in range(scale.replicas)]
    keys_file = work / "department-keys.json"
    heads = _keys(keys_file, scale.users)
    settings = {
        "auth": {"api_keys_file": str(keys_file)},
        "upstreams": [{"url": f"unix:{path}"} for path in sockets],
        "admission": {"max_in_flight_per_replica": max(64, 2 * scale.streams_per_replica), "max_queued": 4096},
    }
    standins = [sys.executable, "-m", "tests.bench.paced_upstream", "--tokens", str(scale.tokens),
                "--interval-ms", str(scale.interval_ms), "--stream-interval", str(scale.stream_interval),
                *[arg for path in sockets for arg in ("--uds", str(path))]]
    image = scanned_invoice()
    cores = os.sched_getaffinity(0)
    if layout.others is not None:
        os.sched_setaffinity(0, layout.others)
    try:
        return _run(scale, layout, work, port, standins, settings, sockets, heads, image, stall_probe)
    finally:
        os.sched_setaffinity(0, cores)


def _run(scale: Scale, layout: Layout, work: Path, port: int, standins: list[str], settings: dict[str, Any],
         sockets: list[Path], heads: list[dict[str, str]], image: bytes, stall_probe: Path | None) -> Department:
    probe = None if stall_probe is None else {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(STALL_PROBE_DIR), os.environ.get("PYTHONPATH")])),
        "BENCH_STALL_PROBE": str(stall_probe.resolve())}
    # The stand-ins open their sockets in order: the last one accepting means all do.
    with running(standins, work / "standins.log", "http://localhost/stats", timeout_s=60, ready_uds=sockets[-1],
                 cpus=layout.others) as upstream, \
            airlock("gateway", work / "gateway", port, settings, cpus=layout.measured, env=probe) as gateway:
        return uvloop.run(_measure(scale, layout, port, gateway.pid, upstream.pid, sockets, heads,
                                   image))


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and every option's default."""


def main() -> int:
    from .run import Layout  # here, not at the top: run.py imports this module

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    default = Scale()
    parser.add_argument("--replicas", type=int, default=default.replicas, help="stand-in engines (GPUs)")
    parser.add_argument("--streams-per-replica", type=int, default=default.streams_per_replica,
                        help="streams open on each, on average")
    parser.add_argument("--tokens", type=int, default=default.tokens, help="tokens in each answer")
    parser.add_argument("--interval-ms", type=float, default=default.interval_ms, help="between a stream's tokens")
    parser.add_argument("--stream-interval", type=int, default=default.stream_interval,
                        help="tokens an event after the first, as vLLM's --stream-interval (1: one event a token)")
    parser.add_argument("--duration", type=float, default=default.duration_s,
                        help="seconds of arrivals per run (longer than one stream, tokens x interval, to reach the "
                             "load)")
    parser.add_argument("--image-share", type=float, default=default.image_share,
                        help="of requests carrying the scanned page")
    parser.add_argument("--users", type=int, default=default.users, help="API keys the requests are spread over")
    parser.add_argument("--rounds", type=int, default=default.rounds, help="direct and gateway runs, alternating")
    parser.add_argument("--port", type=int, default=PORT,
                        help="the gateway's port (another run on this machine at the same time needs another one)")
    parser.add_argument("--stall-probe", type=Path, metavar="JSON",
                        help="probe the gateway's event loop (late iterations, garbage collections) into this file")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--logs", type=Path,
                        help="keep the processes' logs and configs here (without it: a scratch directory, deleted)")
    args = parser.parse_args()
    scale = Scale(args.replicas, args.streams_per_replica, args.tokens, args.interval_ms, args.duration,
                  args.image_share, args.users, args.rounds, args.stream_interval)
    if scale.tokens < 1 or scale.stream_interval < 1:
        parser.error("--tokens and --stream-interval must be at least 1")
    for wanted in (args.stall_probe, args.json):
        if wanted is not None and not wanted.resolve().parent.is_dir():
            parser.error(f"{wanted.parent} is not a directory")
    if scale.duration_s <= scale.stream_s:
        print(f"warning: {scale.duration_s:g} s of arrivals is no longer than one stream ({scale.stream_s:g} s): the "
              f"run never reaches its load, and its per-chunk figures are not the department's", flush=True)
    layout = Layout.of_this_machine()
    print(f"layout: {layout.describe()}; processor: {cpu_model()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as scratch:
        result = department(scale, layout, args.logs or Path(scratch), args.port, args.stall_probe)
    print(report(result))
    if args.stall_probe:
        print(stall_report(json.loads(args.stall_probe.read_text()), [run.wall for run in result.gateway]))
    if args.json:
        args.json.write_text(json.dumps(result.figures(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
