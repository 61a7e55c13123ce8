"""The `airlock` command refuses what it cannot do, clearly and with exit status 2."""

from __future__ import annotations

import os
import socket
import subprocess

from .conftest import AIRLOCK, ROOT


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("gateway", "--port", str(port), AIRLOCK_UPSTREAMS='[{"url": "unix:/nonexistent.sock"}]')
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_gateway_without_upstreams_says_what_is_missing() -> None:
    result = run("gateway")
    assert result.returncode == 2
    assert "upstreams" in result.stderr


def test_open_address_without_auth_is_refused_before_anything_starts() -> None:
    result = run("up", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "refusing to listen on '0.0.0.0'" in result.stderr
