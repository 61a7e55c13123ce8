"""Admission to a model's engines: at most as many requests as its healthy replicas are given at once (each its
``max_in_flight``: see ``upstream``); beyond that, requests wait in a queue that serves users in turn, weighted by
what their requests are estimated to cost.

Start-time fair queuing: each request gets a start tag, the later of the queue's virtual clock and the finish tag
of its user's previous request; its finish tag is the start plus its cost. The request with the smallest start
tag goes next. A user with 100 requests waiting has tags far ahead of the clock, so another user's single request
(tagged at the clock) goes before all but at most one of them; a user who was idle gets no credit for it.
One user may hold all but ``reserved_slots_per_replica`` slots per replica, so that a newcomer does not wait for
someone else's long answer to end. Everything lives in memory, and a slot is always given back (``finally``),
whatever happens to the request.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import AdmissionSettings
from .errors import Overloaded, RateLimited

FINISH_TAGS_KEPT = 1024


@dataclass(frozen=True)
class Capacity:
    """Requests a model's healthy replicas may have in flight at once (the sum of their limits), and how many
    replicas they are (each keeps ``reserved_slots_per_replica`` for newcomers)."""

    slots: int
    replicas: int


@dataclass(order=True)
class _Waiter:
    start: float
    order: int
    user: str = field(compare=False)
    cost: float = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)


class FairQueue:
    """One model's queue. ``capacity`` says how many requests may be in flight right now (it changes with
    replica health: call ``capacity_changed`` then)."""

    def __init__(self, settings: AdmissionSettings, capacity: Callable[[], Capacity]) -> None:
        self._settings = settings
        self._capacity = capacity
        self._in_flight = 0
        self._clock = 0.0
        self._finish: dict[str, float] = {}
        self._waiting: list[_Waiter] = []
        self._queued: Counter[str] = Counter()
        self._holding: Counter[str] = Counter()
        self._order = itertools.count()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return sum(self._queued.values())

    def slot(self, user: str, cost: float) -> _Slot:
        """Hold one of the model's slots for the duration of a request (``async with``)."""
        return _Slot(self, user, cost)

    def user_cap(self, capacity: Capacity) -> int:
        """Slots one user may hold: all but ``reserved_slots_per_replica`` per replica (at least one), so that
        a newcomer finds a slot free instead of waiting for someone's long answer to end. With
        ``gateway_replicas`` gateways sharing the engines, this one keeps its part of the reservation (rounded up)."""
        settings = self._settings
        reserved = -(-settings.reserved_slots_per_replica * capacity.replicas // settings.gateway_replicas)
        return max(1, capacity.slots - reserved)

    async def _acquire(self, user: str, cost: float) -> None:
        settings = self._settings
        start = max(self._clock, self._finish.get(user, 0.0))
        self._finish[user] = start + cost
        if not self._waiting:
            # Nobody waits: what capacity_changed would do with this one request, without the queue's machinery
            # (a future, the heap, the counts of queued requests), which costs as much again per request.
            now = self._capacity()
            if self._in_flight < now.slots and self._holding[user] < self.user_cap(now):
                self._in_flight += 1
                self._holding[user] += 1
                self._clock = max(self._clock, start)
                self._forget_finish_tags()
                return
        waiter = _Waiter(start, next(self._order), user, cost, asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiting, waiter)
        self._queued[user] += 1
        self.capacity_changed()  # in at once if there is room for it, in fair order
        if waiter.granted.done():
            return
        if self._queued[user] > settings.max_queued_per_user:
            self._abandon(waiter)
            raise RateLimited(
                f"you already have {self._queued[user]} requests waiting for this model; wait for some to finish",
                code="too_many_queued", retry_after_s=settings.retry_after_s,
            )
        if self.queued > settings.max_queued:
            self._abandon(waiter)
            raise Overloaded("the server is at capacity; try again shortly", code="queue_full",
                             retry_after_s=settings.retry_after_s)
        try:
            async with asyncio.timeout(settings.queue_timeout_s):
                await waiter.granted
        except TimeoutError:
            self._abandon(waiter)
            raise Overloaded(
                f"waited {settings.queue_timeout_s:g} s for a free engine slot; the server is busy, try again shortly",
                code="queue_timeout", retry_after_s=settings.retry_after_s,
            ) from None
        except BaseException:  # the client went away while waiting
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.granted.done() and not waiter.granted.cancelled():
            self._release(waiter.user)  # granted at the very moment the wait ended: pass the slot on
            return
        waiter.granted.cancel()
        self._queued[waiter.user] -= 1
        if self._queued[waiter.user] <= 0:
            del self._queued[waiter.user]
        # The user is not charged for a request that never ran.
        if self._finish.get(waiter.user) == waiter.start + waiter.cost:
            self._finish[waiter.user] = waiter.start
        self.capacity_changed()

    def _release(self, user: str) -> None:
        self._in_flight -= 1
        self._holding[user] -= 1
        if self._holding[user] <= 0:
            del self._holding[user]
        if self._waiting:
            self.capacity_changed()
        else:  # nobody to let in
            self._forget_finish_tags()

    def capacity_changed(self) -> None:
        """Let waiting requests in while there is room, smallest start tag first, passing over users who hold
        all the slots one user may."""
        now = self._capacity()
        capacity, user_cap = now.slots, self.user_cap(now)
        passed_over = []
        while self._waiting and self._in_flight < capacity:
            waiter = heapq.heappop(self._waiting)
            if waiter.granted.done():
                continue  # abandoned
            if self._holding[waiter.user] >= user_cap:
                passed_over.append(waiter)
                continue
            self._queued[waiter.user] -= 1
            if self._queued[waiter.user] <= 0:
                del self._queued[waiter.user]
            self._in_flight += 1
            self._holding[waiter.user] += 1
            self._clock = max(self._clock, waiter.start)
            waiter.granted.set_result(None)
        for waiter in passed_over:
            heapq.heappush(self._waiting, waiter)
        self._forget_finish_tags()

    def _forget_finish_tags(self) -> None:
        if not self._waiting and not self._in_flight:
            self._finish.clear()  # idle: nobody carries history into the next busy spell
        elif len(self._finish) > FINISH_TAGS_KEPT:
            # A tag at or behind the clock gives its user nothing any more: forget it.
            self._finish = {user: tag for user, tag in self._finish.items() if tag > self._clock}


class _Slot:
    """``FairQueue.slot``: a class rather than a generator-based context manager, for its cost per request (py-spy
    under ``tests/bench/gateway_cpu``). The slot is given back whatever ends the block."""

    __slots__ = ("_cost", "_queue", "_user")

    def __init__(self, queue: FairQueue, user: str, cost: float) -> None:
        self._queue, self._user, self._cost = queue, user, cost

    async def __aenter__(self) -> None:
        await self._queue._acquire(self._user, self._cost)

    async def __aexit__(self, *_: object) -> None:
        self._queue._release(self._user)
