"""An engine that never comes up is given up after engine.max_start_attempts, and the launcher says so and exits 3:
not a model reloaded forever.

The engines here are stand-ins (`engine.python` set to a program that exits at once): a real vLLM that fails to load
takes a minute an attempt to fail. The launcher, its supervisor and the exit path are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from server.config import load_settings
from server.engine import ReplicaLaunch
from server.supervisor import Supervisor

from .conftest import AIRLOCK, ROOT, airlock_env, write_config


def test_a_replica_that_never_starts_is_given_up(tmp_path: Path, demo_model_dir: Path) -> None:
    failing = shutil.which("false")
    assert failing is not None
    config = write_config(tmp_path / "engine.yaml", {
        "engine": {
            "model": "demo", "demo_model_dir": str(demo_model_dir), "socket_dir": str(tmp_path / "sockets"),
            "python": failing, "restart_backoff_initial_s": 0.1, "max_start_attempts": 3,
        },
    })
    result = subprocess.run([*AIRLOCK, "engine", "--config", str(config)], cwd=ROOT, env=airlock_env(),
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output  # not 1: systemd's RestartPreventExitStatus lists it
    assert "replica 0 ended 3 times in a row before it became healthy (last status 1)" in output
    assert output.count("replica 0 started") == 3
    assert output.count("restarting in") == 2


def test_one_replica_given_up_leaves_the_others_running(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Replica 0 never starts (a stand-in that exits at once); replica 1 is up (a stand-in that keeps running, as a
    serving engine does): replica 0 is given up, the launcher is not stopped, replica 1 still runs."""
    failing, running = shutil.which("false"), shutil.which("sleep")
    assert failing is not None and running is not None
    settings = load_settings(engine={"restart_backoff_initial_s": 0.05, "max_start_attempts": 2}).engine
    launches = [ReplicaLaunch(0, [failing], {}, f"unix:{tmp_path / 'r0.sock'}"),
                ReplicaLaunch(1, [running, "60"], {}, f"unix:{tmp_path / 'r1.sock'}")]

    async def scenario() -> tuple[bool, bool, int | None]:
        supervisor = Supervisor(launches, settings)
        supervisor.start()
        try:
            for _ in range(200):
                if supervisor.replicas[0].given_up:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            process = supervisor.replicas[1].process
            return supervisor.replicas[0].given_up, supervisor.gave_up.is_set(), \
                None if process is None else process.returncode
        finally:
            await supervisor.stop()

    with caplog.at_level(logging.ERROR, logger="server.supervisor"):
        given_up, launcher_stopped, still_running = asyncio.run(scenario())
    assert given_up and not launcher_stopped and still_running is None
    assert "replica 0 ended 2 times in a row before it became healthy" in caplog.text
