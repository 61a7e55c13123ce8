"""Routing among replicas and readiness (no network: replicas are marked healthy by hand)."""

from __future__ import annotations

import asyncio

from server.config import RoutingSettings, load_settings
from server.routing import LeastOutstanding, TenantAffinity, build_strategy
from server.upstream import ReplicaPool


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
    assert pool.capacity("m") == 4
    pool.replicas[0].healthy = False
    assert pool.capacity("m") == 2
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
