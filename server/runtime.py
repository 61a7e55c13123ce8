"""How the gateway's process runs: on uvloop when it is installed, and with glibc's allocator set for request
bodies of megabytes: kept in one heap and reused, and that heap's free pages handed back to the system when requests
pause.

uvloop is a faster event loop than asyncio's own (`make bench` shows what the gateway costs).

The allocator: request bodies carry megabytes of images, and each step of the image path (the body received, parsed,
its base64 checked, the body forwarded) holds a buffer of about that size for a moment. With glibc's defaults the
gateway's memory kept growing: after the first large buffer is freed glibc raises its mmap threshold, so later ones
come from the heap, and the threads that screen bodies get heaps of their own (up to 8 per core), which keep what
they once held. The opposite, a fixed 128 KiB mmap threshold (the setting until 1 December 2026), kept memory flat
but gave every such buffer a mapping of its own, whose pages the kernel faulted in and zeroed anew on every request:
2,900 minor faults and 13 ms of the gateway's CPU for a request with a 1 MB JPEG on this project's test machine (a
VM, where a fault costs about 2.3 us). So now:

- buffers up to ``MMAP_THRESHOLD_BYTES`` come from the heap and are reused from request to request;
- one heap (``M_ARENA_MAX`` 1) for every thread: ``malloc_trim`` hands back the free pages inside every heap but the
  top of the main one only (glibc's ``mtrim``; measured once idle: two heaps kept 15 to 25 MB, one kept none);
- free() trims the heap's top only past ``TRIM_THRESHOLD_BYTES``, and ``trim_heap_when_quiet`` calls
  ``malloc_trim(0)`` once requests pause, and once a minute if they never do (``HeapTrimmer``; not each second: it
  holds the allocator's only lock for milliseconds).

These calls override an operator's ``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES`` for the same settings. A freed body's
bytes now stay in the heap until reused or trimmed, where a mapping of its own was unmapped at once: the process is
not dumpable (``privacy.harden_process``), so no other process of the same user can read them.

Measured (``python -m tests.bench.run``'s memory load, a 1 MB JPEG a request, 8 at once, the old and new settings
one after the other, 1 December 2026): 5.8 to 6.3 ms of the gateway's CPU and 28 to 67 faults a request, against
12.8 ms and 2,915; 5,000 such requests left the RSS where it was once they stopped (89 MB, against 95 MB before).
While requests flow, the RSS also holds what was freed since the last trim, a pause or at most a minute ago (130 to
140 MB at 8 image requests at once).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024  # above an image's base64 at the default limits (10 MB: 13.3 MB)
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
ARENA_MAX = 1
QUIET_S = 1.0  # no request started or finished for this long: the heap is trimmed
LONGEST_UNTRIMMED_S = 60.0  # and at least this often under steady load, so a burst's peak is not kept all day


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run the gateway's (or the supervisor's) main coroutine."""
    tune_malloc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def settle_heap() -> None:
    """Called once the gateway is built, before it serves: everything made so far (modules, settings, the app) lives
    as long as the process, so it is taken out of the garbage collector's sight. A full collection otherwise walks
    ~90,000 objects, and stalled every request for 55-65 ms once per few thousand (`make bench`, pure proxy: the p99
    at concurrency 32 went from 79 to 14 ms). In the server processes only: frozen objects are never collected."""
    gc.collect()  # nothing that is already garbage gets frozen
    gc.freeze()


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (musl's mallopt does nothing; macOS has neither call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def tune_malloc() -> bool:
    """The allocator settings above, where the C library is glibc; True when applied."""
    libc = _glibc()
    return libc is not None and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        and libc.mallopt(M_ARENA_MAX, ARENA_MAX))


class HeapTrimmer:
    """When to call ``malloc_trim(0)``: once activity (``activity``: a count that grows with every API request started
    or finished, each of which allocates or frees its body) has paused for a whole tick, once each pause; and while it
    never pauses, every ``longest_s`` seconds of it, so a burst's peak is not kept all day. Not more often: a trim holds
    the allocator's only lock while it hands back every free chunk (a few ms, tens in a heap cut into many pieces),
    and every thread that allocates waits for it, the event loop's included. ``tick`` is called every ``quiet_s``."""

    def __init__(self, activity: Callable[[], int], trim: Callable[[], object], clock: Callable[[], float],
                 longest_s: float = LONGEST_UNTRIMMED_S) -> None:
        self._activity, self._trim, self._clock, self._longest_s = activity, trim, clock, longest_s
        self._seen = activity()
        self._dirty_since: float | None = None  # when activity began since the last trim; None: nothing to trim

    def tick(self) -> bool:
        """True when it trimmed."""
        seen, self._seen = self._seen, self._activity()
        busy = self._seen != seen
        now = self._clock()
        if busy and self._dirty_since is None:
            self._dirty_since = now  # the clock for longest_s starts with the activity, not at the last trim
        if self._dirty_since is None or (busy and now - self._dirty_since < self._longest_s):
            return False
        self._trim()
        self._dirty_since = now if busy else None  # still busy: what it frees next is trimmed in turn
        return True


def trim_heap_when_quiet(activity: Callable[[], int], quiet_s: float = QUIET_S) -> threading.Thread | None:
    """A daemon thread that trims the heap as ``HeapTrimmer`` says, ticking every ``quiet_s`` seconds; None where the
    C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    trimmer = HeapTrimmer(activity, functools.partial(libc.malloc_trim, 0), time.monotonic)  # ctypes frees the GIL

    def trimming() -> None:
        while True:
            time.sleep(quiet_s)
            trimmer.tick()

    thread = threading.Thread(target=trimming, name="heap-trim", daemon=True)
    thread.start()
    return thread
