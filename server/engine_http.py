"""HTTP/1.1 to one engine for the data plane: a pool of kept-alive connections, each request written in one piece,
each answer parsed by httptools (llhttp, the parser of Node.js and, through uvicorn, of the gateway's own server side).

This replaced aiohttp's client here: under ``tests/bench`` (py-spy, whole requests at saturation) its request
machinery (URL and header objects, its payload registry, cookies, tracing hooks, a timer re-armed at every read) was
30% of the gateway's CPU per request, for features the relay never uses. What is ours is the request's head, the
pool and one timer a request; the HTTP parsing is llhttp's. The control plane (health, models, metrics) keeps httpx.

What the relay tells apart (``proxy._Exchange``):

- ``EngineRefused``: no connection could be made (refused, no socket, a failed TLS handshake): the engine is down.
- ``EngineDropped``: the connection ended, or none was made or free in time, before the answer's head was in:
  nothing reached the client, so another try is safe.
- ``EngineBroken``: the answer ended before its end, or was not HTTP.
- ``TimeoutError``: the engine was silent for ``read_timeout_s`` while the relay waited for it (bytes that wait for
  a slow client do not count as silence).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

# Shorter than the engine's own keep-alive (uvicorn's 5 s), so a connection it is closing is not reused.
KEEPALIVE_EXPIRY_S = 3.0
# Bytes of an answer held for a client slower than the engine before the engine's connection stops being read (TCP
# then slows the engine's sends); aiohttp's StreamReader paused at 128 KiB too.
PAUSE_READING_BYTES = 128 * 1024
# The longest answer head read: aiohttp's limits were 8190 bytes a line and 128 headers (aiohttp/client_proto.py).
MAX_HEAD_BYTES = 64 * 1024


class EngineHttpError(Exception):
    """The engine's connection failed; the subclasses say when. Messages name no address."""


class EngineRefused(EngineHttpError):
    """No connection: refused, no socket, or a TLS handshake that failed (``__cause__`` has the ``ssl.SSLError``)."""


class EngineDropped(EngineHttpError):
    """The connection ended, or none was made or free in time, before the answer's head was in."""


class EngineBroken(EngineHttpError):
    """The answer ended before its end, or was not HTTP."""


