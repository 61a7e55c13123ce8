"""The data plane's HTTP client (``server.engine_http``) against engines that misbehave on cue.

The engines here are small asyncio servers on unix sockets written for these tests: a fake where a real part cannot do
the job (a real vLLM does not close a connection, stall or send garbage when asked). What vLLM really sends goes
through this client in every real-engine test of the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from server.engine_http import (
    PAUSE_READING_BYTES,
    EngineBroken,
    EngineConnections,
    EngineDropped,
    EngineRefused,
    EngineResponse,
)

# The gateway runs on uvloop (server/runtime.py), and on asyncio's own loop where uvloop is missing: both are tested.
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def on_each_loop(test: Callable[[Path], Coroutine[Any, Any, None]]) -> Callable[[str, Path], None]:
    """The async ``test`` as a test run on each event loop."""
    @pytest.mark.parametrize("loop", sorted(LOOPS))
    def run(loop: str, tmp_path: Path) -> None:
        LOOPS[loop](test(tmp_path))

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Engine:
    """A scripted engine: ``handler`` answers each connection; what it saw is kept for the test."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and body); None once the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
            return None
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        self.heads.append(head)
        self.bodies.append(body)
        return body


@contextlib.asynccontextmanager
async def engine(tmp_path: Path, handler: Callable[[Engine, asyncio.StreamReader, asyncio.StreamWriter],
                                                    Awaitable[None]],
                 **options: float) -> AsyncIterator[tuple[Engine, EngineConnections]]:
    socket = tmp_path / "engine.sock"
    scripted = Engine(lambda reader, writer: handler(scripted, reader, writer))
    server = await asyncio.start_unix_server(scripted.serve, path=str(socket))
    settings = {"connect_timeout_s": 2.0, "read_timeout_s": 5.0, "max_connections": 8, **options}
    connections = EngineConnections(f"unix:{socket}", connect_timeout_s=settings["connect_timeout_s"],
                                    read_timeout_s=settings["read_timeout_s"],
                                    max_connections=int(settings["max_connections"]))
    try:
        yield scripted, connections
    finally:
        await connections.close()
        server.close()
        await server.wait_closed()


