"""How the gateway's process runs: on uvloop when it is installed, and with glibc's allocator set for request
bodies of megabytes: kept in one heap for reuse, and that heap's free pages handed back to the system each second.

uvloop is a faster event loop than asyncio's own (`make bench` shows what the gateway costs).

The allocator: request bodies carry megabytes of images, and each step of the image path (the body received, parsed,
its base64 checked, the body forwarded) holds a buffer of about that size for a moment. glibc's defaults let the
gateway's memory only grow: after the first large buffer is freed it raises its mmap threshold, so later ones come
from the heap, and every thread that screens bodies gets a heap of its own, which is never trimmed below what it
once held. The opposite, a fixed 128 KiB mmap threshold (the setting until 1 December 2026), kept memory flat but
gave every such buffer a mapping of its own, whose pages the kernel faulted in and zeroed anew on every request:
2,900 minor faults and 13 ms of the gateway's CPU for a request with a 1 MB JPEG on this project's test machine (a
VM, where a fault costs about 2.3 us). So now:

- buffers up to ``MMAP_THRESHOLD_BYTES`` come from the heap and are reused from request to request;
- one heap (``M_ARENA_MAX`` 1) for every thread: ``malloc_trim`` returns the free pages of the main heap, but only
  the free chunks of the others, not their top (measured once idle: two heaps kept 15 to 25 MB, one kept none);
- free() trims the heap's top only past ``TRIM_THRESHOLD_BYTES``, and a daemon thread calls ``malloc_trim(0)``
  every ``TRIM_PERIOD_S``: the pages of buffers freed since go back to the system then, once, rather than on every
  free.

Measured (``python -m tests.bench.run``'s memory load, a 1 MB JPEG a request, 8 at once, the old and new settings
one after the other, 1 December 2026): 6.0 ms of the gateway's CPU and 65 faults a request, against 12.8 ms and
2,915; 5,000 such requests left the RSS where it was (89 MB once idle, against 95 MB before). While requests flow,
the RSS also holds the last second's freed buffers (130 to 140 MB at 8 image requests at once).
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
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024  # above any image's base64 at the default limits
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
ARENA_MAX = 1
TRIM_PERIOD_S = 1.0


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run the gateway's (or the supervisor's) main coroutine."""
    trim = tune_malloc()
    if trim is not None:
        start_trimming(trim, TRIM_PERIOD_S)
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


def tune_malloc() -> Callable[[], object] | None:
    """Apply the settings above where the C library is glibc; then a function that trims the heap, else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only: musl's mallopt does nothing)
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    applied = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
               and mallopt(M_ARENA_MAX, ARENA_MAX))
    return functools.partial(malloc_trim, 0) if applied else None  # ctypes releases the GIL while it runs


def start_trimming(trim: Callable[[], object], period_s: float) -> threading.Thread:
    """A daemon thread that calls ``trim`` every ``period_s`` seconds for as long as the process lives."""
    def trimming() -> None:
        while True:
            time.sleep(period_s)
            trim()

    thread = threading.Thread(target=trimming, name="malloc-trim", daemon=True)
    thread.start()
    return thread