class EngineConnections:
    """The data plane's connections to one engine (``unix:/path``, ``http://host:port`` or ``https://host:port``,
    verified with ``tls``), at most ``max_connections`` open at once."""

    def __init__(self, url: str, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self._unix_path: str | None = None
        self._host = ""
        self._port = 0
        self._tls: ssl.SSLContext | None = None
        if url.startswith("unix:"):
            self._unix_path = url.removeprefix("unix:")
            host_header, prefix = "engine", ""
        else:
            parts = urlsplit(url)
            self._host = parts.hostname or ""
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
            if parts.scheme == "https":
                self._tls = tls or ssl.create_default_context()
            host_header, prefix = parts.netloc.rpartition("@")[2], parts.path.rstrip("/")
        self._prefix = prefix.encode("latin-1")
        self._head_end = (f"Host: {host_header}\r\nContent-Type: application/json\r\nAccept-Encoding: identity\r\n"
                          "Content-Length: ").encode("latin-1")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._max = max_connections
        self._open = 0
        self._idle: collections.deque[_Connection] = collections.deque()  # most recently used last: reused first
        self._waiting: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    async def post(self, path: str, body: bytes) -> EngineResponse:
        """Send ``body`` (JSON) to ``path``; returns once the answer's status and headers are in. Raises
        ``EngineHttpError`` or ``TimeoutError`` (module docstring); cancelling closes the connection."""
        connection = await self._connection()
        while connection.closed:  # closed by the engine as it was handed over: nothing was sent on it
            connection = await self._connection()
        head = b"POST %s%s HTTP/1.1\r\n%s%d\r\n\r\n" % (self._prefix, path.encode("latin-1"), self._head_end, len(body))
        return await connection.request(head, body, self.read_timeout_s)

    async def _connection(self) -> _Connection:
        idle, now = self._idle, asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_EXPIRY_S:
                return connection
            connection.close()
        if self._open < self._max:
            self._open += 1
            return await self._dial()
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            async with asyncio.timeout(self.read_timeout_s):
                handed = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:  # handed over as it ended
                self._pass_on(waiter.result())
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise EngineDropped("no connection to the engine was free in time") from None
            raise
        # A connection whose answer has ended, or (None) the place of one that closed, to open a new one in.
        return handed if handed is not None else await self._dial()

    async def _dial(self) -> _Connection:
        """Open a connection in a place already counted in ``_open``."""
        loop = asyncio.get_running_loop()
        made: list[_Connection] = []

        def connection() -> _Connection:
            made.append(_Connection(self))
            return made[0]

        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._unix_path is not None:
                    await loop.create_unix_connection(connection, self._unix_path)
                else:
                    # A fully qualified name's final dot is not in its certificate (as aiohttp and browsers do).
                    await loop.create_connection(connection, self._host, self._port, ssl=self._tls,
                                                 server_hostname=self._host.rstrip(".") if self._tls else None)
        except BaseException as exc:
            if made:
                made[0].close()  # gives its place up once
            else:
                self._place_freed()
            if isinstance(exc, TimeoutError):
                raise EngineDropped("no connection to the engine in time") from None
            if isinstance(exc, OSError):  # refused, no socket, unreachable; ssl.SSLError is one too
                raise EngineRefused("the engine refused the connection") from exc
            raise
        return made[0]

    def _place_freed(self) -> None:
        """A connection closed (or was never made): its place goes to a waiter, which opens its own, or is freed."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    def _pass_on(self, connection: _Connection | None) -> None:
        """A connection (or a place, None) handed to a request that no longer wants it."""
        if connection is None:
            self._place_freed()
        else:
            self._reuse(connection)

    def _reuse(self, connection: _Connection) -> None:
        """A connection whose answer has ended, ready for the next request."""
        if self._closed:
            connection.close()
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        idle, now = self._idle, asyncio.get_running_loop().time()
        connection.idle_since = now
        idle.append(connection)
        while now - idle[0].idle_since >= KEEPALIVE_EXPIRY_S:  # the oldest, unused since a burst: closed
            idle.popleft().close()

    async def close(self) -> None:
        """Idle connections close now, the others as their answers end; waiting requests are dropped."""
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(EngineDropped("the gateway is stopping"))


class EngineResponse:
    """An engine's answer: ``status``, ``headers`` (names in lower case), and its body as it arrives."""

    __slots__ = ("_buffered", "_chunks", "_complete", "_connection", "_error", "_held", "_sink", "_waiter", "headers",
                 "status")

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._held = False

    async def readany(self) -> bytes:
        """What has arrived since the last read, waiting for something if nothing has; b"" at the end. Raises
        ``EngineBroken`` or ``TimeoutError``."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered >= PAUSE_READING_BYTES:
            self._connection.resume_reading()
        self._buffered = 0
        return data

    def relay_to(self, sink: Callable[[bytes], bool]) -> None:
        """From now on the body goes to ``sink`` as it arrives, called from the connection's own callback, rather
        than to ``readany``: no task wakes up per chunk (``direct_chunks`` says why). What has arrived
        already goes first. ``sink`` returns False to stop the engine's connection from being read (a client that
        is slower than the engine, or a stream that is to end); ``relayed`` then returns and ``resume`` reads on."""
        self._sink = sink
        self._buffered = 0  # counted for readany only
        self.resume()

    async def relayed(self) -> bool:
        """Wait, while ``relay_to``'s sink takes the body, for the end (True) or for the sink to stop (False).
        Raises ``EngineBroken`` or ``TimeoutError``."""
        while True:
            if self._held:  # before the end: bytes may still wait to be given to the sink
                return False
            if self._error is not None:
                raise self._error
            if self._complete:
                return True
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def resume(self) -> None:
        """Read on after the sink stopped (``relayed`` returned False): what arrived with the bytes that stopped it
        (or, from ``relay_to``, before the sink was there) goes first."""
        self._held = False
        sink = self._sink
        if self._chunks and sink is not None:
            data = b"".join(self._chunks)
            self._chunks.clear()
            if not sink(data):
                self._hold()
                return
        self._connection.resume_reading()

    def _hold(self) -> None:
        self._held = True
        self._connection.pause_reading()
        self._wake()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def at_eof(self) -> bool:
        """The whole answer has arrived and been read."""
        return self._complete and not self._chunks and self._error is None

    def release(self) -> None:
        """Done with the answer: its connection serves the next request if the answer ended cleanly, else closes."""
        connection = self._connection
        if connection._response is self:  # once only: the connection may serve another request by now
            connection.finished(reusable=self.at_eof())

    def close(self) -> None:
        """Done with the answer before its end: the connection is closed (vLLM then aborts the request)."""
        connection = self._connection
        if connection._response is self:
            connection.finished(reusable=False)

    # Called by the connection.
    def _feed(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            if not self._held and not sink(data):
                self._hold()
            elif self._held:  # arrived in the same read as the bytes that stopped the sink: given to it on resume
                self._chunks.append(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= PAUSE_READING_BYTES:
            self._connection.pause_reading()
        self._wake()

    def _end(self, error: BaseException | None) -> None:
        if error is None:
            self._complete = True
        elif not self._complete and self._error is None:  # the first error says what happened
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _silent(self) -> bool:
        """Whether the relay is waiting for the engine (not the other way round)."""
        return not self._chunks and not self._held and not self._complete and self._error is None


class _Connection(asyncio.Protocol):
    """One connection, one request at a time (no pipelining), and the parser's callbacks."""

    def __init__(self, pool: EngineConnections) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.idle_since = 0.0
        self._counted = True  # in the pool's open connections
        # The request under way.
        self._headers: dict[str, str] = {}
        self._started: asyncio.Future[EngineResponse] | None = None
        self._response: EngineResponse | None = None
        self._until_eof = False  # an answer with neither Content-Length nor chunks ends when the connection does
        self._keep_alive = False  # the answer ended, and the engine keeps the connection open for the next one
        self._last_heard = 0.0
        self._timeout_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._head_bytes = 0  # of an answer head not complete yet
        self._interim = False  # the message being parsed is a 1xx
        self._body: list[bytes] = []  # the answer's body pieces of one read, given to it together

    async def request(self, head: bytes, body: bytes, timeout_s: float) -> EngineResponse:
        assert self._transport is not None
        if self.closed:  # closed by the engine as it was handed over (its place is already free): nothing was sent
            raise EngineDropped("the engine closed the connection before the request")
        self._head_bytes = 0
        self._interim = False
        self._body.clear()
        self._headers = {}
        self._response = None
        self._until_eof = False
        self._keep_alive = False
        self._started = self._loop.create_future()
        if len(body) < 65536:
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))  # on uvloop, the large body is not copied
        self._timeout_s = timeout_s
        self._last_heard = self._loop.time()
        self._timer = self._loop.call_at(self._last_heard + timeout_s, self._check_silence)
        try:
            return await self._started
        except BaseException:
            self.finished(reusable=False)
            raise

    def finished(self, reusable: bool) -> None:
        """The request is over: the connection goes back to the pool (``reusable``) or is closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._response = None
        self._started = None
        if reusable and self._keep_alive and not self.closed:
            self.resume_reading()  # a sink may have stopped it at the answer's last bytes (an error event)
            self._pool._reuse(self)
        else:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._lost()

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self.closed and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _check_silence(self) -> None:
        """The engine's longest silence, with one timer a request rather than one a read."""
        response = self._response
        if response is not None and not response._silent():  # bytes wait for the client, or the answer is in
            left = self._timeout_s
        else:
            left = self._timeout_s - (self._loop.time() - self._last_heard)
        if left > 0:
            self._timer = self._loop.call_later(left, self._check_silence)
            return
        self._timer = None
        self._fail(TimeoutError("the engine was silent for longer than the read timeout"))
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: BaseException) -> None:
        started = self._started
        if started is not None and not started.done():
            started.set_exception(error)
        elif self._response is not None:
            self._response._end(error)

    def _lost(self) -> None:
        self.closed = True
        if self._counted:
            self._counted = False
            self._pool._place_freed()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._started is None:  # bytes with no request under way: not an engine to keep talking to
            self.close()
            return
        self._last_heard = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # the latter is no HttpParserError
            self._give_body()
            self._fail(EngineBroken("the engine's answer was not HTTP"))
            self.close()
            return
        self._give_body()
        if self._response is None and not self.closed:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(EngineBroken("the engine's answer head was too long"))
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        response = self._response
        if response is not None and self._until_eof and exc is None:
            response._end(None)
        elif self._started is not None and not self._started.done():
            dropped = EngineDropped("the engine closed the connection before answering")
            dropped.__cause__ = exc  # a TLS alert (a client certificate refused after a TLS 1.3 handshake) says why
            self._fail(dropped)
        else:
            self._fail(EngineBroken("the engine closed the connection before the end of its answer"))
        self._lost()

    # httptools' callbacks (names given by httptools.HttpResponseParser)
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_begin(self) -> None:
        if self._response is not None:  # a second answer to one request: the connection is not to be trusted
            raise EngineBroken("more than one answer")

    def on_headers_complete(self) -> None:
        headers = self._headers
        if 100 <= self._parser.get_status_code() < 200:  # interim (RFC 9110 15.2), skipped as aiohttp did
            self._interim, self._headers = True, {}
            return
        self._until_eof = ("content-length" not in headers
                           and "chunked" not in headers.get("transfer-encoding", "").lower())
        self._response = EngineResponse(self, self._parser.get_status_code(), headers)
        if self._started is not None and not self._started.done():
            self._started.set_result(self._response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._body.append(body)

    def _give_body(self) -> None:
        """What one read held of the body (one piece per chunk of the engine's chunked framing, several where the
        engine was quicker than the gateway) goes to the answer in one piece: the relay then handles and writes it
        once, as it did when it read whatever had arrived."""
        body = self._body
        if body:
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            if self._response is not None:
                self._response._feed(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._give_body()  # before the end is marked
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the next message may begin
        if self._response is not None:
            self._response._end(None)
