"""The engine routes (POST /v1/chat/completions and /v1/completions): the request path, one step after another.

    step                                        who does it                          refuses with
    1. the method                               ``EngineRoutes.__call__``            405 (with Allow: POST)
    2. who is asking                            ``Callers.identify``                 401, 429 (failed sign-ins)
    3. the user's own limits                    ``Admission.user_limits``            429, before the body is read
    4. the body, bounded                        ``read_body``                        413, 415 (Content-Encoding)
    5. parse                                    ``payload.parse_request``            400
    6. may they use the model, is it served     ``EngineRoutes._authorize``          403, 404, 503
    6b. documents rendered (file parts only)    ``Documents.expand``                 400, 413, 422, 503
    7. screen (fields, images, tenant's salt)   ``Screening.screen``                 400
    8. the model's fair queue                   ``Admission.queue(...).slot``        429, 503
    9. route, forward, relay (one retry)        ``Forwarder.forward``                502, 503, 504
    measured all along                          ``RequestRecord`` events, observed by ``MetricsMiddleware``

Nothing here renders an error: each step raises, and ``boundary.ErrorBoundary`` answers (an OpenAI error before the
response has started, an SSE error event after it). From step 6b on, the client going away cancels the rest at once:
a render worker busy with its document is killed (``RenderPool.render``), the upstream request is closed, vLLM aborts
it, and its batch slot is freed.

These requests skip FastAPI's routing, dependency injection and exception layers: under ``make bench`` (py-spy)
those cost about as much CPU as the rest of the gateway's own work, per request and again per streamed chunk.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .admission import Admission
from .auth import ModelAccess, Principal
from .callers import Callers
from .config import Settings
from .documents import Documents, has_file_parts
from .errors import (
    BodyTooLarge,
    EngineUnavailable,
    MethodNotAllowed,
    ModelNotFound,
    PermissionDenied,
    UnsupportedMediaType,
)
from .metrics import UNKNOWN_MODEL, RequestRecord
from .metrics_middleware import request_record, server_send
from .payload import parse_request
from .proxy import EngineRequest, Forwarder
from .screening import Route, Screened, Screening
from .upstream import ReplicaPool
from .usage import ask_for_usage

ROUTES: dict[str, Route] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# Bodies below this are screened on the event loop's thread; larger ones (megabytes of images) in a worker thread,
# where the loop gets the GIL back every switch interval (5 ms) of a long screening. Not lower: a hop to the worker
# and back waits for the GIL twice while the loop is busy, and screening holds the GIL about as long either way. A
# scanned page (0.7 MB) under the department benchmark's load, inline and in the thread by turns in one gateway:
# screened 5.6 against 10.6 ms after its first byte at p50, 17 against 38 ms at p90 (README, Performance).
SCREEN_INLINE_BYTES = 1024 * 1024


class EngineRoutes:
    """A plain ASGI app for the engine routes in front of ``api`` (FastAPI), which gets every other request."""

    def __init__(self, api: ASGIApp, config: Settings, callers: Callers, admission: Admission, access: ModelAccess,
                 pool: ReplicaPool, documents: Documents, screening: Screening, forwarder: Forwarder) -> None:
        self.api = api
        self.callers = callers
        self.admission = admission
        self.access = access
        self.pool = pool
        self.documents = documents
        self.screening = screening
        self.forwarder = forwarder
        self.max_body_bytes = config.gateway.max_body_bytes
        self.max_json_depth = config.screening.max_json_depth
        self.retry_after_s = config.gateway.retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.api(scope, receive, send)
            return
        if scope["method"] != "POST":
            raise MethodNotAllowed("method not allowed on this endpoint", headers={"allow": "POST"})
        request = Request(scope, receive)
        record = request_record(request)
        assert record is not None, "MetricsMiddleware gives every /v1/ request a record"
        principal = await self.callers.identify(request)
        async with self.admission.user_limits(principal):
            body = await read_body(request, self.max_body_bytes)
            payload = parse_request(body, self.max_json_depth)
            model = self._authorize(principal, payload, record)
            size = len(body)
            async with cancelled_when_client_leaves(receive):  # a client that leaves stops a render too
                documents = route == "chat" and has_file_parts(payload)
                if documents:  # documents become page images (and text)
                    await self._prescreen(route, payload, principal, size)
                    size += await self.documents.expand(payload)
                forwarded = await self._screen(scope["path"], route, payload, principal, size, documents)
                queued_at = time.perf_counter()
                async with self.admission.queue(model).slot(principal.key, forwarded.cost):
                    record.admitted(queued_at)
                    await self.forwarder.forward(forwarded, record, send, server_send(scope))

    def _authorize(self, principal: Principal, payload: dict[str, Any], record: RequestRecord) -> str:
        """The model asked for, if ``principal`` may use it and a replica serves it."""
        model: str = payload["model"]
        # Only a name an engine serves becomes a metric label; anything else a client typed is "unknown".
        record.identified(model if self.pool.knows(model) else UNKNOWN_MODEL, payload.get("stream") is True)
        shown = model if len(model) <= 100 else model[:100] + "..."
        if not self.access.allows(principal, model):
            if self.access.hide_denied:
                raise ModelNotFound(f"the model '{shown}' does not exist", param="model")
            raise PermissionDenied(f"you are not allowed to use the model '{shown}'", param="model",
                                   code="model_not_allowed")
        if not self.pool.can_serve(model):
            if not self.pool.any_healthy:
                raise EngineUnavailable("the model engines are not ready yet; try again shortly",
                                        retry_after_s=self.retry_after_s)
            if not self.pool.knows(model):
                raise ModelNotFound(f"the model '{shown}' does not exist", param="model")
        return model

    async def _prescreen(self, route: Route, payload: dict[str, Any], principal: Principal, size: int) -> None:
        """Screen the request with its ``file`` parts as empty text parts (in their places, so that a refusal names
        the same part), before any page is rendered: a request screening will refuse anyway (a field, a
        ``max_tokens`` above the limit, a bad image) costs no render worker. ``payload`` is left as it is."""
        messages = [{**message, "content": [{"type": "text", "text": ""} if isinstance(part, dict) and
                                            part.get("type") == "file" else part for part in message["content"]]}
                    if isinstance(message, dict) and isinstance(message.get("content"), list) else message
                    for message in payload["messages"]]
        await screened(self.screening, route, {**payload, "messages": messages}, principal, size)

    async def _screen(self, path: str, route: Route, payload: dict[str, Any], principal: Principal,
                      size: int, documents: bool = False) -> EngineRequest:
        # Token counts for the metrics: a stream is asked to end with them (removed again if the client did not ask).
        remove_usage = ask_for_usage(payload)
        checked = await screened(self.screening, route, payload, principal, size)
        cost = self.admission.estimate_cost(payload, checked.image_sizes)
        constraints = payload.get("structured_outputs")
        grammar = isinstance(constraints, dict) and constraints.get("grammar") is not None
        return EngineRequest(path, checked.body, payload["model"], principal, checked.cache_salt, cost,
                             remove_usage, documents, grammar)


async def screened(screening: Screening, route: Route, payload: dict[str, Any], principal: Principal,
                   size: int) -> Screened:
    """``screening.screen`` of a request whose body is ``size`` bytes: on the event loop's thread below
    ``SCREEN_INLINE_BYTES``, else in a worker thread. Raises what screening raises (``InvalidRequest`` and kin)."""
    if size < SCREEN_INLINE_BYTES:
        return screening.screen(route, payload, principal)
    return await anyio.to_thread.run_sync(screening.screen, route, payload, principal)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes (before reading it all).

    Raises ``UnsupportedMediaType`` for a compressed body: decoding it would need a second limit on the decoded
    size, and the SDKs never compress requests.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType("request bodies must not be compressed (Content-Encoding: identity only)",
                                   code="unsupported_content_encoding")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    # The ASGI messages read here as Starlette's Request.stream() reads them (a client gone: ClientDisconnect), with
    # plain awaits: its async generator cost about as much again per request (py-spy under tests/bench/gateway_cpu).
    receive = request.receive
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
    return b"".join(chunks)  # one copy (a growing bytearray and bytes() of it made several); none for one chunk


class cancelled_when_client_leaves:
    """Run the block under a watch for the client going away (``http.disconnect``), which cancels it at once.

    A plain task and ``Task.cancel`` rather than an anyio task group, and a class rather than a generator-based
    context manager: the same watch at a fraction of the cost per request (py-spy under ``make bench``). Any other
    cancellation (a shutdown) is passed on.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._client_left = False
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._client_left = True
        assert self._task is not None
        self._task.cancel()

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch(), name="airlock-disconnect-watch")

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> bool:
        assert self._watcher is not None and self._task is not None
        # Forgotten before it is cancelled: the cancelled watcher keeps its CancelledError, whose traceback holds
        # _watch's frame and so this object; a reference back to the watcher would make a cycle that keeps both
        # tasks and the whole request's objects alive until a full garbage collection (tens of ms on the event loop
        # under the department benchmark, which found ~2 cycles a request in the oldest generation).
        watcher, self._watcher = self._watcher, None
        watcher.cancel()
        # Swallowed only when the client's leaving caused it (and nothing else asked to cancel this task too).
        cancelled = kind is not None and issubclass(kind, asyncio.CancelledError)
        return cancelled and self._client_left and self._task.uncancel() == 0
