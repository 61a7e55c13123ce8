"""An engine that never comes up is given up after engine.max_start_attempts, and the launcher says so and exits 1:
not a model reloaded forever.

The engine here is a stand-in (`engine.python` set to a program that exits at once): a real vLLM that fails to load
takes a minute an attempt to fail. The launcher, its supervisor and the exit path are the real ones.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
    assert result.returncode == 1, output
    assert "replica 0 ended 3 times in a row before it became healthy (last status 1)" in output
    assert output.count("replica 0 started") == 3
    assert output.count("restarting in") == 2
