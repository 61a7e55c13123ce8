"""Clients that send slowly or not at all (``server/slow_clients.py``): the real ``airlock gateway`` process, with
short deadlines, in front of the paced stand-in engine, driven with raw sockets (an HTTP client sends whole
requests)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trustme

from server.config import ConfigError, load_settings

from .conftest import AIRLOCK, ROOT, Credentials, wait_ready, write_config
from .servers import free_port
from .test_limits_and_drain import paced, paced_engine  # noqa: F401 (paced_engine is a fixture)

HEAD_S, BODY_S = 1.0, 1.0


@contextmanager
def running_gateway(engine: Path, credentials: Credentials, workdir: Path,
                    tls: dict[str, str] | None = None) -> Iterator[tuple[int, Path]]:
    port = free_port()
    config = write_config(workdir / "gateway.yaml", {
        "gateway": {"port": port, "header_timeout_s": HEAD_S, "body_timeout_s": BODY_S,
                    **({"tls": tls} if tls else {})},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "upstreams": [{"url": f"unix:{engine}"}],
    })
    log_path = workdir / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        if tls is None:
            wait_ready(f"http://127.0.0.1:{port}/readyz", process, log_path, 60)
        yield port, log_path
    finally:
        process.terminate()
        process.wait(timeout=60)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def gateway(paced_engine: Path, credentials: Credentials, tmp_path: Path) -> Iterator[tuple[int, Path]]:  # noqa: F811
    with running_gateway(paced_engine, credentials, tmp_path) as running:
        yield running


def until_closed(connection: socket.socket, seconds: float = 15) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and how long that took."""
    started, received = time.monotonic(), b""
    connection.settimeout(seconds)
    while chunk := connection.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def error_of(answer: bytes) -> tuple[bytes, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)["error"]


def request_head(port: int, key: str, length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {length}\r\n\r\n").encode()


def test_a_connection_that_sends_nothing_is_closed_and_half_a_head_gets_408(gateway: tuple[int, Path]) -> None:
    port, log_path = gateway
    with socket.create_connection(("127.0.0.1", port)) as idle, \
            socket.create_connection(("127.0.0.1", port)) as half:
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-le")
        answer, waited = until_closed(half)
        assert HEAD_S * 0.9 <= waited < HEAD_S + 5, waited
        status, error = error_of(answer)
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert error == {"message": "the request's head did not arrive within 1 s (gateway.header_timeout_s)",
                         "type": "invalid_request_error", "param": None, "code": "request_timeout"}
        assert until_closed(idle)[0] == b""  # nothing sent, nothing answered: closed like an idle keep-alive
    log = log_path.read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log


def test_a_body_that_stops_gets_408_and_one_that_trickles_is_served(gateway: tuple[int, Path],
                                                                   credentials: Credentials) -> None:
    port, _ = gateway
    body = json.dumps(paced(2)).encode()
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(request_head(port, credentials.api_key, len(body)) + body[:9])
        answer, waited = until_closed(stalled)
        assert BODY_S * 0.9 <= waited < BODY_S + 5, waited
        status, error = error_of(answer)
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert error["code"] == "request_timeout" and "gateway.body_timeout_s" in str(error["message"])

    # Pauses shorter than the deadline, for longer than it in all: the deadline is between reads, not in total.
    with socket.create_connection(("127.0.0.1", port)) as trickle:
        trickle.sendall(request_head(port, credentials.api_key, len(body)))
        pieces = [body[index:index + len(body) // 5 + 1] for index in range(0, len(body), len(body) // 5 + 1)]
        for piece in pieces:
            time.sleep(BODY_S * 0.5)
            trickle.sendall(piece)
        trickle.settimeout(15)
        assert trickle.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert len(pieces) * BODY_S * 0.5 > BODY_S * 2


def test_a_request_refused_before_its_body_is_not_kept_open_by_the_rest_trickling_in(
        gateway: tuple[int, Path], credentials: Credentials) -> None:
    """A body announced as a gigabyte: the 413 comes at once, before the body. A byte of it every 0.3 s would
    otherwise keep the connection for as long as the client likes. Without credentials, the 401 closes it at once."""
    port, _ = gateway
    with socket.create_connection(("127.0.0.1", port)) as unknown:
        unknown.sendall(request_head(port, "not-a-key", 10**9))
        answer, waited = until_closed(unknown)
        assert answer.startswith(b"HTTP/1.1 401 ") and b"\r\nconnection: close\r\n" in answer.lower()
        assert waited < HEAD_S, waited
    with socket.create_connection(("127.0.0.1", port)) as refused:
        refused.sendall(request_head(port, credentials.api_key, 10**9))
        refused.settimeout(10)
        assert refused.recv(65536).startswith(b"HTTP/1.1 413 ")
        answered, closed = time.monotonic(), False
        while not closed and time.monotonic() - answered < BODY_S + 5:
            time.sleep(0.3)
            try:
                refused.sendall(b"x")
                refused.settimeout(0.01)
                closed = refused.recv(65536) == b""
            except TimeoutError:  # open, and nothing more said
                continue
            except OSError:  # reset: the gateway closed it
                closed = True
        assert closed, "still open"
        assert time.monotonic() - answered >= BODY_S * 0.9


def test_a_tls_handshake_never_finished_is_given_up_after_the_heads_deadline(
        paced_engine: Path, credentials: Credentials, tmp_path: Path) -> None:  # noqa: F811
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "gateway.pem", tmp_path / "gateway.key"
    certificate.private_key_pem.write_to_path(key_file)
    certificate.cert_chain_pems[0].write_to_path(cert_file)
    key_file.chmod(0o600)
    with running_gateway(paced_engine, credentials, tmp_path, {"cert_file": str(cert_file),
                                                                "key_file": str(key_file)}) as (port, _), \
            socket.create_connection(("127.0.0.1", port)) as silent:
        answer, waited = until_closed(silent)  # not even a ClientHello
        assert answer == b"" and waited < HEAD_S + 5, waited  # asyncio's own handshake timeout is 60 s


def test_held_connections_are_let_go_and_everyone_else_is_served_meanwhile(gateway: tuple[int, Path],
                                                                          credentials: Credentials) -> None:
    port, _ = gateway
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        for index, connection in enumerate(held):
            connection.sendall(b"GET /v1/models HTTP/1.1\r\nhost: " if index % 2 else b"")
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10,
                           headers={"authorization": f"Bearer {credentials.api_key}"})
        assert answer.status_code == 200
        time.sleep(HEAD_S + 1)
        for connection in held:
            answer, _ = until_closed(connection, 5)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
    finally:
        for connection in held:
            connection.close()


def test_the_deadlines_are_settings_with_safe_defaults() -> None:
    gateway = load_settings().gateway
    assert (gateway.header_timeout_s, gateway.body_timeout_s) == (10.0, 30.0)
    with pytest.raises(ConfigError, match="header_timeout_s"):
        load_settings(gateway={"header_timeout_s": 0})
