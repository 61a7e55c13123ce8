"""The nginx that `make bench` compares Airlock with (tests/bench/nginx_proxy.py) works on this machine as configured:
Debian's nginx (installed by `make system-packages`) in front of the benchmark's instant upstream relays a stream
byte for byte, refuses any other key, and keeps request bodies off the disk, so the benchmark's figures come from
a proxy that does the same job as the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .bench.instant_upstream import InstantEngine
from .bench.load import chat_request
from .bench.nginx_proxy import nginx_proxy
from .servers import ThreadedServer, free_port

KEY = "Bearer bench-key_0123456789abcdef"


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, httpx.Client, Path]]:
    """(straight to the instant upstream, through nginx, nginx's work dir)."""
    work = tmp_path_factory.mktemp("nginx-bench")
    upstream = work / "upstream.sock"
    port = free_port()
    with ThreadedServer(InstantEngine(tokens=16, interval_s=0), uds=str(upstream)), \
            nginx_proxy(work / "nginx", port, upstream, KEY), \
            httpx.Client(transport=httpx.HTTPTransport(uds=str(upstream)), base_url="http://localhost") as direct, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}") as through:
        yield direct, through, work / "nginx"


def test_nginx_relays_a_stream_byte_for_byte_with_the_key(
        proxied: tuple[httpx.Client, httpx.Client, Path]) -> None:
    direct, through, _ = proxied
    body = chat_request("Describe the invoice.", stream=True, max_tokens=16)
    straight = direct.post("/v1/chat/completions", content=body)
    relayed = through.post("/v1/chat/completions", content=body, headers={"authorization": KEY})
    assert relayed.status_code == straight.status_code == 200
    assert relayed.headers["content-type"] == straight.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert relayed.content == straight.content
    assert relayed.content.count(b"data: ") == 16 + 4  # role, 16 tokens, finish, usage, [DONE]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", KEY.upper(), KEY + "x", KEY.removeprefix("Bearer ")])
def test_nginx_refuses_any_other_key_with_401(proxied: tuple[httpx.Client, httpx.Client, Path],
                                               authorization: str | None) -> None:
    _, through, _ = proxied
    headers = {"authorization": authorization} if authorization else {}
    refused = through.post("/v1/chat/completions", content=chat_request("hi", stream=True, max_tokens=16),
                           headers=headers)
    assert refused.status_code == 401
    assert json.loads(refused.content)["error"]["type"] == "invalid_request_error"


def test_nginx_keeps_a_large_body_off_the_disk_and_logs_no_address(
        proxied: tuple[httpx.Client, httpx.Client, Path]) -> None:
    """FINDINGS: nginx spools a body above client_body_buffer_size (8k/16k by default) to a temporary file, unlinked
    at once (so never seen in the directory) and logged at warn level, which the benchmark's config keeps."""
    _, through, work = proxied
    body = chat_request("x" * 2_000_000, stream=False, max_tokens=16)
    answered = through.post("/v1/chat/completions", content=body, headers={"authorization": KEY})
    assert answered.status_code == 200
    assert json.loads(answered.content)["usage"]["completion_tokens"] == 16
    log = (work / "nginx-error.log").read_text()
    assert "temporary file" not in log
    assert "127.0.0.1" not in log
