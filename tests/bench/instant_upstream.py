"""A stand-in for vLLM that answers at once, so that a benchmark through the gateway measures the gateway alone.

This is the one fake in the benchmarks, and only where a real engine cannot do the job: a real one takes
milliseconds to seconds per answer, which would drown the gateway's microseconds. It speaks just enough of
vLLM's OpenAI API for the gateway: ``/health``, ``/v1/models`` and chat completions, streamed (one event per
token, as vLLM sends them, and a usage event when asked) or whole. It reads every request body to its end.

With ``--interval-ms``, a streamed answer's token events come that far apart (the pace of a GPU), so that many
streams can be open at once without the upstream or the gateway being saturated. With ``--tokens-from-request``, an
answer has the request's ``max_tokens`` tokens (at most ``--tokens``), so that one upstream serves answers of several
lengths (``gateway_cpu`` tells the cost per chunk from the cost per request that way).

Run: ``python -m tests.bench.instant_upstream --uds PATH [--tokens N] [--interval-ms MS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from .load import MODEL

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
JSON_HEADERS = [(b"content-type", b"application/json")]


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class InstantEngine:
    def __init__(self, tokens: int, interval_s: float, tokens_from_request: bool = False) -> None:
        self.tokens = tokens
        self.interval_s = interval_s
        self.tokens_from_request = tokens_from_request
        self._answers: dict[int, InstantEngine] = {}
        chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
        usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
        self.stream = [_event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
        self.stream += [_event({**chunk, "choices": [{"index": 0, "delta": {"content": " word"}}]})] * tokens
        self.stream.append(_event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
        self.usage_event = _event({**chunk, "choices": [], "usage": usage})
        self.whole = json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " word" * tokens},
                         "finish_reason": "length"}],
            "usage": usage,
        }).encode()
        self.models = json.dumps({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "vllm", "max_model_len": 4096}]}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/health":
            await self._send(send, 200, JSON_HEADERS, b"")
        elif path == "/v1/models":
            await self._send(send, 200, JSON_HEADERS, self.models)
        elif path == "/v1/chat/completions":
            request = json.loads(body)
            answer = self._answer(request.get("max_tokens"))
            if request.get("stream"):
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                events = list(answer.stream)
                if (request.get("stream_options") or {}).get("include_usage"):
                    events.append(answer.usage_event)
                for number, event in enumerate([*events, b"data: [DONE]\n\n"]):
                    if self.interval_s and 1 <= number <= answer.tokens:
                        await asyncio.sleep(self.interval_s)  # each token takes its time
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await self._send(send, 200, JSON_HEADERS, answer.whole)
        else:
            await self._send(send, 404, JSON_HEADERS, b'{"error":"not found"}')

    def _answer(self, max_tokens: object) -> InstantEngine:
        """The answer's events: this engine's own, or (``tokens_from_request``) one of ``max_tokens`` tokens."""
        if not self.tokens_from_request or not isinstance(max_tokens, int) or not 0 < max_tokens < self.tokens:
            return self
        if max_tokens not in self._answers:
            self._answers[max_tokens] = InstantEngine(max_tokens, self.interval_s)
        return self._answers[max_tokens]

    @staticmethod
    async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uds", required=True, help="the unix socket to listen on")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each answer (one event each, streamed)")
    parser.add_argument("--interval-ms", type=float, default=0.0, help="between a stream's token events")
    parser.add_argument("--tokens-from-request", action="store_true",
                        help="answer with the request's max_tokens tokens (at most --tokens)")
    args = parser.parse_args()
    engine = InstantEngine(args.tokens, args.interval_ms / 1000, args.tokens_from_request)
    uvicorn.run(engine, uds=args.uds, log_level="warning", access_log=False, timeout_keep_alive=75)


if __name__ == "__main__":
    main()