def whole(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def echo_forever(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its own body."""
    while (body := await scripted.read_request(reader)) is not None:
        writer.write(whole(body))
        await writer.drain()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@on_each_loop
async def test_requests_reuse_one_kept_alive_connection_and_carry_only_the_gateways_headers(tmp_path: Path) -> None:
    async with engine(tmp_path, echo_forever) as (scripted, connections):
        for number in range(3):
            body = b'{"n": %d}' % number
            response = await connections.post("/v1/chat/completions", body)
            assert (response.status, response.headers["content-type"]) == (200, "application/json")
            assert await response.read() == body
            assert response.at_eof()
            response.release()
        assert scripted.connections == 1
        head = scripted.heads[0].decode("latin-1").lower()
        assert head.startswith("post /v1/chat/completions http/1.1\r\n")
        names = sorted(line.split(":")[0] for line in head.split("\r\n")[1:] if line)
        assert names == ["accept-encoding", "content-length", "content-type", "host"]
        assert "user-agent" not in head


@on_each_loop
async def test_a_large_body_reaches_the_engine_whole(tmp_path: Path) -> None:
    body = b'{"x": "' + bytes(range(48, 58)) * 400_000 + b'"}'  # 4 MB, written without a copy
    async with engine(tmp_path, echo_forever) as (scripted, connections):
        response = await connections.post("/v1/chat/completions", body)
        assert await response.read() == body
        assert scripted.bodies == [body]


@on_each_loop
async def test_a_stream_arrives_as_it_is_sent_and_ends(tmp_path: Path) -> None:
    sent: list[asyncio.Event] = [asyncio.Event() for _ in range(3)]

    async def stream(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD)
        for number, event in enumerate(sent):
            await event.wait()
            writer.write(chunk(b"data: %d\n\n" % number))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await scripted.read_request(reader)

    async with engine(tmp_path, stream) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        assert response.headers["content-type"] == "text/event-stream"
        for number, event in enumerate(sent):
            event.set()
            assert await response.readany() == b"data: %d\n\n" % number  # the chunk, not the chunked framing
        assert await response.readany() == b""
        assert response.at_eof()


async def assert_the_connection_serves_the_next_request(response: EngineResponse, connections: EngineConnections,
                                                       scripted: Engine) -> None:
    """``response`` given back: its kept-alive connection (the only one made) answers the next request."""
    response.release()
    again = await connections.post("/v1/chat/completions", b"next")
    assert await again.read() == b"next"
    assert scripted.connections == 1


@on_each_loop
async def test_a_sink_gets_the_stream_from_the_connections_callback_what_had_arrived_first(tmp_path: Path) -> None:
    """``relay_to``: the chunks go to the sink as they arrive (no ``readany``), those read before it first, in
    order; ``relayed`` returns True at the end, and the connection serves the next request."""
    sent = asyncio.Event()

    async def stream(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: 0\n\n") + chunk(b"data: 1\n\n"))
        await sent.wait()
        for number in range(2, 5):
            writer.write(chunk(b"data: %d\n\n" % number))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await echo_forever(scripted, reader, writer)

    async with engine(tmp_path, stream) as (scripted, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        await asyncio.sleep(0.1)  # the first two chunks are in before the sink is
        got: list[bytes] = []
        response.relay_to(lambda data: got.append(data) is None)
        assert b"".join(got) == b"data: 0\n\ndata: 1\n\n"
        sent.set()
        assert await response.relayed() is True
        assert b"".join(got) == b"".join(b"data: %d\n\n" % number for number in range(5))
        assert len(got) >= 4  # given as they came, not gathered at the end
        await assert_the_connection_serves_the_next_request(response, connections, scripted)


@on_each_loop
async def test_the_chunks_of_one_read_reach_the_relay_as_one_piece(tmp_path: Path) -> None:
    """An engine quicker than the gateway sends many chunks before the gateway reads: they reach the relay (a sink
    or ``readany``) together, so it handles and writes them once, not once per chunk of the engine's framing."""
    events = [b"data: %d\n\n" % number for number in range(50)]
    go = asyncio.Event()

    async def burst(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await scripted.read_request(reader)
            writer.write(STREAM_HEAD)
            await writer.drain()
            await go.wait()
            writer.write(b"".join(chunk(event) for event in events) + b"0\r\n\r\n")
            await writer.drain()

    async with engine(tmp_path, burst) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        got: list[bytes] = []
        response.relay_to(lambda data: got.append(data) is None)  # in place before the burst arrives
        go.set()
        assert await response.relayed() is True
        assert b"".join(got) == b"".join(events) and len(got) <= 2
        response.release()
        again = await connections.post("/v1/chat/completions", b"{}")
        reads = []
        while data := await again.readany():
            reads.append(data)
        assert b"".join(reads) == b"".join(events) and len(reads) <= 2


@on_each_loop
async def test_a_sink_that_stops_holds_the_engine_back_until_resumed(tmp_path: Path) -> None:
    """A sink that returns False (a client slower than the engine) stops the engine's connection from being read:
    nothing more reaches it, the engine's bytes wait at the engine (not in the gateway), the wait is not the
    engine's silence, and ``resume`` gives it the rest in order."""
    held: list[int] = []

    async def flood(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD)
        for number in range(64):
            writer.write(chunk(bytes([65 + number % 26]) * 65536))  # 4 MiB
        await asyncio.sleep(1.0)
        held.append(writer.transport.get_write_buffer_size())
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await scripted.read_request(reader)

    async with engine(tmp_path, flood, read_timeout_s=0.5) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        got: list[bytes] = []
        response.relay_to(lambda data: got.append(data) is not None)  # stops after each read
        assert await response.relayed() is False
        taken = len(b"".join(got))
        await asyncio.sleep(1.5)  # three read timeouts: the sink, not the engine, is what waits
        assert len(b"".join(got)) == taken  # nothing reached the sink while it was stopped
        assert held and held[0] > 2 * 1024 * 1024  # most of it still waits at the engine
        while True:
            response.resume()
            if await response.relayed():
                break
        body = b"".join(got)
        assert body == b"".join(bytes([65 + number % 26]) * 65536 for number in range(64))


@on_each_loop
async def test_a_connection_whose_sink_stopped_at_the_last_bytes_serves_the_next_request(tmp_path: Path) -> None:
    """A sink that stops at the answer's last bytes (an error event, which ends the relay) leaves a connection that
    was stopped from being read: given back whole, it is read again for the next request."""
    async def short(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: error\n\n") + b"0\r\n\r\n")
        await echo_forever(scripted, reader, writer)

    async with engine(tmp_path, short, read_timeout_s=1.0) as (scripted, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        response.relay_to(lambda data: False)
        assert await response.relayed() is False
        await asyncio.sleep(0.1)
        assert response.at_eof()
        await assert_the_connection_serves_the_next_request(response, connections, scripted)


@on_each_loop
async def test_no_engine_is_refused(tmp_path: Path) -> None:
    connections = EngineConnections(f"unix:{tmp_path / 'absent.sock'}", connect_timeout_s=1, read_timeout_s=1,
                                    max_connections=1)
    for _ in range(2):  # the failed attempt gave its place back
        with pytest.raises(EngineRefused) as refused:
            await connections.post("/v1/completions", b"{}")
        assert str(tmp_path) not in str(refused.value)


@on_each_loop
async def test_a_connection_closed_before_the_answer_is_dropped_and_its_place_freed(tmp_path: Path) -> None:
    async def close_at_once(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)

    async with engine(tmp_path, close_at_once, max_connections=1) as (scripted, connections):
        for _ in range(2):
            with pytest.raises(EngineDropped):
                await connections.post("/v1/completions", b"{}")
        assert scripted.connections == 2


@on_each_loop
async def test_an_answer_cut_short_is_broken(tmp_path: Path) -> None:
    async def cut(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()

    async with engine(tmp_path, cut) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        assert await response.readany() == b"data: 1\n\n"
        with pytest.raises(EngineBroken):
            await response.readany()
        assert not response.at_eof()


@on_each_loop
async def test_an_answer_that_is_not_http_is_broken(tmp_path: Path) -> None:
    async def garbage(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with engine(tmp_path, garbage) as (_, connections):
        with pytest.raises(EngineBroken):
            await connections.post("/v1/completions", b"{}")


@on_each_loop
async def test_an_answer_ended_by_closing_the_connection_is_whole(tmp_path: Path) -> None:
    async def close_delimited(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"a\": 1}")
        await writer.drain()

    async with engine(tmp_path, close_delimited) as (scripted, connections):
        response = await connections.post("/v1/completions", b"{}")
        assert await response.read() == b'{"a": 1}'
        assert response.at_eof()
        response.release()  # not kept: the engine closed it
        await (await connections.post("/v1/completions", b"{}")).read()
        assert scripted.connections == 2


@on_each_loop
async def test_an_engine_silent_before_its_answer_times_out_and_is_closed(tmp_path: Path) -> None:
    async def silent(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        await scripted.read_request(reader)  # returns when the client closes

    async with engine(tmp_path, silent, read_timeout_s=0.3) as (scripted, connections):
        with pytest.raises(TimeoutError):
            await connections.post("/v1/completions", b"{}")
        await asyncio.wait_for(scripted.closed_by_client.wait(), 5)  # vLLM aborts a request whose connection closes


@on_each_loop
async def test_an_engine_silent_mid_stream_times_out(tmp_path: Path) -> None:
    async def stalls(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await scripted.read_request(reader)

    async with engine(tmp_path, stalls, read_timeout_s=0.3) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        assert await response.readany() == b"data: 1\n\n"
        with pytest.raises(TimeoutError):
            await response.readany()


@on_each_loop
async def test_bytes_waiting_for_a_slow_reader_are_not_the_engines_silence(tmp_path: Path) -> None:
    async def quick(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        await writer.drain()
        await scripted.read_request(reader)

    async with engine(tmp_path, quick, read_timeout_s=0.5) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        await asyncio.sleep(1.2)  # the relay is busy (a slow client) for longer than the timeout, twice over
        assert await response.read() == b"data: 1\n\ndata: 2\n\n"


@on_each_loop
async def test_an_engine_faster_than_its_reader_is_held_back(tmp_path: Path) -> None:
    held: list[int] = []

    async def flood(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(STREAM_HEAD)
        for _ in range(64):
            writer.write(chunk(b"x" * 65536))  # 4 MiB
        await asyncio.sleep(1.0)
        held.append(writer.transport.get_write_buffer_size())
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await scripted.read_request(reader)

    async with engine(tmp_path, flood) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        await asyncio.sleep(1.5)  # nobody reads
        assert held and held[0] > 2 * 1024 * 1024  # most of it still waits at the engine, not in the gateway
        assert len(await response.read()) == 64 * 65536
    assert PAUSE_READING_BYTES < 1024 * 1024


@on_each_loop
async def test_requests_beyond_max_connections_wait_for_one(tmp_path: Path) -> None:
    async with engine(tmp_path, echo_forever, max_connections=1, read_timeout_s=0.5) as (scripted, connections):
        first = await connections.post("/v1/completions", b"1")
        second = asyncio.create_task(connections.post("/v1/completions", b"2"))
        await asyncio.sleep(0.1)
        assert not second.done()
        assert await first.read() == b"1"
        first.release()  # the connection goes straight to the waiting request
        answer = await second
        assert await answer.read() == b"2"
        answer.release()
        assert scripted.connections == 1
        held = await connections.post("/v1/completions", b"3")
        with pytest.raises(EngineDropped):  # none free within read_timeout_s
            await connections.post("/v1/completions", b"4")
        held.close()  # closed, not kept: its place is free again
        assert await (await connections.post("/v1/completions", b"5")).read() == b"5"


@on_each_loop
async def test_a_cancelled_request_closes_its_connection(tmp_path: Path) -> None:
    async def slow(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        await scripted.read_request(reader)

    async with engine(tmp_path, slow) as (scripted, connections):
        request = asyncio.create_task(connections.post("/v1/completions", b"{}"))
        await asyncio.sleep(0.2)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(scripted.closed_by_client.wait(), 5)


# What a proxy in front of an engine, or a broken engine, may send (found by review; aiohttp handled each).


@on_each_loop
async def test_an_interim_answer_is_skipped_and_each_request_gets_its_own_answer(tmp_path: Path) -> None:
    async def early_hints(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (body := await scripted.read_request(reader)) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(whole(b"for " + body))
            await writer.drain()

    async with engine(tmp_path, early_hints) as (scripted, connections):
        for user in (b"A", b"B"):
            response = await connections.post("/v1/completions", user)
            assert (response.status, await response.read()) == (200, b"for " + user)
            response.release()
        assert scripted.connections == 1


@on_each_loop
async def test_bytes_after_the_end_of_an_answer_keep_its_connection_from_serving_another(tmp_path: Path) -> None:
    async def stray(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (body := await scripted.read_request(reader)) is not None:
            extra = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 40\r\n\r\nSTALE"
            writer.write(whole(b"for " + body) + (extra if body == b"A" else b""))
            await writer.drain()

    async with engine(tmp_path, stray) as (scripted, connections):
        first = await connections.post("/v1/completions", b"A")
        assert await first.read() == b"for A"
        assert first.headers["content-type"] == "application/json"  # not the stray answer's
        first.release()
        second = await connections.post("/v1/completions", b"B")
        assert await second.read() == b"for B"
        assert scripted.connections == 2


@on_each_loop
async def test_an_endless_answer_head_is_broken_off(tmp_path: Path) -> None:
    async def endless(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-padding: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(4096):  # up to 64 MiB
                writer.write(b"a" * 16384)
                await writer.drain()

    async with engine(tmp_path, endless) as (_, connections):
        with pytest.raises(EngineBroken, match="head was too long"):
            await connections.post("/v1/completions", b"{}")


@on_each_loop
async def test_a_chunked_answer_cut_short_is_broken_whatever_the_spelling(tmp_path: Path) -> None:
    async def cut(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await writer.drain()

    async with engine(tmp_path, cut) as (_, connections):
        response = await connections.post("/v1/chat/completions", b"{}")
        with pytest.raises(EngineBroken):
            await response.read()


@on_each_loop
async def test_a_switch_of_protocols_is_broken(tmp_path: Path) -> None:
    async def upgrade(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await scripted.read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nxyz")
        await writer.drain()
        await reader.read()

    async with engine(tmp_path, upgrade) as (_, connections):
        with pytest.raises(EngineBroken):
            await connections.post("/v1/completions", b"{}")


@on_each_loop
async def test_releasing_an_answer_twice_leaves_the_next_request_alone(tmp_path: Path) -> None:
    async def slow_for_b(scripted: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (body := await scripted.read_request(reader)) is not None:
            await asyncio.sleep(0.5 if body == b"B" else 0)
            writer.write(whole(body))
            await writer.drain()

    async with engine(tmp_path, slow_for_b, max_connections=1, read_timeout_s=1) as (_, connections):
        first = await connections.post("/v1/completions", b"A")
        assert await first.read() == b"A"
        first.release()
        second = asyncio.create_task(connections.post("/v1/completions", b"B"))  # on the same connection
        await asyncio.sleep(0.1)
        first.close()  # a late second "done" on the first answer
        assert await asyncio.wait_for((await asyncio.wait_for(second, 3)).read(), 3) == b"B"


@on_each_loop
async def test_requests_waiting_for_a_connection_are_dropped_when_the_gateway_stops(tmp_path: Path) -> None:
    async with engine(tmp_path, echo_forever, max_connections=1) as (_, connections):
        held = await connections.post("/v1/completions", b"1")
        waiting = asyncio.create_task(connections.post("/v1/completions", b"2"))
        await asyncio.sleep(0.1)
        await connections.close()
        with pytest.raises(EngineDropped, match="stopping"):
            await asyncio.wait_for(waiting, 2)
        assert await held.read() == b"1"  # what was under way ends as it would
        held.release()
