"""Several paced stand-in engines in one light process: the department benchmark's upstreams (a sibling of
``instant_upstream.py``, and the same one accepted fake: a real engine's milliseconds would drown the gateway's
microseconds, and eight GPUs cannot be had here).

Each ``--uds`` socket is one replica. A streamed chat completion sends vLLM's events (a role event at once, then
one event per token ``--interval-ms`` apart, the pace of a GPU, then the finish event, the usage event when asked
and ``[DONE]``) at fixed times from the request's arrival, whatever the other streams do.

``--stream-interval N`` simulates vLLM's option of that name (``SchedulerConfig.stream_interval``; the rule is
``RequestState.make_request_output`` in vllm/v1/engine/output_processor.py, vLLM 0.32): the first token is sent at
once, then one event every N tokens (tokens 1+N, 1+2N, ...) whose delta carries those N tokens' text as one
content string, and the last token's event at once with whatever is left (fewer than N when N does not divide).
The finish, usage and ``[DONE]`` events follow as with N = 1, and the usage event still counts tokens. N = 1
(the default) is vLLM's default: one event per token, the bytes as before the option existed.

It must cost little per event, or it, not the gateway, limits a run of ~20,000 events a second on two cores:
so it is not an ASGI app (uvicorn's per-message dicts, a task and a sleep per stream per token) but an
``asyncio.Protocol`` on uvloop with httptools parsing requests (uvicorn's own parser), each token written by a
timer callback (``loop.call_at``) straight to the transport as one pre-framed HTTP chunk. It reads every request
body to its end but does not parse its JSON (a 1 MB image would cost milliseconds): ``"stream":true`` and
``"include_usage":true`` are found in the bytes (the gateway writes its JSON compact, as the load generator does).

``GET /stats`` (on any socket) answers the process's counts: requests, streams started and ended, token events sent
(what the load generator counts) and the tokens they carried.

Run: ``python -m tests.bench.paced_upstream --uds A.sock --uds B.sock [--tokens N] [--interval-ms MS]
[--stream-interval N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import httptools
import uvloop

from .load import MODEL

_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
         b"transfer-encoding: chunked\r\n\r\n")
_END = b"0\r\n\r\n"
_STREAM_MARK = (b'"stream":true', b'"stream": true')
_USAGE_MARK = (b'"include_usage":true', b'"include_usage": true')
# Words of an answer, sent one per event in turn (their length varies, as tokens' do).
WORDS = [" The", " invoice", " total", " is", " 1,284.50", " EUR", ",", " due", " on", " 30", " June", "."]
PROMPT_TOKENS = 900  # what the usage event says (a 1,300-character prompt and a share of an image)


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112, 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _plain(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 404: b"Not Found"}[status]
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, len(body), body))


@dataclass
class Counts:
    requests: int = 0
    streams_started: int = 0
    streams_ended: int = 0
    token_events: int = 0  # events carrying tokens (the role event and the tail are not counted)
    tokens: int = 0  # the tokens those events carried


def event_ends(tokens: int, stream_interval: int) -> list[int]:
    """The token each of a stream's token events is sent at (numbered from 1): the first token at once, then every
    ``stream_interval`` tokens, and the last token with what is left (vLLM 0.32, output_processor.py)."""
    return [1, *range(1 + stream_interval, tokens, stream_interval), tokens] if tokens > 1 else [1]


class Answers:
    """Every stream's bytes, framed once at start-up: a token event costs one ``transport.write``."""

    def __init__(self, tokens: int, interval_s: float, stream_interval: int = 1) -> None:
        if tokens < 1 or stream_interval < 1:
            raise ValueError("tokens and stream_interval must be at least 1")
        self.tokens = tokens
        self.interval_s = interval_s
        self.stream_interval = stream_interval
        # The shape of vLLM's chunks (vllm/entrypoints/openai/protocol.py, ChatCompletionStreamResponse).
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
        self.role = _chunk(_event({**base, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}))
        framed: dict[tuple[int, int], bytes] = {}  # (first word, words) -> the event; the words cycle

        def delta(first: int, last: int) -> bytes:
            """The event carrying tokens ``first`` to ``last`` (numbered from 1), their words joined."""
            key = ((first - 1) % len(WORDS), last - first + 1)
            if key not in framed:
                text = "".join(WORDS[(number - 1) % len(WORDS)] for number in range(first, last + 1))
                framed[key] = _chunk(_event({**base, "choices": [
                    {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}))
            return framed[key]

        # A stream's token events, the same for every stream: (the token it is sent at, tokens in it, its bytes).
        ends = event_ends(tokens, stream_interval)
        self.events = [(end, end - before, delta(before + 1, end))
                       for before, end in zip([0, *ends[:-1]], ends, strict=True)]
        finish = _event({**base, "choices": [
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length", "stop_reason": None}]})
        usage = _event({**base, "choices": [], "usage": {
            "prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": PROMPT_TOKENS + tokens}})
        self.tail = _chunk(finish) + _chunk(b"data: [DONE]\n\n") + _END
        self.tail_with_usage = _chunk(finish) + _chunk(usage) + _chunk(b"data: [DONE]\n\n") + _END
        self.models = json.dumps({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "vllm", "max_model_len": 32768}]}).encode()


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from the gateway (or the load generator): requests one after another."""

    def __init__(self, answers: Answers, counts: Counts) -> None:
        self._answers = answers
        self._counts = counts
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:  # the client left mid-stream
            self._timer.cancel()
            self._timer = None
            self._counts.streams_ended += 1
        self._transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._counts.requests += 1
        path = self._url.split(b"?", 1)[0]
        if path == b"/v1/chat/completions":
            body = b"".join(self._body)
            if any(mark in body for mark in _STREAM_MARK):
                self._stream(any(mark in body for mark in _USAGE_MARK))
            else:
                self._write(_plain(200, json.dumps({"object": "chat.completion", "model": MODEL, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1,
                              "total_tokens": PROMPT_TOKENS + 1}}).encode()))
        elif path == b"/health":
            self._write(_plain(200, b""))
        elif path == b"/v1/models":
            self._write(_plain(200, self._answers.models))
        elif path == b"/stats":
            self._write(_plain(200, json.dumps(asdict(self._counts)).encode()))
        else:
            self._write(_plain(404, b'{"error":"not found"}'))

    # the stream
    def _stream(self, usage: bool) -> None:
        self._counts.streams_started += 1
        self._write(_HEAD + self._answers.role)
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._timer = loop.call_at(started + self._answers.interval_s, self._token, 0, started, usage)

    def _token(self, index: int, started: float, usage: bool) -> None:
        """Send the stream's token event ``index`` (of ``Answers.events``), and set the timer for the next."""
        answers = self._answers
        _, tokens, event = answers.events[index]
        self._counts.token_events += 1
        self._counts.tokens += tokens
        if index + 1 < len(answers.events):
            self._write(event)
            self._timer = asyncio.get_running_loop().call_at(
                started + answers.events[index + 1][0] * answers.interval_s, self._token, index + 1, started, usage)
        else:
            self._write(event + (answers.tail_with_usage if usage else answers.tail))
            self._timer = None
            self._counts.streams_ended += 1

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def serve(sockets: list[Path], tokens: int, interval_s: float, stream_interval: int = 1) -> None:
    """Listen on every socket until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    answers, counts = Answers(tokens, interval_s, stream_interval), Counts()
    servers = []
    for path in sockets:
        path.unlink(missing_ok=True)
        servers.append(await loop.create_unix_server(lambda: Connection(answers, counts), str(path), backlog=1024))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    for path in sockets:
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uds", type=Path, action="append", required=True, help="a replica's unix socket")
    parser.add_argument("--tokens", type=int, default=300, help="tokens in each streamed answer")
    parser.add_argument("--interval-ms", type=float, default=25.0, help="between a stream's tokens")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens an event after the first, as vLLM's --stream-interval (1: one event a token)")
    args = parser.parse_args()
    if args.tokens < 1 or args.stream_interval < 1:
        parser.error("--tokens and --stream-interval must be at least 1")
    uvloop.run(serve(args.uds, args.tokens, args.interval_ms / 1000, args.stream_interval))


if __name__ == "__main__":
    main()
