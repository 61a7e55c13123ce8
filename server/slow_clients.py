"""Deadlines for what a client sends, which uvicorn does not have (only a keep-alive timeout between requests).

Without them a client that opened a connection and sent nothing, or half a request head, or part of a body, held
the connection for as long as it liked: about 21,000 such connections, with no credentials, left the gateway no
file descriptors to serve anyone (a review on 2 December 2026). The same rules as nginx's ``client_header_timeout``
and ``client_body_timeout``:

- a request's head must be whole within ``gateway.header_timeout_s`` of its first byte (of the connection, for a
  connection's first request);
- its body may pause for at most ``gateway.body_timeout_s`` between two reads (not counting while the gateway
  itself has stopped reading, i.e. uvicorn's flow control);
- a request answered before its body was read whole (a refusal) has its connection closed at most
  ``gateway.body_timeout_s`` after the answer, however the rest trickles in (nginx's ``lingering_time``).

A connection that sent nothing is closed; one that sent part of a request gets a 408 with an OpenAI-style error
and is closed. One timer per connection at most, checked when it fires, so a request that arrives whole costs no
timer of its own.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# first: a new connection, nothing sent yet; head, body: the request's; linger: answered before its body was read
# whole, the rest is read and dropped for at most body_timeout_s in all, then the connection is closed.
Waiting = Literal["first", "head", "body", "linger"]


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head + body


class SlowClientGuard(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines above; ``guarded`` makes one with the settings' values."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0

    _waiting: Waiting | None = None
    _since = 0.0
    _timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait("first")

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting == "body":
            self._since = self.loop.time()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._waiting == "first":
            self._waiting = "head"  # the head's time counts from the connection's start
        else:
            self._wait("head")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._wait("body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._waiting = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting == "body":  # refused before its body was read (401, 413...): not kept for its body
            self._wait("linger")

    def _limit(self) -> float:
        return self.body_timeout_s if self._waiting in ("body", "linger") else self.header_timeout_s

    def _wait(self, what: Waiting) -> None:
        self._waiting, self._since = what, self.loop.time()
        due = self._since + self._limit()
        if self._timer is not None and self._timer_at <= due:
            return  # the pending timer fires first and sets itself again for what is left
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(due, self._check), due

    def _check(self) -> None:
        self._timer = None
        if self._waiting is None or self.transport.is_closing():
            return
        now = self.loop.time()
        due = self._since + self._limit()
        if self.flow.read_paused:  # the gateway stopped reading, not the client: the pause starts over
            self._since, due = now, now + self._limit()
        if due > now:
            self._timer, self._timer_at = self.loop.call_at(due, self._check), due
            return
        self._give_up()

    def _give_up(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting == "head":
            self.transport.write(_timeout_response(
                f"the request's head did not arrive within {self.header_timeout_s:g} s (gateway.header_timeout_s)"))
        elif waiting == "body" and self.cycle is not None and not self.cycle.response_started:
            self.transport.write(_timeout_response(
                f"the request's body paused for more than {self.body_timeout_s:g} s (gateway.body_timeout_s)"))
        self.transport.close()


def guarded(header_timeout_s: float, body_timeout_s: float) -> type[SlowClientGuard]:
    """The protocol class for uvicorn's ``http`` setting, with these deadlines (seconds)."""
    return type("SlowClientGuard", (SlowClientGuard,), {"header_timeout_s": header_timeout_s,
                                                        "body_timeout_s": body_timeout_s})
