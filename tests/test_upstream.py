"""Routing among replicas and readiness (replicas marked healthy by hand), and the health checks' verdicts against
an engine that times out or drops connections on cue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import pytest

from server import upstream
from server.config import RoutingSettings, load_settings
from server.fairqueue import Capacity
from server.routing import LeastOutstanding, TenantAffinity, build_strategy
from server.upstream import PROGRESS_KEEPS_HEALTHY_S, SLOW_CHECKS_TOLERATED, ReplicaPool


def pool_of(count: int, strategy: object = None, cap: int = 64) -> ReplicaPool:
    pool = ReplicaPool([f"unix:/nonexistent/{index}.sock" for index in range(count)], load_settings().gateway,
                       strategy or LeastOutstanding(), cap)  # type: ignore[arg-type]
    for replica in pool.replicas:
        replica.healthy = True
        replica.models = {"m": {"id": "m"}}
    return pool


def test_idle_replicas_take_turns_even_when_availability_is_checked_first() -> None:
    pool = pool_of(2)
    chosen = []
    for _ in range(4):
        assert pool.can_serve("m")  # the gateway's check must not use up a routing turn
        replica = pool.pick("m", "tenant")
        assert replica is not None
        chosen.append(replica.index)
    assert sorted(chosen) == [0, 0, 1, 1]
    asyncio.run(pool.close())


def test_least_outstanding_wins() -> None:
    pool = pool_of(3)
    pool.replicas[0].outstanding = 5
    pool.replicas[2].outstanding = 1
    assert [pool.pick("m", "t").index for _ in range(3)] == [1, 1, 1]  # type: ignore[union-attr]
    asyncio.run(pool.close())


def test_unhealthy_or_other_model_replicas_are_skipped() -> None:
    pool = pool_of(2)
    pool.replicas[0].healthy = False
    assert pool.pick("m", "t") is pool.replicas[1]
    assert pool.pick("m", "t", exclude=pool.replicas[1]) is None
    assert not pool.can_serve("other")
    assert pool.knows("m") and not pool.knows("other")
    asyncio.run(pool.close())


def test_a_tenant_stays_on_its_replica_within_the_slack_then_moves() -> None:
    pool = pool_of(2, TenantAffinity(slack=2))
    home = pool.pick("m", "alice")
    assert home is not None
    other = pool.replicas[1 - home.index]
    for busier_by in range(3):  # 0, 1, 2 more in flight than the other replica: still home
        home.outstanding = busier_by
        assert pool.pick("m", "alice") is home
    home.outstanding = 3  # beyond the slack: the tenant moves, and its new home sticks
    assert pool.pick("m", "alice") is other
    home.outstanding = 0
    assert pool.pick("m", "alice") is other
    asyncio.run(pool.close())


def test_tenants_spread_over_replicas_while_load_is_balanced() -> None:
    pool = pool_of(2, TenantAffinity(slack=4))
    homes = {}
    for tenant in ("a", "b", "c", "d"):
        replica = pool.pick("m", tenant)
        assert replica is not None
        replica.outstanding += 1
        homes[tenant] = replica.index
    assert sorted(homes.values()) == [0, 0, 1, 1]
    assert all(pool.pick("m", tenant).index == index for tenant, index in homes.items())  # type: ignore[union-attr]
    asyncio.run(pool.close())


def test_full_replicas_are_passed_over_while_another_has_room() -> None:
    pool = pool_of(2, TenantAffinity(slack=100), cap=2)
    home = pool.pick("m", "alice")
    assert home is not None
    home.outstanding = 2  # at the cap: affinity gives way
    assert pool.pick("m", "alice") is pool.replicas[1 - home.index]
    assert pool.capacity("m") == Capacity(slots=4, replicas=2)
    pool.replicas[0].healthy = False
    assert pool.capacity("m") == Capacity(slots=2, replicas=1)
    asyncio.run(pool.close())


def test_each_replica_is_given_its_own_limit_and_the_queue_gets_their_sum() -> None:
    pool = pool_of(2)
    pool.replicas[0].max_in_flight, pool.replicas[1].max_in_flight = 1, 3  # learnt from caches of unequal size
    assert pool.capacity("m") == Capacity(slots=4, replicas=2)
    pool.replicas[0].outstanding = 1
    assert [pool.pick("m", f"t{n}") for n in range(3)] == [pool.replicas[1]] * 3  # replica 0 is full
    pool.replicas[1].outstanding = 3
    assert pool.pick("m", "t") is not None  # both full: a retry may still go over (pick never refuses)
    asyncio.run(pool.close())


def test_ready_only_when_every_model_has_a_healthy_replica() -> None:
    pool = pool_of(2)
    pool.replicas[1].models = {"other": {"id": "other"}}
    assert pool.ready
    pool.replicas[1].healthy = False  # "other" has no replica left: not ready, though replica 0 is fine
    assert not pool.ready and pool.any_healthy
    asyncio.run(pool.close())


def test_strategy_from_settings() -> None:
    assert isinstance(build_strategy(RoutingSettings(strategy="least_outstanding")), LeastOutstanding)
    assert isinstance(build_strategy(RoutingSettings()), TenantAffinity)


class ScriptedEngine:
    """A stand-in for an engine's control plane, on a unix socket (a real vLLM cannot be made to stall or drop a
    connection on cue): answers GETs with 200, hangs when ``silent``, and closes the connection without an answer
    for the next ``drops`` requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.silent = False
        self.drops = 0
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedEngine:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        self._released.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.drops:
                    self.drops -= 1
                    return
                if self.silent:
                    await self._released.wait()
                    return
                listing = {"data": [{"id": "m"}]}
                body = json.dumps(listing if head.startswith(b"GET /v1/models ") else {}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def checked_once(tmp_path: Path) -> AsyncIterator[tuple[ScriptedEngine, ReplicaPool]]:
    """A scripted engine and a one-replica pool in front of it, after a first health check (closed at the end)."""
    async with ScriptedEngine(tmp_path / "engine.sock") as engine:
        pool = ReplicaPool([f"unix:{engine.path}"], load_settings().gateway, LeastOutstanding(), 64)
        await pool.check_all()
        try:
            yield engine, pool
        finally:
            await pool.close()


@pytest.fixture
def quick_health_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "HEALTH_TIMEOUT_S", 0.1)


