"""The request path's own parts, on their own."""

from __future__ import annotations

import asyncio
import gc
import weakref

from starlette.types import Message

from server.request_path import cancelled_when_client_leaves


def test_a_request_that_ends_leaves_no_cycle_for_the_garbage_collector() -> None:
    """When a request ends, its disconnect watch is cancelled; the cancelled watcher's traceback holds the watch.
    Had the watch kept the watcher, the two tasks (and the whole request's objects with them) would wait for a full
    garbage collection, which then walked them all (tens of ms of the event loop under the department benchmark)."""

    async def never_leaves() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("not reached")

    async def one_request() -> weakref.ref[asyncio.Task[object]]:
        async with cancelled_when_client_leaves(never_leaves):
            watcher = next(task for task in asyncio.all_tasks() if task.get_name() == "airlock-disconnect-watch")
            seen = weakref.ref(watcher)
            del watcher
        for _ in range(3):  # the watcher takes its cancellation and ends
            await asyncio.sleep(0)
        return seen

    gc.disable()
    try:
        seen = asyncio.run(one_request())
        assert seen() is None, "the cancelled watcher outlived the request (held in a reference cycle)"
    finally:
        gc.enable()
