"""Per-user limits (429), the queue's wait timeout (503) and a graceful drain on SIGTERM: gateways set up for each
case, in front of the session's real engine, or of a paced engine where a request must be caught while it runs."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conftest import AIRLOCK, ROOT, Credentials, Stack, airlock_cli, wait_ready, write_config
from .servers import ThreadedServer, free_port, gateway_in_front_of
from .test_proxy_faults import MODEL, health, models

pytestmark = pytest.mark.engine


def chat(tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": "airlock-demo-qwen3-vl", "max_tokens": tokens, "stream": stream, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Read the scanned form."}]}


@pytest.fixture(scope="module")
def bob_key(credentials: Credentials) -> str:
    return airlock_cli("keys", "create", "--user", "bob", "--file", str(credentials.api_keys)).strip()


def first_chunk(stream: httpx.Response) -> Iterator[str]:
    lines = stream.iter_lines()
    for line in lines:
        if line.startswith("data: {"):
            yield line
            break
    yield from lines


PACED_CHUNKS = 100
PACE_S = 0.05


async def paced_chat(request: Request) -> Response:
    """An engine that streams one chunk per token asked every PACE_S, whatever the machine is doing. A fake on
    purpose: on this CPU, vLLM's API server sometimes holds a stream's chunks until the answer is complete, so a
    real stream cannot be caught mid-way on cue (and a request that is over holds no place in the gateway)."""
    body = await request.json()
    if not body.get("stream"):
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                          "finish_reason": "stop"}]})

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(int(body.get("max_tokens") or PACED_CHUNKS)):
            await asyncio.sleep(PACE_S)
            yield f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{index} "}}}}]}}\n\n'.encode()
        yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n'
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture
def paced_engine(tmp_path: Path) -> Iterator[Path]:
    engine_socket = tmp_path / "paced.sock"
    engine = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                               Route("/v1/chat/completions", paced_chat, methods=["POST"])])
    with ThreadedServer(engine, uds=str(engine_socket)):
        yield engine_socket


def paced(tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": MODEL, "max_tokens": tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Read the form."}]}


def answer_to_a_body_never_sent(base_url: str, headers: dict[str, str]) -> bytes:
    """The status line the gateway answers to a POST whose announced body never comes (a raw socket: HTTP clients
    send the whole body before they read)."""
    host, port = base_url.removeprefix("http://").split(":")
    lines = ["POST /v1/chat/completions HTTP/1.1", f"host: {host}", "content-type: application/json",
             f"content-length: {30 * 1024 * 1024}", *(f"{name}: {value}" for name, value in headers.items())]
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return connection.recv(65536).split(b"\r\n", 1)[0] + b"\r\n"


def test_concurrent_limit_429_and_queue_timeout_503(paced_engine: Path, credentials: Credentials,
                                                     bob_key: str) -> None:
    admission = {"max_concurrent_per_user": 1, "requests_per_minute_per_user": 0, "max_in_flight_per_replica": 1,
                 "queue_timeout_s": 1.0, "retry_after_s": 3}
    auth = {"api_keys_file": str(credentials.api_keys)}
    alice, bob = {"authorization": f"Bearer {credentials.api_key}"}, {"authorization": f"Bearer {bob_key}"}
    with gateway_in_front_of(paced_engine, admission=admission, auth=auth) as base_url, \
            httpx.Client(base_url=base_url, timeout=120) as client:
        # A stream of 100 s: the gateway holds alice's place and the only slot until it ends or she leaves.
        with client.stream("POST", "/v1/chat/completions", json=paced(2000, stream=True), headers=alice) as held:
            assert held.status_code == 200
            lines = first_chunk(held)  # kept: a dropped line iterator would close the stream
            next(lines)

            # Her limit is checked before a byte of her body is read: an upload announced as 30 MiB, of which
            # nothing has been sent, is refused at once.
            assert answer_to_a_body_never_sent(base_url, alice).startswith(b"HTTP/1.1 429 ")

            second = client.post("/v1/chat/completions", json=paced(4), headers=alice)
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "too_many_concurrent_requests"
            assert int(second.headers["retry-after"]) >= 1

            waited = client.post("/v1/chat/completions", json=paced(4), headers=bob)
            assert waited.status_code == 503, waited.text
            assert waited.json()["error"]["code"] == "queue_timeout"
            assert waited.headers["retry-after"] == "3"
        # alice left: her place and the slot came back
        assert client.post("/v1/chat/completions", json=paced(4), headers=bob).status_code == 200
        assert client.post("/v1/chat/completions", json=paced(4), headers=alice).status_code == 200


def test_requests_per_minute_429_with_retry_after(stack: Stack, credentials: Credentials, bob_key: str) -> None:
    admission = {"max_concurrent_per_user": 0, "requests_per_minute_per_user": 2}
    auth = {"api_keys_file": str(credentials.api_keys)}
    alice, bob = {"authorization": f"Bearer {credentials.api_key}"}, {"authorization": f"Bearer {bob_key}"}
    with gateway_in_front_of(stack.engine_socket, admission=admission, auth=auth) as base_url, \
            httpx.Client(base_url=base_url, timeout=120) as client:
        statuses = [client.post("/v1/chat/completions", json=chat(1), headers=alice).status_code for _ in range(2)]
        assert statuses == [200, 200]
        refused = client.post("/v1/chat/completions", json=chat(1), headers=alice)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert client.post("/v1/chat/completions", json=chat(1), headers=bob).status_code == 200


def test_sigterm_lets_a_running_stream_finish_refuses_new_requests_and_exits(
    paced_engine: Path, credentials: Credentials, tmp_path: Path,
) -> None:
    """The real gateway process, in front of the paced engine."""
    port = free_port()
    config = write_config(tmp_path / "gateway.yaml", {
        "gateway": {"port": port, "shutdown_grace_s": 300},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "upstreams": [{"url": f"unix:{paced_engine}"}],
    })
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {credentials.api_key}"}
    body = paced(PACED_CHUNKS, stream=True)
    try:
        wait_ready(f"{base_url}/readyz", gateway, log_path, 60)
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers,
                          timeout=60) as stream:
            lines = first_chunk(stream)
            next(lines)
            gateway.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            refused = False
            while not refused and time.monotonic() < deadline:
                try:
                    httpx.get(f"{base_url}/healthz", timeout=2)
                    time.sleep(0.1)
                except (httpx.ConnectError, httpx.ReadError):
                    # The listener is closed: new requests are turned away (refused, or reset when the connection
                    # reached the listener's backlog just as it closed).
                    refused = True
            assert refused, "the draining gateway still accepted new connections"
            assert gateway.poll() is None  # still serving the stream
            data = [line for line in lines if line.startswith("data: ")]
        assert len(data) == PACED_CHUNKS + 1 and data[-1] == "data: [DONE]", "the stream was cut"
        assert gateway.wait(timeout=60) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
