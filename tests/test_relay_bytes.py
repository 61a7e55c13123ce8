"""What a streamed answer looks like to the client, byte for byte, however the engine's events come in: several in
one read, one split over several reads, the usage event the gateway asked for (removed again), an error event in the
middle of a read.

The relay passes a stream's chunks straight to the server, past the middleware layers (``server_send``), and
passes on whole events only; these tests hold it to sending exactly what the engine sent. The engine is a small
scripted server (a real one does not split its events on cue) behind the real gateway on real uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from server.app import create_app
from server.config import load_settings

from .servers import ThreadedServer, free_port, wait_until_ready

MODEL = "scripted-model"
ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
WORD = b'data: {"choices":[{"index":0,"delta":{"content":" word \\"usage\\""}}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}\n\n'
DONE = b"data: [DONE]\n\n"
ENGINE_ERROR = b'data: {"error":{"message":"EngineCore died at /srv/secret.py","code":500}}\n\n'
# The stream as the engine writes it, each piece a write of its own (PAUSE_S apart, so each is a read of its own at
# the gateway): several events together, an event split in three, the usage event split in two.
PIECES = [ROLE + WORD, WORD[:7], WORD[7:30], WORD[30:] + WORD, FINISH + USAGE[:20], USAGE[20:], DONE]
PAUSE_S = 0.05
READ_TIMEOUT_S = 1.0
STALL_S = 3.0
# "long": an answer larger than the sockets' buffers (about 8 MB), so that a client that stops reading holds the
# gateway's writes while the engine has finished.
LONG_WORDS = 120_000


class ScriptedEngine:
    """Answers every chat completion with ``PIECES`` (for the prompt "error": two words and an error event written
    together; "stall": a word, then silence)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/v1/models":
            answer = {"object": "list", "data": [{"id": MODEL, "created": 1, "max_model_len": 4096}]}
            await self._whole(send, json.dumps(answer).encode())
            return
        if scope["path"] != "/v1/chat/completions":
            await self._whole(send, b"{}")
            return
        request = json.loads(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-engine", b"vllm")]})
        prompt = request["messages"][0]["content"]
        pieces = {"error": [ROLE, WORD + WORD + ENGINE_ERROR + DONE], "stall": [ROLE, WORD, WORD],
                  "long": [ROLE, WORD * LONG_WORDS + FINISH + DONE]}.get(prompt, PIECES)
        for number, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            # "stall": silent after its first word, for longer than the gateway's read timeout
            await asyncio.sleep(STALL_S if prompt == "stall" and number == 1 else PAUSE_S)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _whole(send: Send, body: bytes) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine_socket = tmp_path_factory.mktemp("scripted") / "engine.sock"
    port = free_port()
    settings = load_settings(gateway={"port": port, "health_interval_s": 0.5, "read_timeout_s": READ_TIMEOUT_S})
    app = create_app(settings, [f"unix:{engine_socket}"])
    with ThreadedServer(ScriptedEngine(), uds=str(engine_socket)), ThreadedServer(app, host="127.0.0.1", port=port):
        yield wait_until_ready(f"http://127.0.0.1:{port}")


def stream(gateway: str, prompt: str, **extra: object) -> tuple[httpx.Response, list[bytes]]:
    """The response and its body as the client's reads returned it."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True, **extra}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=20) as response:
        return response, list(response.iter_raw())


def test_the_client_gets_the_engines_bytes_with_the_usage_event_it_did_not_ask_for_removed(gateway: str) -> None:
    response, reads = stream(gateway, "hello")
    assert response.status_code == 200
    assert b"".join(reads) == ROLE + WORD * 3 + FINISH + DONE
    # Whole events only: the event the engine split over three writes reached the client in one piece.
    assert all(read.endswith(b"\n\n") for read in reads), reads
    # The engine's own headers stay behind; date and server are the test server's (`airlock gateway` sends no server).
    headers = {name: value for name, value in response.headers.items() if name not in ("date", "server")}
    assert headers == {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-store",
                       "x-accel-buffering": "no", "transfer-encoding": "chunked"}


def test_a_client_that_asked_for_usage_gets_every_byte(gateway: str) -> None:
    _, reads = stream(gateway, "hello", stream_options={"include_usage": True})
    assert b"".join(reads) == b"".join(PIECES)


def test_an_error_event_read_together_with_words_ends_the_stream_after_them(gateway: str) -> None:
    response, reads = stream(gateway, "error")
    body = b"".join(reads)
    assert response.status_code == 200
    assert body.startswith(ROLE + WORD + WORD)
    events = body[len(ROLE + WORD + WORD):].split(b"\n\n")
    assert len(events) == 2 and events[1] == b""  # one event, the gateway's own, and nothing after it
    assert json.loads(events[0].removeprefix(b"data: "))["error"]["code"] == "engine_error"
    assert b"EngineCore" not in body and b"[DONE]" not in body


def test_an_engine_silent_mid_stream_for_longer_than_the_read_timeout_ends_it_with_an_error_event(
        gateway: str) -> None:
    response, reads = stream(gateway, "stall")
    body = b"".join(reads)
    assert body.startswith(ROLE + WORD)
    events = body[len(ROLE + WORD):].split(b"\n\n")
    assert len(events) == 2 and events[1] == b""  # the second word never came: the gateway's event, nothing else
    error = json.loads(events[0].removeprefix(b"data: "))["error"]
    assert error["message"] == "the model engine stopped while answering" and response.status_code == 200


def test_a_client_that_stops_reading_for_longer_than_the_read_timeout_still_gets_the_whole_answer(
        gateway: str) -> None:
    """The engine sends a long answer at once and ends; the client stops reading for more than twice the read
    timeout, so the gateway waits in its writes with the engine's bytes waiting to be relayed. That is no silence of
    the engine's (the read timeout's own timer, ``engine_http._Connection._check_silence``, must not fire), so the
    client gets every byte and no error event when it reads on. (The case where the gateway waits in its last write
    with the answer all read and ended, which the timer also lets pass, depends on the sockets' buffer sizes: it is
    not staged.)"""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=30) as response:
        reads = response.iter_raw()
        received = next(reads)
        time.sleep(2 * READ_TIMEOUT_S + 1.5)
        received += b"".join(reads)
    assert received == ROLE + WORD * LONG_WORDS + FINISH + DONE


def output_tokens(gateway: str) -> float:
    lines = [line for line in httpx.get(f"{gateway}/metrics").text.splitlines()
             if line.startswith(f'airlock_output_tokens_total{{model="{MODEL}"}}')]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_the_removed_usage_event_is_still_counted(gateway: str) -> None:
    before = output_tokens(gateway)
    stream(gateway, "hello")
    assert output_tokens(gateway) == before + 3


def test_only_layers_that_leave_body_chunks_alone_sit_between_the_server_and_the_engine_routes() -> None:
    """A stream's chunks go straight to the server's send (``metrics_middleware.server_send``), past every layer in
    between: a layer that changed body chunks (compression, say) would be skipped for them. Any new layer here must
    be checked for that, and added to this list."""
    from server.boundary import ErrorBoundary
    from server.foreign_origins import ForeignOriginGuard
    from server.hsts import StrictTransportSecurity
    from server.metrics_middleware import MetricsMiddleware
    from server.request_path import EngineRoutes

    settings = load_settings(gateway={"tls_terminated_by_proxy": True, "trusted_proxies": ["127.0.0.1"]})
    layer: object = create_app(settings, ["unix:/nonexistent/engine.sock"])
    layers = []
    while not isinstance(layer, EngineRoutes):
        layers.append(type(layer))
        layer = layer.app  # type: ignore[attr-defined]
    # ForeignOriginGuard reads the request's headers and never wraps send.
    assert layers == [MetricsMiddleware, StrictTransportSecurity, ErrorBoundary, ForeignOriginGuard]
