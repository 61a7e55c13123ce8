"""Closed-loop load: ``concurrency`` clients, each sending its next request as soon as its last one ended.

The client is aiohttp (light, so that the client is not what limits a run); the same client and the same
request bodies go straight to the engine and through the gateway.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

FIRST_CONTENT = b'"content":"'
MODEL = "airlock-demo-qwen3-vl"
# A connection dropped before any answer (vLLM's own server does it now and then under load on this machine, sent
# straight to it or through the gateway) is tried once more, as the OpenAI SDK does. The time lost stays in the
# sample, and every retry is counted and reported.
DROPPED = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


def chat_request(content: object, *, stream: bool, max_tokens: int, ignore_eos: bool = False) -> bytes:
    """A chat completion body; a streamed one asks for the usage event (its token count is what is measured)."""
    body: dict[str, object] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
                               "messages": [{"role": "user", "content": content}]}
    if ignore_eos:
        body["ignore_eos"] = True
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Sample:
    ttft_s: float  # to the first event carrying text (streamed), or to the whole answer
    e2e_s: float
    tokens: int
    retried: bool = False


@dataclass(frozen=True)
class Run:
    samples: list[Sample]
    wall_s: float

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    @property
    def retries(self) -> int:
        return sum(sample.retried for sample in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return sum(sample.tokens for sample in self.samples) / self.wall_s

    def ttft(self, q: float) -> float:
        return percentile([sample.ttft_s for sample in self.samples], q)

    def e2e(self, q: float) -> float:
        return percentile([sample.e2e_s for sample in self.samples], q)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def session(base_url: str, uds: str | None = None, connections: int = 512) -> aiohttp.ClientSession:
    """Idle connections are dropped after 2 s, before a server's own keep-alive ends (uvicorn's: 5 s), so that a
    request between runs never goes out on a connection the server is closing."""
    pool = {"limit": connections, "keepalive_timeout": 2}
    connector = aiohttp.UnixConnector(path=uds, **pool) if uds else aiohttp.TCPConnector(**pool)
    return aiohttp.ClientSession(base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=900),
                                 auto_decompress=False)


async def one(client: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> Sample:
    started = time.perf_counter()
    first = 0.0
    retried = False
    while True:
        try:
            response = await client.post("/v1/chat/completions", data=body, headers=headers)
            break
        except DROPPED:
            if retried:
                raise
            retried = True
    async with response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {(await response.text())[:300]}")
        if response.content_type == "text/event-stream":
            tokens = 0
            async for line in response.content:
                if not first and FIRST_CONTENT in line and b'"content":""' not in line:
                    first = time.perf_counter()
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        else:
            tokens = json.loads(await response.read())["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return Sample((first or ended) - started, ended - started, tokens, retried)


async def closed_loop(client: aiohttp.ClientSession, body: bytes, headers: dict[str, str], concurrency: int,
                      requests: int) -> Run:
    """``requests`` requests (rounded up to a multiple of ``concurrency``) from ``concurrency`` clients."""
    per_client = -(-requests // concurrency)
    samples: list[Sample] = []

    async def client_loop() -> None:
        for _ in range(per_client):
            samples.append(await one(client, body, headers))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return Run(samples, time.perf_counter() - started)


async def open_loop(client: aiohttp.ClientSession, body: bytes, headers: dict[str, str], rate: float,
                    requests: int, seed: int) -> Run:
    """``requests`` requests arriving at random (Poisson, ``rate`` a second), whether or not earlier ones ended:
    how users arrive, unlike clients in lockstep. The same ``seed`` gives the same arrivals."""
    arrivals = random.Random(seed)
    samples: list[Sample] = []

    async def send() -> None:
        samples.append(await one(client, body, headers))

    started = time.perf_counter()
    tasks = []
    due = started
    for _ in range(requests):
        due += arrivals.expovariate(rate)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(send()))
    await asyncio.gather(*tasks)
    return Run(samples, time.perf_counter() - started)


def rotated(names: list[str], turn: int) -> list[str]:
    """``names`` starting at the ``turn``-th (modulo their number): each name takes each place in turn."""
    shift = turn % len(names)
    return names[shift:] + names[:shift]


async def interleaved(paths: dict[str, tuple[aiohttp.ClientSession, dict[str, str]]], body: bytes, requests: int,
                      rounds: int) -> dict[str, list[Run]]:
    """Concurrency 1, request by request: each of ``requests`` turns sends one request over every named path, one
    after another, the order rotated each turn: the runs of each path, round by round (a run's wall time is the sum
    of its requests', as a closed loop's at concurrency 1 would be).

    Why not ``alternating``'s runs one after another: one request at a time, vLLM's time to first token here swings
    between about 25 and 80 ms with the state it is left in (how soon after the last answer the next request
    comes), so consecutive runs of one path compared those states as much as the paths. Turn by turn, every path
    meets the same states."""
    names = list(paths)
    samples: dict[str, list[list[Sample]]] = {name: [[] for _ in range(rounds)] for name in names}
    for turn in range(rounds):
        for index in range(requests):
            for path in rotated(names, index):
                client, sent = paths[path]
                try:
                    samples[path][turn].append(await one(client, body, sent))
                except Exception as exc:
                    exc.add_note(f"sent {path}, concurrency 1 (interleaved), round {turn}")
                    raise
    return {name: [Run(round_samples, sum(sample.e2e_s for sample in round_samples))
                   for round_samples in samples[name]] for name in names}


def merged(runs: Sequence[Run]) -> Run:
    return Run([sample for run in runs for sample in run.samples], sum(run.wall_s for run in runs))


async def side_by_side(direct: aiohttp.ClientSession, gateway: aiohttp.ClientSession, headers: dict[str, str],
                       body: bytes, concurrency: int, requests: int, rounds: int,
                       warm_up: bool = False) -> tuple[list[Run], list[Run]]:
    """The same load straight upstream and through the gateway, alternating, the order swapped each round (so
    neither always runs on a warmer machine): the runs of each path, round by round. ``headers`` (the gateway's
    credentials) go to the gateway only."""
    runs = await alternating({"direct": (direct, {"content-type": "application/json"}), "gateway": (gateway, headers)},
                             body, concurrency, requests, rounds, warm_up)
    return runs["direct"], runs["gateway"]


async def alternating(paths: dict[str, tuple[aiohttp.ClientSession, dict[str, str]]], body: bytes, concurrency: int,
                      requests: int, rounds: int, warm_up: bool = False) -> dict[str, list[Run]]:
    """The same load over each named path (a client session and the headers it sends), one after another, the order
    rotated each round (so that, over as many rounds as paths, each path runs once in each place, and none always on
    a warmer machine; two paths: swapped each round): the runs of each path, round by round."""
    names = list(paths)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for turn in range(rounds):
        for path in rotated(names, turn):
            client, sent = paths[path]
            if warm_up and turn == 0:
                await closed_loop(client, body, sent, concurrency, concurrency * 2)  # open the connections
            try:
                runs[path].append(await closed_loop(client, body, sent, concurrency, requests))
            except Exception as exc:
                exc.add_note(f"sent {path}, concurrency {concurrency}, round {turn}")
                raise
    return runs
