"""Per-user limits: requests in progress at once, and requests per minute (a token bucket). Over either: 429
with Retry-After. Keyed by user id, in memory only, and bounded: idle users with a full bucket are forgotten (so
the table holds at most about twice the users active within the last minute, and USERS_KEPT at least)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

from .config import AdmissionSettings
from .errors import RateLimited

# Past this many remembered users, those with nothing in progress and a full bucket are dropped.
USERS_KEPT = 4096


@dataclass
class _Bucket:
    tokens: float
    updated: float


class UserLimits:
    def __init__(self, settings: AdmissionSettings) -> None:
        self._max_concurrent = settings.max_concurrent_per_user
        self._per_minute = settings.requests_per_minute_per_user
        self._active: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        # The table's size at which idle users are next looked for: twice what the last look left, so that users
        # who all keep a bucket in use cost one look per doubling, not one per newcomer.
        self._sweep_at = USERS_KEPT

    def admit(self, user: str) -> _Admitted:
        """Count one request of ``user`` while it runs (``with``), or refuse it with 429 on entering."""
        return _Admitted(self, user)

    def _enter(self, user: str) -> None:
        if self._max_concurrent and self._active[user] >= self._max_concurrent:
            raise RateLimited(
                f"you have {self._active[user]} requests in progress, the limit is {self._max_concurrent}; "
                "wait for one to finish", code="too_many_concurrent_requests", retry_after_s=1,
            )
        if self._per_minute:
            self._take_token(user)
        self._active[user] += 1

    def _leave(self, user: str) -> None:
        self._active[user] -= 1
        if self._active[user] <= 0:
            del self._active[user]

    def _take_token(self, user: str) -> None:
        now = time.monotonic()
        rate = self._per_minute / 60.0
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._forget_idle(now, rate)
            bucket = self._buckets[user] = _Bucket(float(self._per_minute), now)
        bucket.tokens = min(float(self._per_minute), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = math.ceil((1.0 - bucket.tokens) / rate)
            raise RateLimited(f"more than {self._per_minute} requests per minute; try again in {wait} s",
                              code="rate_limit_exceeded", retry_after_s=wait)
        bucket.tokens -= 1.0

    def _forget_idle(self, now: float, rate: float) -> None:
        full = float(self._per_minute)
        self._buckets = {
            user: bucket for user, bucket in self._buckets.items()
            if user in self._active or bucket.tokens + (now - bucket.updated) * rate < full
        }
        self._sweep_at = max(USERS_KEPT, 2 * len(self._buckets))


class _Admitted:
    """``UserLimits.admit``: a class rather than a generator-based context manager, for its cost per request (py-spy
    under ``tests/bench/gateway_cpu``). The request is counted until the block ends, whatever ends it; ``async with``
    too, as ``Admission.user_limits`` is with a limits server."""

    __slots__ = ("_limits", "_user")

    def __init__(self, limits: UserLimits, user: str) -> None:
        self._limits, self._user = limits, user

    def __enter__(self) -> None:
        self._limits._enter(self._user)

    def __exit__(self, *_: object) -> None:
        self._limits._leave(self._user)

    async def __aenter__(self) -> None:
        self._limits._enter(self._user)

    async def __aexit__(self, *_: object) -> None:
        self._limits._leave(self._user)
