"""Several gateways in front of the same engine (``admission.gateway_replicas``, the Helm chart's gateway pods):
what holds across them without a shared queue, and what does not. Two real gateways, each with its own fair queue,
in front of a paced stand-in engine that counts the streams it holds (a fake on purpose: the count must be read
while requests run, at a pace the machine does not change; see ``test_limits_and_drain.paced_chat``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .conftest import Credentials, airlock_cli
from .servers import ThreadedServer, gateway_in_front_of
from .test_limits_and_drain import PACE_S, paced
from .test_proxy_faults import health, models

pytestmark = pytest.mark.engine

SLOTS = 4  # the engine's max_in_flight_per_replica: each of two gateways sends it 2 at once
FLOOD = 10  # alice's requests sent to each gateway at once
FLOOD_TOKENS = 20  # 1 s each at the stand-in's pace


class CountingEngine:
    """Streams one chunk a PACE_S and notes the most streams it held at once."""

    def __init__(self) -> None:
        self.holding = 0
        self.most = 0

    async def chat(self, request: Request) -> Response:
        tokens = int((await request.json())["max_tokens"])

        async def chunks() -> AsyncIterator[bytes]:
            self.holding += 1
            self.most = max(self.most, self.holding)
            try:
                for index in range(tokens):
                    await asyncio.sleep(PACE_S)
                    yield f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{index} "}}}}]}}\n\n'.encode()
                yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n'
                yield b"data: [DONE]\n\n"
            finally:
                self.holding -= 1

        return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture
def counting_engine(tmp_path: Path) -> Iterator[tuple[Path, CountingEngine]]:
    engine, socket_path = CountingEngine(), tmp_path / "counting.sock"
    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/chat/completions", engine.chat, methods=["POST"])])
    with ThreadedServer(app, uds=str(socket_path)):
        yield socket_path, engine


@pytest.fixture(scope="module")
def bob_key(credentials: Credentials) -> str:
    return airlock_cli("keys", "create", "--user", "bob", "--file", str(credentials.api_keys)).strip()


async def stream_to_first_byte(client: httpx.AsyncClient, headers: dict[str, str], tokens: int) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=paced(tokens, stream=True),
                             headers=headers) as answer:
        assert answer.status_code == 200, await answer.aread()
        async for _ in answer.aiter_bytes():
            return


async def stream_to_the_end(client: httpx.AsyncClient, headers: dict[str, str], tokens: int) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=paced(tokens, stream=True),
                             headers=headers) as answer:
        assert answer.status_code == 200, await answer.aread()
        await answer.aread()


def test_two_gateways_never_overfill_the_engine_and_each_serves_a_newcomer_before_a_flood(
        counting_engine: tuple[Path, CountingEngine], credentials: Credentials, bob_key: str) -> None:
    """Alice sends FLOOD long streams to each gateway; bob then sends one short stream to each. Together the gateways
    hold at most the engine's SLOTS (each its half), and at each gateway bob's first byte comes after at most the
    two of alice's streams running there, not after the eight queued behind them (first come, first served).

    What is lost without a shared queue is shown too: with work at one gateway only, the engine runs half full."""
    socket_path, engine = counting_engine
    settings = {"admission": {"max_in_flight_per_replica": SLOTS, "gateway_replicas": 2,
                              "reserved_slots_per_replica": 0, "max_concurrent_per_user": 0,
                              "requests_per_minute_per_user": 0},
                "auth": {"api_keys_file": str(credentials.api_keys)}}
    alice, bob = {"authorization": f"Bearer {credentials.api_key}"}, {"authorization": f"Bearer {bob_key}"}

    async def flood_and_ask(urls: list[str]) -> list[tuple[int, int]]:
        """Alice's streams ended at each gateway before bob's request there, and before its first byte."""
        clients = [httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=None))
                   for url in urls]
        ended = [0] * len(urls)

        async def alices(gateway: int) -> None:
            await stream_to_the_end(clients[gateway], alice, FLOOD_TOKENS)
            ended[gateway] += 1

        try:
            flood = [asyncio.create_task(alices(gateway)) for gateway in range(len(urls)) for _ in range(FLOOD)]
            while engine.holding < SLOTS // 2 * len(urls):
                await asyncio.sleep(0.05)

            async def bobs(gateway: int) -> tuple[int, int]:
                before = ended[gateway]
                await stream_to_first_byte(clients[gateway], bob, 2)
                return before, ended[gateway]

            waited = await asyncio.gather(*(bobs(gateway) for gateway in range(len(urls))))
            await asyncio.gather(*flood)
            return waited
        finally:
            for client in clients:
                await client.aclose()

    with gateway_in_front_of(socket_path, **settings) as one, gateway_in_front_of(socket_path, **settings) as two:
        waited = asyncio.run(flood_and_ask([one, two]))
        assert engine.most == SLOTS, engine.most
        # Alice still had more queued at each gateway than its two slots when bob asked...
        assert all(before <= FLOOD - 2 * SLOTS for before, _ in waited), waited
        # ... and he went before them.
        assert all(after - before <= SLOTS // 2 for before, after in waited), waited

        engine.most = 0
        asyncio.run(flood_and_ask([one]))
        assert engine.most == SLOTS // 2, engine.most
