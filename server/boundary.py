"""The one error boundary of the API: every refusal and failure leaves through here.

``ErrorBoundary`` wraps ``send`` to know whether the response has started (as Starlette's
``wrap_app_handling_exceptions`` does). An ``AirlockError`` that escapes becomes OpenAI's error body with its own
status before the first byte, or a final SSE error event after it; anything else is a bug in the gateway: a 500 that
reveals nothing (or the same error event), re-raised so that uvicorn logs the traceback (which holds no content).
FastAPI's own routes, whose errors FastAPI catches first, hand them to the same ``refusal``.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .console import CONSOLE_HEADER
from .errors import AirlockError, error_response
from .metrics import GatewayMetrics

UNEXPECTED = AirlockError("internal error in the gateway")


def refusal(error: AirlockError, scope: Scope, metrics: GatewayMetrics) -> Response:
    """The answer to ``error`` for a response that has not started; a refusal is counted by its reason."""
    metrics.rejected(error)
    headers = error.headers
    if "www-authenticate" in headers and _from_console(scope):
        # The console signs in with its own form: a challenge would make the browser pop up its password box.
        headers = {name: value for name, value in headers.items() if name != "www-authenticate"}
    return error_response(error.status, error.message, error.type, error.code, error.param, headers)


def _from_console(scope: Scope) -> bool:
    marker = CONSOLE_HEADER.encode()
    return any(name == marker for name, _ in scope.get("headers", ()))


class ErrorBoundary:
    """Pure ASGI middleware around the whole API (see the module docstring)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The response's start message once sent (None before), and whether its last byte went.
        started: Message | None = None
        ended = False

        async def send_noting_progress(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = message
            elif not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, send_noting_progress)
        except AirlockError as error:
            await self._render(error, scope, receive, send, started, ended=ended)
        except ClientDisconnect:
            pass  # the client left while its body was read: nobody to answer
        except Exception:
            await self._render(UNEXPECTED, scope, receive, send, started, ended=ended)
            raise

    async def _render(self, error: AirlockError, scope: Scope, receive: Receive, send: Send,
                      started: Message | None, *, ended: bool) -> None:
        if started is None:
            await refusal(error, scope, self.metrics)(scope, receive, send)
        elif not ended and _is_event_stream(started):
            # Only whole events went on before (the relay passes complete events), so this one starts cleanly.
            self.metrics.rejected(error)
            await send({"type": "http.response.body", "body": error.to_event(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # Any other answer cut short cannot say why: the server closes the connection, and the client sees it cut.


def _is_event_stream(start: Message) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in start["headers"])