def test_a_connection_dropped_during_a_health_check_is_retried_not_taken_for_a_dead_engine(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with checked_once(tmp_path) as (engine, pool):
            replica = pool.replicas[0]
            assert replica.healthy and replica.serves("m")
            engine.drops = 1  # the engine closed the kept-alive connection just as the check reused it
            await pool.check_all()
            assert engine.drops == 0 and replica.healthy
            engine.drops = 2  # dropped again on a fresh connection: not a race, the engine is in trouble
            await pool.check_all()
            assert engine.drops == 0 and not replica.healthy
            await pool.check_all()  # and back once it answers again
            assert replica.healthy

    asyncio.run(scenario())


@pytest.mark.usefixtures("quick_health_timeout")
def test_a_busy_engine_still_sending_answers_keeps_its_place_through_slow_health_checks(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with checked_once(tmp_path) as (engine, pool):
            replica = pool.replicas[0]
            engine.silent = True  # /health waits behind a full batch
            for _ in range(SLOW_CHECKS_TOLERATED + 3):
                replica.made_progress()  # while answers keep flowing
                await pool.check_all()
                assert replica.healthy
            replica.last_progress -= PROGRESS_KEEPS_HEALTHY_S  # no answer for that long: stuck, not busy
            await pool.check_all()
            assert not replica.healthy

    asyncio.run(scenario())


@pytest.mark.usefixtures("quick_health_timeout")
def test_an_idle_engine_that_stops_answering_health_checks_leaves_after_the_tolerated_slow_ones(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with checked_once(tmp_path) as (engine, pool):
            replica = pool.replicas[0]
            engine.silent = True
            for _ in range(SLOW_CHECKS_TOLERATED - 1):
                await pool.check_all()
                assert replica.healthy  # one slow answer is not yet a verdict
            await pool.check_all()
            assert not replica.healthy

    asyncio.run(scenario())
