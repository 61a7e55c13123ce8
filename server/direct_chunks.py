"""A streamed answer's chunks written to the client's connection from the engine connection's own callback.

Each event the engine streams used to wake the relay's task: the engine's bytes arrived in a protocol callback, set
a future, and the task then ran through the relay loop and the server's ``send`` coroutine to write them. At a
GPU's pace every token is its own event, so that task step was most of the gateway's CPU per token
(``tests/bench/gateway_cpu``). Here the callback writes the chunk itself (``EngineResponse.relay_to``), and the task
wakes only at the end, at an error event, or when the client cannot take more.

The bytes are the server's own: uvicorn's chunked framing (``uvicorn/protocols/http/httptools_impl.py``,
``RequestResponseCycle.send``), on the connection uvicorn keeps for the request. This is used only on uvicorn's
httptools protocol, once the response has started with chunked framing; anything else (another server, h11) keeps
the ``send`` path, which writes the same bytes.
"""

from __future__ import annotations

from starlette.types import Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle  # httptools: a dependency (engine_http)


class DirectChunks:
    """The client's side of one streamed response, for ``EngineResponse.relay_to``'s sink."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    @classmethod
    def of(cls, send: Send) -> DirectChunks | None:
        """For the server's own ``send`` (``metrics_middleware.server_send``) after the response's start: None
        where the chunks must go through ``send`` (not uvicorn's httptools cycle, or not chunked)."""
        cycle = getattr(send, "__self__", None)
        if type(cycle) is not RequestResponseCycle:
            return None
        if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding is not True:
            return None
        return cls(cycle)

    @property
    def gone(self) -> bool:
        """The client has left: uvicorn saw its connection end, or the transport is closing already (uvicorn hears
        of it a loop step or two later, and a transport written after it failed logs a warning per write)."""
        return bool(self._cycle.disconnected) or self._transport.is_closing()

    def write(self, body: bytes) -> bool:
        """One non-empty chunk, framed as uvicorn frames it. False when the client's connection takes no more now
        (its buffer is past the high-water mark: ``drain`` first) or is gone (nothing was written)."""
        if self.gone:
            return False
        self._transport.write(b"".join((b"%x\r\n" % len(body), body, b"\r\n")))
        return not self._flow.write_paused

    async def drain(self) -> None:
        """Until the client's connection takes more (or is gone: uvicorn then lets every waiter go)."""
        if self._flow.write_paused and not self._cycle.disconnected:
            await self._flow.drain()
