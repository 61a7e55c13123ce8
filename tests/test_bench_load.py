"""The benchmark's concurrency-1 comparison (``tests/bench/load.interleaved``) takes turns as it says: every path
gets its requests in every round, one request of each path a turn, the order rotated each turn. Against the
benchmark's instant upstream (a stand-in engine, the benchmarks' one fake), whose requests are recorded here."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .bench.instant_upstream import InstantEngine
from .bench.load import chat_request, interleaved, session
from .servers import ThreadedServer


class Recorder:
    """The instant upstream, noting each request's ``x-path`` header in arrival order."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            self.seen.append(dict(scope["headers"]).get(b"x-path", b"?").decode())
        await self.app(scope, receive, send)


def test_interleaved_takes_turns_request_by_request(tmp_path: Path) -> None:
    recorder = Recorder(InstantEngine(tokens=4, interval_s=0))
    socket = tmp_path / "upstream.sock"
    body = chat_request("Describe the invoice.", stream=True, max_tokens=4)

    async def measure() -> dict[str, Any]:
        async with session("http://localhost", uds=str(socket)) as client:
            paths = {name: (client, {"content-type": "application/json", "x-path": name}) for name in "abc"}
            return await interleaved(paths, body, requests=4, rounds=2)

    with ThreadedServer(recorder, uds=str(socket)):
        runs = asyncio.run(measure())

    turns = ["abc", "bca", "cab", "abc"]  # rotated each turn, and again from the start in the next round
    assert recorder.seen == list("".join(turns * 2))
    for name in "abc":
        assert len(runs[name]) == 2
        for run in runs[name]:
            assert [sample.tokens for sample in run.samples] == [4] * 4
            assert all(0 < sample.ttft_s <= sample.e2e_s for sample in run.samples)
            assert abs(run.wall_s - sum(sample.e2e_s for sample in run.samples)) < 1e-9
