"""Slowing down guessing: failures are counted per client address, in memory only, never logged."""

from __future__ import annotations

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

    The first ``free_attempts`` failures in a window cost nothing extra (typos happen); each further one doubles
    the delay up to ``max_delay_s``; past ``block_after`` the address gets 429 until its window ends. The table is
    bounded: the least recently seen addresses are forgotten first.
    """

    def __init__(self, settings: FailedLoginSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def blocked_for(self, source: str) -> float:
        """Seconds until ``source`` may try again, or 0 when it may try now."""
        window = self._window(source, create=False)
        if window is None or window.failures < self._settings.block_after:
            return 0.0
        return max(0.0, window.started + self._settings.window_s - self._clock())

    def record_failure(self, source: str) -> float:
        """Count a failure; the delay to apply before answering it."""
        window = self._window(source, create=True)
        assert window is not None
        window.failures += 1
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
