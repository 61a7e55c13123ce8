"""The launcher keeps real vLLM replicas alive and leaves nothing behind.

This starts a second real engine (`airlock engine`, about a minute), kills it, and waits for the restart.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .conftest import AIRLOCK, ROOT, airlock_env, log_tail, write_config

pytestmark = pytest.mark.engine

START_TIMEOUT_S = 600


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket. (httpx's sync transport leaks the socket when connect fails, which
    pytest's warnings-as-errors rightly reports, and this poll fails to connect on purpose.)"""

    def __init__(self, path: Path) -> None:
        super().__init__("engine", timeout=2)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def engine_healthy(path: Path) -> bool:
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait_for(condition: object, what: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, f"airlock engine exited ({process.returncode}):\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log_tail(log)}"
        time.sleep(1)


def engine_server(launcher: psutil.Process) -> psutil.Process:
    """The vLLM API server the launcher started (its only direct child)."""
    (child,) = [c for c in launcher.children() if "vllm.entrypoints" in " ".join(c.cmdline())]
    return child


@pytest.fixture
def launcher(tmp_path: Path, demo_model_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    socket_dir = tmp_path / "sockets"
    config = write_config(tmp_path / "engine.yaml", {
        "engine": {
            "model": "demo", "demo_model_dir": str(demo_model_dir), "socket_dir": str(socket_dir),
            "cpu_kvcache_gb": 1, "restart_backoff_initial_s": 1.0,
        },
    })
    log = tmp_path / "engine.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*AIRLOCK, "engine", "--config", str(config)], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env=airlock_env())
    try:
        yield process, socket_dir / "replica-0.sock", log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_killed_replica_is_restarted_and_stop_leaves_no_orphans(
    launcher: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    process, socket, log = launcher
    wait_for(lambda: engine_healthy(socket), "the first start", process, log, START_TIMEOUT_S)
    first = engine_server(psutil.Process(process.pid))
    family = [first, *first.children(recursive=True)]
    assert len(family) >= 2, "vLLM runs its engine core in child processes"

    first.send_signal(signal.SIGKILL)
    wait_for(lambda: not engine_healthy(socket), "the replica to go down", process, log, 30)
    # The crashed replica's engine-core processes are reaped too, not left running.
    _gone, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"left over after the crash: {[p.pid for p in alive]}"

    wait_for(lambda: engine_healthy(socket), "the restart", process, log, START_TIMEOUT_S)
    second = engine_server(psutil.Process(process.pid))
    assert second.pid != first.pid
    assert "replica 0 exited with status -9; restarting" in log.read_text()

    family = [second, *second.children(recursive=True)]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    _gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"
