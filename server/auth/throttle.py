"""Slowing down guessing: failures are counted per client address, in memory only, never logged."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..config import FailedLoginSettings


@dataclass
class _Window:
    started: float
    failures: int


class FailureThrottle:
    """How long to hold a failed attempt's 401, and whether an address is refused outright for a while.

    Sources are client addresses; IPv6 addresses count per /64, the block one host usually holds. The first
    ``free_attempts`` failures in a window cost nothing extra (typos happen); each further one doubles
    the delay up to ``max_delay_s``; past ``block_after`` the address gets 429 until its window ends. The table is
    bounded: the least recently seen addresses are forgotten first.
    """

    def __init__(self, settings: FailedLoginSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def blocked_for(self, source: str) -> float:
        """Seconds until ``source`` may try again, or 0 when it may try now."""
        source = _network(source)
        window = self._window(source, create=False)
        if window is None or window.failures < self._settings.block_after:
            return 0.0
        return max(0.0, window.started + self._settings.window_s - self._clock())

    def attempt(self, source: str) -> None:
        """Count an attempt as failed before its credentials are checked, so that many attempts in parallel
        cannot all slip in under the limit while the first ones are still being checked."""
        window = self._window(_network(source), create=True)
        assert window is not None
        window.failures += 1

    def succeeded(self, source: str) -> None:
        """The attempt was good after all: it does not count."""
        window = self._window(_network(source), create=False)
        if window is not None and window.failures > 0:
            window.failures -= 1

    def delay(self, source: str) -> float:
        """How long to hold the answer to a failed attempt."""
        window = self._window(_network(source), create=False)
        if window is None:
            return 0.0
        beyond = window.failures - self._settings.free_attempts
        if beyond <= 0:
            return 0.0
        return float(min(self._settings.max_delay_s, 0.25 * 2 ** min(beyond - 1, 16)))

    def _window(self, source: str, create: bool) -> _Window | None:
        now = self._clock()
        window = self._windows.get(source)
        if window is not None and now - window.started >= self._settings.window_s:
            del self._windows[source]
            window = None
        if window is None and create:
            window = self._windows[source] = _Window(started=now, failures=0)
            while len(self._windows) > self._settings.tracked_addresses:
                self._windows.popitem(last=False)
        if window is not None:
            self._windows.move_to_end(source)
        return window


@functools.lru_cache(maxsize=4096)
def _network(source: str) -> str:
    """What failures are counted against: the address, or its /64 for IPv6 (cached: parsing is a measurable part
    of every request's cost; the cache is in memory and bounded, like the failure windows)."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return source
