"""`airlock audit` on the real stack: no violation where there is none, every kind caught where one is planted,
and the whole stack working inside a network namespace that has only loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import AIRLOCK, ROOT, Credentials, Stack, wait_ready, write_config
from .servers import free_port

pytestmark = pytest.mark.engine

ROUNDS = 2
# Per round: a question with an image, the same streamed, a completion, and one request the gateway refuses.
REQUESTS_PER_ROUND = 4


def run_audit(*args: str, credential: str | None = None, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    env = {key: value for key, value in os.environ.items() if key != "AIRLOCK_AUDIT_KEY"}
    if credential:
        env["AIRLOCK_AUDIT_KEY"] = credential
    result = subprocess.run([*AIRLOCK, "audit", "--rounds", str(ROUNDS), "--json", "-", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.stdout.startswith("{"), f"no report (exit {result.returncode}):\n{result.stderr[-4000:]}"
    return result.returncode, json.loads(result.stdout), result.stderr


def assert_requests_went_through(report: dict[str, Any]) -> None:
    """An audit proves something only if its canaries really travelled through the stack."""
    requests = report["requests"]
    assert requests["sent"] == ROUNDS * REQUESTS_PER_ROUND
    assert requests["refused_as_expected"] == ROUNDS
    assert requests["answered"] == requests["sent"] - ROUNDS
    assert {"prompt", "image", "image pixels", "image base64", "credential"} <= set(report["canaries"])
    assert any(name.startswith("answer") for name in report["canaries"])


def test_audit_of_the_running_stack_finds_no_violation(stack: Stack) -> None:
    assert os.geteuid() == 0, "attaching to a non-dumpable gateway needs root here: must not be skipped silently"
    status, report, summary = run_audit("--attach", str(stack.process.pid), "--url", stack.base_url,
                                        credential=stack.api_key)
    assert status == 0, summary
    assert report["passed"] and report["violations"] == []
    assert report["mode"] == "attached"
    assert_requests_went_through(report)
    # The gateway, the engine's API server and its engine core, with their threads, were all watched.
    assert report["traced"]["processes_and_threads"] >= 3
    assert report["traced"]["calls"] > 100


@pytest.fixture
def leaky_gateway(stack: Stack, credentials: Credentials, tmp_path: Path) -> Any:
    """A second gateway in front of the session's engine, with tests/planted/sitecustomize.py switched on."""
    port = free_port()
    config = write_config(tmp_path / "leaky.yaml", {
        "gateway": {"port": port},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "upstreams": [{"url": f"unix:{stack.engine_socket}"}],
    })
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "planted"), "LEAKY_GATEWAY_TEST": "1"}
    log_path = tmp_path / "leaky.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base_url}/readyz", process, log_path, 60)
        yield process, base_url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_audit_catches_every_kind_of_planted_leak(leaky_gateway: Any, credentials: Credentials) -> None:
    process, base_url = leaky_gateway
    status, report, summary = run_audit("--attach", str(process.pid), "--url", base_url,
                                        credential=credentials.api_key)
    assert status == 1, summary
    assert not report["passed"]
    assert_requests_went_through(report)
    kinds = {violation.split(":", 1)[0] for violation in report["violations"]}
    assert kinds == {"egress", "dns", "file", "log"}, report["violations"]
    assert [entry["address"] for entry in report["egress"]] == ["192.0.2.1"]
    spooled = [written for written in report["files_written"] if written["canaries"]]
    assert spooled and all(written["path"].startswith("/tmp/") for written in spooled)
    # The forwarded body carries the prompt and the image (as base64); the engine's answer was never spooled.
    assert {"prompt", "image base64"} <= set(spooled[0]["canaries"])
    logged = [stream for stream in report["log_streams"] if stream["canaries"]]
    assert logged and {stream["stream"] for stream in logged} == {"stderr"}
    assert "VIOLATION" in summary


def test_audit_runs_the_whole_stack_in_a_loopback_only_namespace(demo_model_dir: Path, tmp_path: Path) -> None:
    """The audit's own stack (`airlock up`), traced from its first instruction, inside `unshare --net`."""
    assert os.geteuid() == 0, "unshare --net needs root here; this test must not be skipped silently"
    config = write_config(tmp_path / "airlock.yaml", {"engine": {
        "model": "demo", "demo_model_dir": str(demo_model_dir), "socket_dir": str(tmp_path / "sockets"),
        "cpu_kvcache_gb": 1, "max_model_len": 2048,
    }})
    status, report, summary = run_audit("--netns", "--config", str(config))
    assert status == 0, summary
    assert report["netns"] and report["interfaces"] == ["lo"]  # really nothing but loopback in there
    assert report["mode"] == "started"
    assert report["requests"]["answered"] == ROUNDS * (REQUESTS_PER_ROUND - 1)
    # Traced from the start: the engine processes vLLM spawned are among those seen.
    assert report["traced"]["processes_and_threads"] >= 10
