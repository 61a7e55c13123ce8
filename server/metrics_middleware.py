"""Pure ASGI middleware that gives every API request a ``RequestRecord`` and observes it when the request ends.

It is the outermost layer of the API, so it also keeps the server's own ``send`` for the engine routes' streamed
chunks (``server_send``)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import GatewayMetrics, RequestRecord

# The OpenAI routes, by the name their metrics carry (/v1/models/{id} is "models" too); any other /v1/ path is
# "other" (answered 404).
API_ROUTES = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/v1/airlock/privacy": "privacy",
    "/v1/airlock/documents/preview": "document_preview",
}
RECORD = "airlock_request_record"
SERVER_SEND = "airlock_server_send"


def request_record(request: Request) -> RequestRecord | None:
    """The record of an API request (None for probes and other paths, which are not counted)."""
    record = request.scope.get("state", {}).get(RECORD)
    return record if isinstance(record, RequestRecord) else None


def server_send(scope: Scope) -> Send:
    """The server's own ``send``, for the body chunks of a response between its start and its last message.

    Every layer between the server and the engine routes (this one, ``hsts``, ``boundary``) acts on a response's
    start message and its last one only, so the chunks in between may skip them: one coroutine call less per layer
    and chunk (py-spy under ``tests/bench/gateway_cpu``). The start and the last message still go through them.
    """
    send: Send = scope["state"][SERVER_SEND]
    return send


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        route = API_ROUTES.get(path) or ("models" if path.startswith("/v1/models/") else "other")
        record = RequestRecord(route=route, arrived=time.perf_counter())
        state = scope.setdefault("state", {})
        state[RECORD] = record
        state[SERVER_SEND] = send
        # A request that ends with no answer at all (the client left first) counts as 499, as nginx logs it.
        status = 499

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.requests_in_flight += 1
        self.metrics.requests_started += 1
        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.requests_in_flight -= 1
            self.metrics.requests_finished += 1
            self.metrics.finish(record, status)
