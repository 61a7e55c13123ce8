"""Strict-Transport-Security on every answer that travelled over TLS, streamed ones included.

A pure ASGI middleware around the whole gateway (the engine routes bypass FastAPI, so a FastAPI middleware would miss
them): it adds the header to the ``http.response.start`` message, before a byte of the body is sent. The scheme is
the connection's own (``https`` when uvicorn serves TLS), or the one a trusted proxy named in X-Forwarded-Proto
(uvicorn's proxy-headers layer, outside this one, sets it only for ``gateway.trusted_proxies``). Answers over plain
HTTP never carry it: browsers ignore it there (RFC 6797, 8.1) and it would only mislead.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class StrictTransportSecurity:
    def __init__(self, app: ASGIApp, max_age_s: int) -> None:
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive (leave the middleware out for no header)")
        self.app = app
        self.header = (b"strict-transport-security", f"max-age={max_age_s}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def with_hsts(app: ASGIApp, max_age_s: int) -> ASGIApp:
    """``app`` with the header added over TLS, or ``app`` itself when ``max_age_s`` is 0 (no header wanted)."""
    return StrictTransportSecurity(app, max_age_s) if max_age_s > 0 else app
