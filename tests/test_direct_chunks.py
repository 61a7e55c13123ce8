"""``server.direct_chunks`` on real uvicorn: the chunks it writes are the bytes uvicorn's own ``send`` writes, it is
used only where that holds, it stops at a client's full buffer and notices a client that left.

The app here is a few lines of ASGI written for these tests; the relay's own use of it, behind the real gateway, is
tested in ``test_relay_bytes`` (and by every streamed answer of the real-engine tests).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from starlette.types import Receive, Scope, Send

from server.direct_chunks import DirectChunks

from .servers import ThreadedServer, free_port

PIECES = [b"data: one\n\n", b"data: two\n\n" * 40, b"x" * 70_000, b"data: [DONE]\n\n"]
BIG = b"y" * 65536


class App:
    """/send: the pieces through ``send``; /direct: the same through ``DirectChunks``; /sized: a response with a
    Content-Length; /flood: 64 KiB chunks until the client's buffer is full, then until the client reads; /left:
    one chunk, then waits for the client to leave; /closing: one chunk, then closes the connection itself."""

    def __init__(self) -> None:
        self.found: dict[str, bool] = {}
        self.writes_before_full = 0
        self.drained = threading.Event()
        self.left = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/sized":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            self.found[path] = DirectChunks.of(send) is not None
            await send({"type": "http.response.body", "body": b"ok"})
            return
        self.found["before the start"] = DirectChunks.of(send) is not None
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        direct = DirectChunks.of(send)
        self.found[path] = direct is not None
        if path == "/send" or direct is None:
            for piece in PIECES:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        elif path == "/direct":
            for piece in PIECES:
                assert direct.write(piece)
        elif path == "/flood":
            while direct.write(BIG):
                self.writes_before_full += 1
                assert self.writes_before_full < 4096, "a client that reads nothing never filled the buffer"
            await direct.drain()
            self.drained.set()
        elif path == "/closing":
            assert direct.write(PIECES[0])
            self.found["closing"] = direct.gone
            cycle = send.__self__  # type: ignore[attr-defined]
            cycle.transport.close()  # as when a write failed: uvicorn hears of it a loop step later
            self.found["closed"] = direct.gone and not direct.write(PIECES[0]) and not cycle.disconnected
        elif path == "/left":
            assert direct.write(PIECES[0])
            while not direct.gone:
                await asyncio.sleep(0.01)
            assert not direct.write(PIECES[0])
            self.left.set()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture(params=["httptools", "h11"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[App, int, str]]:
    app, port = App(), free_port()
    with ThreadedServer(app, host="127.0.0.1", port=port, http=request.param):
        yield app, port, request.param


def raw_get(port: int, path: str) -> bytes:
    """The response's bytes as they crossed the socket (the chunked framing included), to its last chunk."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nhost: a\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            part = client.recv(65536)
            assert part, data[-200:]
            data += part
    return data.split(b"\r\n\r\n", 1)[1]  # the body: the head holds a date


def test_the_direct_chunks_are_the_bytes_uvicorns_send_writes(served: tuple[App, int, str]) -> None:
    app, port, http = served
    via_send, direct = raw_get(port, "/send"), raw_get(port, "/direct")
    assert via_send == direct
    assert via_send.startswith(b"b\r\ndata: one\n\n\r\n") and via_send.endswith(b"\r\n0\r\n\r\n")
    # Used on uvicorn's httptools protocol, once a chunked response has started; elsewhere the chunks go through
    # send (h11 frames them itself).
    assert app.found == {"before the start": False, "/send": http == "httptools", "/direct": http == "httptools"}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET /sized HTTP/1.1\r\nhost: a\r\n\r\n")
        assert client.recv(65536).endswith(b"\r\n\r\nok")
    assert app.found["/sized"] is False


def test_a_client_that_reads_nothing_stops_the_writes_and_its_reading_lets_them_on() -> None:
    app, port = App(), free_port()
    with (ThreadedServer(app, host="127.0.0.1", port=port, http="httptools"),
          socket.create_connection(("127.0.0.1", port), timeout=10) as client):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(b"GET /flood HTTP/1.1\r\nhost: a\r\n\r\n")
        deadline = time.monotonic() + 10
        while not app.writes_before_full and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert not app.drained.is_set()  # the writes wait for the client
        written = app.writes_before_full + 1
        assert written * len(BIG) < 16 << 20  # stopped at the buffer, not after everything
        received = 0
        while not app.drained.is_set() and time.monotonic() < deadline:
            received += len(client.recv(1 << 20))
        assert app.drained.is_set() and received > 0


def test_a_client_that_left_is_noticed_and_written_no_more() -> None:
    app, port = App(), free_port()
    with ThreadedServer(app, host="127.0.0.1", port=port, http="httptools"):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /left HTTP/1.1\r\nhost: a\r\n\r\n")
        assert b"data: one" in client.recv(65536)
        client.close()
        assert app.left.wait(10)


def test_a_connection_closing_before_uvicorn_hears_of_it_is_gone_already() -> None:
    """A transport whose write failed closes at once and tells uvicorn a loop step or two later (later still over
    TLS): writes in between would each log a warning, so the connection counts as gone from the start."""
    app, port = App(), free_port()
    with ThreadedServer(app, host="127.0.0.1", port=port, http="httptools"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /closing HTTP/1.1\r\nhost: a\r\n\r\n")
            data = b""
            while part := client.recv(65536):
                data += part
        assert b"data: one" in data
        deadline = time.monotonic() + 10
        while "closed" not in app.found and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.found["closing"] is False and app.found["closed"] is True
