"""Routing among replicas (no network: replicas are marked healthy by hand)."""

from __future__ import annotations

import asyncio

from server.config import load_settings
from server.upstream import ReplicaPool


def pool_of(count: int) -> ReplicaPool:
    pool = ReplicaPool([f"unix:/nonexistent/{index}.sock" for index in range(count)], load_settings().gateway)
    for replica in pool.replicas:
        replica.healthy = True
        replica.models = {"m": {"id": "m"}}
    return pool


def test_idle_replicas_take_turns_even_when_availability_is_checked_first() -> None:
    pool = pool_of(2)
    chosen = []
    for _ in range(4):
        assert pool.can_serve("m")  # the gateway's check must not use up a routing turn
        replica = pool.pick("m")
        assert replica is not None
        chosen.append(replica.index)
    assert sorted(chosen) == [0, 0, 1, 1]
    asyncio.run(pool.close())


def test_least_outstanding_wins() -> None:
    pool = pool_of(3)
    pool.replicas[0].outstanding = 5
    pool.replicas[2].outstanding = 1
    assert [pool.pick("m").index for _ in range(3)] == [1, 1, 1]  # type: ignore[union-attr]
    asyncio.run(pool.close())


def test_unhealthy_or_other_model_replicas_are_skipped() -> None:
    pool = pool_of(2)
    pool.replicas[0].healthy = False
    assert pool.pick("m") is pool.replicas[1]
    assert pool.pick("m", exclude=pool.replicas[1]) is None
    assert not pool.can_serve("other")
    assert pool.knows("m") and not pool.knows("other")
    asyncio.run(pool.close())
