"""How the gateway's process runs: on uvloop when it is installed, and with glibc's allocator told to hand large
buffers back to the system.

uvloop is a faster event loop than asyncio's own (`make bench` shows what the gateway costs). The allocator setting
matters because request bodies carry megabytes of images: by default glibc raises its mmap threshold after the
first large buffer is freed, so later ones come from the heap, and the threads that screen large bodies each
get a heap of their own; the gateway's memory then only grows. A fixed threshold keeps every buffer above it
in its own mapping, returned to the system when freed.

What it costs: each such buffer's pages are faulted in (and zeroed) anew. For the 1.3 MB base64 of a 1 MB JPEG,
in one process (``tests.bench.screening_cost.photo_like``, 30 Nov 2026), parsing the body took 2.9 ms instead of
0.9, one ASCII copy of the base64 0.6 ms instead of 0.03: so the image path copies such buffers as few times as it
can (``images``, ``forwarded_body``). A higher fixed threshold (8 MiB) was tried: the gateway's faults per image
request varied from 100 to 570 between two runs (the heap is trimmed and grown again), not adopted.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Coroutine
from typing import Any

# glibc's mallopt() parameters (malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


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


def tune_malloc() -> bool:
    """Fixed mmap threshold and few arenas, where the C library is glibc; True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only: musl's mallopt does nothing)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_ARENA_MAX, ARENA_MAX))
