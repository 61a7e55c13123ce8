"""Which replica takes a request. One protocol, small strategies; every table is bounded.

``least_outstanding``: the replica with the fewest requests in flight (ties in turn).
``tenant_affinity``: the same, except that a tenant stays on the replica it used last while that replica is at
most ``affinity_slack`` requests busier than the least busy one, so the tenant's prefix cache (which vLLM keeps
per replica, and per cache salt) is reused. The tenant is known here only by its cache salt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from .config import RoutingSettings
from .upstream import Replica

# Tenants remembered for affinity; the least recently seen are forgotten first.
TENANTS_KEPT = 4096


class RoutingStrategy(Protocol):
    def choose(self, candidates: Sequence[Replica], tenant: str) -> Replica: ...


class LeastOutstanding:
    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Replica], tenant: str) -> Replica:
        self._turn += 1
        least = min(replica.outstanding for replica in candidates)
        tied = [replica for replica in candidates if replica.outstanding == least]
        return tied[self._turn % len(tied)]


class TenantAffinity:
    def __init__(self, slack: int) -> None:
        self._slack = slack
        self._least = LeastOutstanding()
        self._homes: OrderedDict[str, int] = OrderedDict()

    def choose(self, candidates: Sequence[Replica], tenant: str) -> Replica:
        home = self._homes.get(tenant)
        least = min(replica.outstanding for replica in candidates)
        for replica in candidates:
            if replica.index == home and replica.outstanding <= least + self._slack:
                self._homes.move_to_end(tenant)
                return replica
        chosen = self._least.choose(candidates, tenant)
        self._homes[tenant] = chosen.index
        self._homes.move_to_end(tenant)
        while len(self._homes) > TENANTS_KEPT:
            self._homes.popitem(last=False)
        return chosen


def build_strategy(settings: RoutingSettings) -> RoutingStrategy:
    if settings.strategy == "tenant_affinity":
        return TenantAffinity(settings.affinity_slack)
    return LeastOutstanding()
