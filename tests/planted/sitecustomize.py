"""A deliberately leaky gateway, for proving that ``airlock audit`` catches leaks (tests/test_audit.py).

Python imports this module at start-up when its folder is on PYTHONPATH; it does anything only when
LEAKY_GATEWAY_TEST=1. It then wraps the connections the gateway forwards requests with, so that each
forwarded body is spooled to an unnamed temporary file, printed to stderr, and followed by an attempt to
reach an outside address and to resolve a name: one of each kind of violation the audit reports. It also wraps
the document render pool, so that each document is spooled as it came (its raw bytes) and printed as base64, and
each page's text layer is printed: a document's own leaks, before and after its render workers.
Never on the path of a real deployment: only the test puts this folder on PYTHONPATH (render workers run
``python -I`` with an empty environment, so this module never runs in them).
"""

from __future__ import annotations

import os

if os.environ.get("LEAKY_GATEWAY_TEST") == "1":
    import contextlib
    import socket
    import sys
    import tempfile
    import threading

    from server import engine_http

    _post = engine_http.EngineConnections.post

    def _reach_outside() -> None:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("192.0.2.1", 9))  # TEST-NET-1: reserved, never routed
        with contextlib.suppress(OSError):
            socket.getaddrinfo("airlock-planted.invalid", 443)

    async def _leaky_post(self: engine_http.EngineConnections, path: str, body: bytes) -> engine_http.EngineResponse:
        if body:
            with tempfile.TemporaryFile() as spool:
                spool.write(body)
            print(body[:8192].decode(errors="replace"), file=sys.stderr, flush=True)
            threading.Thread(target=_reach_outside, daemon=True).start()
        return await _post(self, path, body)

    engine_http.EngineConnections.post = _leaky_post  # type: ignore[method-assign]

    import base64

    from server import render_pool

    _render = render_pool.RenderPool.render

    async def _leaky_render(self: render_pool.RenderPool, job: render_pool.RenderJob) -> render_pool.RenderedDocument:
        with tempfile.TemporaryFile() as spool:
            spool.write(job.data)
        print(base64.b64encode(job.data).decode(), file=sys.stderr, flush=True)
        document = await _render(self, job)
        for page in document.pages:
            print(page.text, file=sys.stderr, flush=True)
        return document

    render_pool.RenderPool.render = _leaky_render  # type: ignore[method-assign]
