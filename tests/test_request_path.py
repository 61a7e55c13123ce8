"""The request path's own parts, on their own."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from server.auth.principal import Principal, local_principal
from server.config import Settings
from server.errors import BodyTooLarge, UnsupportedMediaType
from server.payload import parse_request
from server.request_path import SCREEN_INLINE_BYTES, cancelled_when_client_leaves, read_body, screened
from server.screening import Route, Screened, Screening
from server.tenancy import TenantSalts
from tests.bench.department import request_body, scanned_invoice


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


def body_of(messages: list[Message], limit: int = 10, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[
        bytes | BaseException, int]:
    """What ``read_body`` makes of ``messages`` (or what it raised), and how many of them it read."""
    pending = list(messages)

    async def receive() -> Message:
        return pending.pop(0)

    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers or []},
                      receive)
    try:
        result: bytes | BaseException = asyncio.run(read_body(request, limit))
    except (BodyTooLarge, ClientDisconnect, UnsupportedMediaType) as error:
        result = error
    return result, len(messages) - len(pending)


def part(body: bytes, more: bool) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


def test_the_body_is_read_whole_and_refused_at_the_first_byte_past_the_limit() -> None:
    assert body_of([part(b'{"model"', True), part(b"", True), part(b': "m"}', False)], limit=100) == (
        b'{"model": "m"}', 3)
    assert body_of([{"type": "http.request"}]) == (b"", 1)  # no body at all
    assert body_of([part(b"0123456789", False)]) == (b"0123456789", 1)  # exactly the limit
    refused, read = body_of([part(b"012345", True), part(b"67890", True), part(b"never read", False)])
    assert isinstance(refused, BodyTooLarge) and read == 2
    # Refused from its Content-Length, before a byte is read.
    refused, read = body_of([part(b"0", False)], headers=[(b"content-length", b"11")])
    assert isinstance(refused, BodyTooLarge) and read == 0
    refused, read = body_of([part(b"0", False)], headers=[(b"content-encoding", b"gzip")])
    assert isinstance(refused, UnsupportedMediaType) and read == 0


def test_a_client_that_leaves_while_its_body_is_read_is_a_disconnect() -> None:
    left, read = body_of([part(b"0123", True), {"type": "http.disconnect"}, part(b"never read", False)])
    assert isinstance(left, ClientDisconnect) and read == 2


def test_a_scanned_page_is_screened_on_the_loops_thread_and_larger_bodies_in_a_worker() -> None:
    """A body below SCREEN_INLINE_BYTES (the department benchmark's 0.7 MB page) is screened where the event loop
    runs: a hop to a worker and back waits twice for the GIL while the loop is busy. Larger ones go to a worker,
    where the loop gets the GIL back every switch interval of a long screening. The choice is by body size alone."""
    settings = Settings()
    screened_on: list[int] = []

    class Recording(Screening):
        def screen(self, route: Route, payload: dict[str, Any], principal: Principal) -> Screened:
            screened_on.append(threading.get_ident())
            return super().screen(route, payload, principal)

    screening = Recording(settings.screening, TenantSalts(settings.privacy))
    body = request_body(16, scanned_invoice())
    assert 512 * 1024 < len(body) < SCREEN_INLINE_BYTES

    async def screen(size: int) -> int:
        checked = await screened(screening, "chat", parse_request(body, 64), local_principal("u", {}), size)
        assert checked.image_sizes == ((1654, 2339),) and len(checked.body) > 512 * 1024
        return threading.get_ident()

    loop_thread = asyncio.run(screen(len(body)))
    assert screened_on == [loop_thread]
    loop_thread = asyncio.run(screen(SCREEN_INLINE_BYTES))
    assert screened_on[1] != loop_thread
