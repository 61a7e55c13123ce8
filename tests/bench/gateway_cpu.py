"""The gateway's CPU per streamed chunk and per request, read from the kernel's account of its process.

Method: the real ``airlock gateway`` (API keys, screening and metrics on; ``run.behind_gateway``), pinned to the
measured core as ``run.Layout`` does, in front of ``instant_upstream`` (the one fake: a real engine's milliseconds
would drown the gateway's microseconds), paced with ``--interval-ms`` so that each token event arrives as a read of
its own, as at a GPU's pace. Requests arrive at random (an open loop, ``load.open_loop``) at a rate well below what
the gateway can serve, so what is measured is the work, not queueing. The gateway process's CPU time (user and
system, so its system calls count too: ``psutil.Process.cpu_times``, in 10 ms ticks) is read before and after each
block of requests, and the CPU it spends idle over the same time (health checks, timers; measured first) is
subtracted.

Two answer lengths, ``short`` and ``long`` tokens, and whole answers, same request count and rate, take turns in
blocks of 50 requests, in a rotating order (the CPU is shared here, and what else runs changes within seconds: it
then falls on every kind alike; whole runs of each kind one after the other gave per-chunk figures from 1 to 23 us
for the same code). For each round, ``cpu = requests * (per_request + tokens * per_chunk)`` for both lengths gives

    per_chunk   = (cpu_long - cpu_short) / (requests * (long - short))
    per_request = cpu_short / requests - short * per_chunk

(``per_request`` holds everything a stream costs besides its token events: the request itself, the role, finish and
usage events and ``[DONE]``). Whole (non-streamed) requests are measured the same way, CPU over requests. The
figures are the median of the rounds.

Run: ``python -m tests.bench.gateway_cpu [--rounds 3] [--requests 400] [--rate 40] [--shared-limits]`` (about 2
minutes; ``--shared-limits``: users' limits counted by a real ``airlock limits-server``, one round trip a request). To
compare two versions of the gateway on a shared machine, run two at once (``--port``), one from each checkout: both
gateways then share the measured core and whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from .host import core_count, cpu_model, stolen_s
from .load import chat_request, closed_loop, open_loop
from .stacks import AIRLOCK, NO_USER_LIMITS, ROOT, py_spy, stop

TEXT = "Describe the attached invoice in one sentence."
# The targets on this machine (issue 20): what one core must relay for an eight-GPU department.
TARGET_PER_CHUNK_US, TARGET_PER_REQUEST_US = 20.0, 250.0
SHORT_TOKENS, LONG_TOKENS, INTERVAL_MS = 8, 128, 2.0
SATURATED_CONCURRENCY = 32
IDLE_S = 5.0  # psutil reads the kernel's ticks: 10 ms each


def cpu_s(pid: int) -> tuple[float, float]:
    """User and system (the kernel's work for it: system calls, the loopback network) CPU time of the process."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system, times.system


@dataclass(frozen=True)
class CpuRun:
    """One run: ``requests`` answers of ``tokens`` tokens (0: whole, not streamed), and the gateway's CPU for them
    (its idle share over the run's wall time already taken out)."""

    tokens: int
    stream: bool
    requests: int
    wall_s: float
    cpu_s: float
    system_s: float  # of cpu_s, in the kernel

    @property
    def per_request_us(self) -> float:
        return self.cpu_s / self.requests * 1e6


@dataclass(frozen=True)
class GatewayCpu:
    """The rounds of a measurement (see the module docstring) and the figures solved from them."""

    short_tokens: int
    long_tokens: int
    interval_ms: float
    rate: float
    idle_cpu_per_s: float
    rounds: list[tuple[CpuRun, CpuRun, CpuRun]] = field(default_factory=list)  # short, long, whole
    # Whole requests sent faster than the gateway serves them (a closed loop of SATURATED_CONCURRENCY clients): CPU
    # over requests, the method of the README's earlier per-request figures (0.5 ms), by round.
    saturated_whole_us: list[float] = field(default_factory=list)
    # The share of the gateway's cores' time the hypervisor took over each round, its saturated part included
    # (host.py): while it took much, the gateway stood still, and its figures hold what the host did.
    stolen_percent: list[float] = field(default_factory=list)

    def _per_chunk_us(self, short: CpuRun, long: CpuRun) -> float:
        return (long.cpu_s - short.cpu_s) / (short.requests * (long.tokens - short.tokens)) * 1e6

    def system_per_chunk_by_round(self) -> list[float]:
        """The kernel's part of the cost per chunk."""
        return [(long.system_s - short.system_s) / (short.requests * (long.tokens - short.tokens)) * 1e6
                for short, long, _ in self.rounds]

    def per_chunk_by_round(self) -> list[float]:
        return [self._per_chunk_us(short, long) for short, long, _ in self.rounds]

    def per_request_by_round(self) -> list[float]:
        return [short.per_request_us - short.tokens * self._per_chunk_us(short, long)
                for short, long, _ in self.rounds]

    def whole_by_round(self) -> list[float]:
        return [whole.per_request_us for _, _, whole in self.rounds]

    def figures(self) -> dict[str, float | int | list[float]]:
        chunk, request, whole = self.per_chunk_by_round(), self.per_request_by_round(), self.whole_by_round()
        return {"short_tokens": self.short_tokens, "long_tokens": self.long_tokens, "interval_ms": self.interval_ms,
                "rate_per_s": self.rate, "requests_per_kind": self.rounds[0][0].requests, "rounds": len(self.rounds),
                "idle_cpu_per_s_ms": self.idle_cpu_per_s * 1e3,
                "per_chunk_us": statistics.median(chunk),
                "system_per_chunk_us": statistics.median(self.system_per_chunk_by_round()),
                "per_request_us": statistics.median(request),
                "whole_per_request_us": statistics.median(whole),
                "per_chunk_us_by_round": [round(value, 1) for value in chunk],
                "per_request_us_by_round": [round(value, 1) for value in request],
                "whole_per_request_us_by_round": [round(value, 1) for value in whole],
                "saturated_whole_per_request_us": statistics.median(self.saturated_whole_us),
                "saturated_whole_per_request_us_by_round": [round(value, 1) for value in self.saturated_whole_us],
                "stolen_percent_by_round": [round(value, 1) for value in self.stolen_percent],
                "target_per_chunk_us": TARGET_PER_CHUNK_US, "target_per_request_us": TARGET_PER_REQUEST_US}

    def report(self) -> str:
        f = self.figures()
        chunk_met = "met" if f["per_chunk_us"] <= TARGET_PER_CHUNK_US else "MISSED"  # type: ignore[operator]
        request_met = "met" if f["per_request_us"] <= TARGET_PER_REQUEST_US else "MISSED"  # type: ignore[operator]
        saturated = f["saturated_whole_per_request_us"]
        saturated_met = "met" if saturated <= TARGET_PER_REQUEST_US else "MISSED"  # type: ignore[operator]
        return (f"gateway CPU on {cpu_model()} ({f['rounds']} rounds of {f['requests_per_kind']} requests of each "
                f"kind, {self.rate:g}/s, {self.short_tokens} and {self.long_tokens} tokens {self.interval_ms:g} ms "
                "apart; "
                f"idle {f['idle_cpu_per_s_ms']:.1f} ms/s taken out):\n"
                f"  per streamed chunk  {f['per_chunk_us']:7.1f} us (target <= {TARGET_PER_CHUNK_US:g}): {chunk_met}"
                f"   by round {f['per_chunk_us_by_round']}; in the kernel {f['system_per_chunk_us']:.1f} us\n"
                f"  per streamed request{f['per_request_us']:7.1f} us (target <= {TARGET_PER_REQUEST_US:g}): "
                f"{request_met}   by round {f['per_request_us_by_round']}\n"
                f"  per whole request   {f['whole_per_request_us']:7.1f} us"
                f"   by round {f['whole_per_request_us_by_round']}\n"
                f"  per whole request, saturated ({SATURATED_CONCURRENCY} clients in a closed loop: the README's "
                f"earlier method) {f['saturated_whole_per_request_us']:.1f} us (target <= "
                f"{TARGET_PER_REQUEST_US:g}): {saturated_met}   by round "
                f"{f['saturated_whole_per_request_us_by_round']}\n"
                f"  taken by the hypervisor from the gateway's core (steal), % by round: "
                f"{f['stolen_percent_by_round']}")


def upstream_args(long_tokens: int = LONG_TOKENS, interval_ms: float = INTERVAL_MS) -> list[str]:
    """What ``instant_upstream`` needs for ``gateway_cpu`` (``run.behind_gateway``'s ``upstream_args``)."""
    return ["--tokens", str(long_tokens), "--interval-ms", str(interval_ms), "--tokens-from-request"]


async def gateway_cpu(gateway: aiohttp.ClientSession, headers: dict[str, str], pid: int, *, rounds: int = 3,
                      requests: int = 400, rate: float = 40.0, short_tokens: int = SHORT_TOKENS,
                      long_tokens: int = LONG_TOKENS, interval_ms: float = INTERVAL_MS,
                      block: int = 50) -> GatewayCpu:
    """Measure the gateway process ``pid`` behind ``gateway`` (with ``headers``: its credentials). Its upstream must
    be ``instant_upstream --tokens-from-request --tokens LONG --interval-ms MS`` (answers of ``max_tokens``
    tokens)."""
    warm = chat_request(TEXT, stream=True, max_tokens=short_tokens)
    await open_loop(gateway, warm, headers, rate, max(20, requests // 10), seed=99)  # connections, caches
    await asyncio.sleep(0.5)
    idle_start, idle_wall = cpu_s(pid)[0], time.perf_counter()
    await asyncio.sleep(IDLE_S)
    idle_per_s = (cpu_s(pid)[0] - idle_start) / (time.perf_counter() - idle_wall)

    kinds = [(short_tokens, True), (long_tokens, True), (short_tokens, False)]
    result = GatewayCpu(short_tokens, long_tokens, interval_ms, rate, idle_per_s)
    cores = set(psutil.Process(pid).cpu_affinity() or ()) or None
    for turn in range(rounds):
        stolen_before, round_wall = stolen_s(cores), time.perf_counter()
        used = {kind: 0.0 for kind in kinds}
        system = {kind: 0.0 for kind in kinds}
        walls = {kind: 0.0 for kind in kinds}
        for number in range(-(-requests // block)):
            # Short blocks, the kinds taking turns in a rotating order: what else runs on the shared machine
            # changes within seconds, and so falls on every kind alike.
            order = kinds[number % 3:] + kinds[:number % 3]
            for tokens, stream in order:
                body = chat_request(TEXT, stream=stream, max_tokens=tokens)
                count = min(block, requests - number * block)
                started, wall = cpu_s(pid), time.perf_counter()
                done = await open_loop(gateway, body, headers, rate, count, seed=turn * 1000 + number)
                await asyncio.sleep(0.02)  # the last requests' ends (metrics, connection release) are counted too
                assert len(done.samples) == count
                walls[tokens, stream] += time.perf_counter() - wall
                ended = cpu_s(pid)
                used[tokens, stream] += ended[0] - started[0]
                system[tokens, stream] += ended[1] - started[1]
        short, long, whole = (CpuRun(tokens, stream, requests, walls[tokens, stream],
                                     used[tokens, stream] - idle_per_s * walls[tokens, stream],
                                     system[tokens, stream])
                              for tokens, stream in kinds)
        result.rounds.append((short, long, whole))
        whole_body = chat_request(TEXT, stream=False, max_tokens=short_tokens)
        started = cpu_s(pid)[0]
        done = await closed_loop(gateway, whole_body, headers, SATURATED_CONCURRENCY, requests * 3)
        await asyncio.sleep(0.02)
        result.saturated_whole_us.append((cpu_s(pid)[0] - started) / len(done.samples) * 1e6)
        result.stolen_percent.append((stolen_s(cores) - stolen_before) / (time.perf_counter() - round_wall)
                                     / core_count(cores) * 100)
    return result


async def _main(args: argparse.Namespace) -> GatewayCpu:
    from .run import Layout, behind_gateway  # run.py imports this module

    layout = Layout.of_this_machine()
    if layout.others is not None:
        os.sched_setaffinity(0, layout.others)  # the load and the stand-in engine stay off the measured core
    upstream = upstream_args(args.long, args.interval_ms)
    with tempfile.TemporaryDirectory(prefix="airlock-gateway-cpu-") as work, \
            limits_server(Path(work), layout.others, args.shared_limits) as shared:
        async with behind_gateway(Path(work), "cpu", args.port, upstream, layout, shared) as proxied:
            with py_spy(proxied.gateway_pid, args.profile, args.native):
                return await gateway_cpu(proxied.gateway, proxied.headers, proxied.gateway_pid, rounds=args.rounds,
                                         requests=args.requests, rate=args.rate, short_tokens=args.short,
                                         long_tokens=args.long, interval_ms=args.interval_ms, block=args.block)


@contextlib.contextmanager
def limits_server(work: Path, cpus: set[int] | None, wanted: bool) -> Iterator[dict[str, Any] | None]:
    """With ``wanted``, a real ``airlock limits-server`` on a unix socket (off the measured core), and the gateway's
    settings for it: each request then makes its round trip there (``--shared-limits``)."""
    if not wanted:
        yield None
        return
    secret, path = work / "salt", work / "limits.sock"
    secret.write_text("a secret the benchmark's gateway shares with nobody" * 2)
    secret.chmod(0o600)
    settings = {"admission": {**NO_USER_LIMITS, "shared_limits": {"url": f"unix:{path}"}},
                "privacy": {"salt_secret_file": str(secret)}}
    config = work / "limits.yaml"
    config.write_text(yaml.safe_dump(settings))
    pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
    with (work / "limits.log").open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "limits-server", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=pin)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the limits server did not start: see {work / 'limits.log'}")
            time.sleep(0.1)
        yield settings
    finally:
        stop(process, signal.SIGTERM, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400, help="per run (3 runs a round)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests a second (open loop)")
    parser.add_argument("--short", type=int, default=SHORT_TOKENS)
    parser.add_argument("--long", type=int, default=LONG_TOKENS)
    parser.add_argument("--interval-ms", type=float, default=INTERVAL_MS)
    parser.add_argument("--block", type=int, default=50, help="requests of one kind before the next kind's turn")
    parser.add_argument("--port", type=int, default=18697)
    parser.add_argument("--profile", type=Path, help="record a py-spy profile here (speedscope; raw if *.txt)")
    parser.add_argument("--native", action="store_true", help="with native frames (slows the gateway down)")
    parser.add_argument("--shared-limits", action="store_true",
                        help="users' limits counted by a limits server (admission.shared_limits, unix socket)")
    args = parser.parse_args()
    print(asyncio.run(_main(args)).report())


if __name__ == "__main__":
    main()
