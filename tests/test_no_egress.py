"""Airlock works end to end in a network namespace that has only loopback: nothing in it needs the outside."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.engine


def test_the_whole_stack_answers_with_only_loopback(demo_model_dir: Path, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "unshare -n needs root here; this test must not be skipped silently"
    probe = [sys.executable, str(ROOT / "tests" / "netns_probe.py"), str(demo_model_dir), str(tmp_path)]
    inside = "ip link set lo up && exec " + shlex.join(probe)
    result = subprocess.run(["unshare", "--net", "sh", "-c", inside], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    log = tmp_path / "airlock.log"
    assert result.returncode == 0, result.stdout + result.stderr[-3000:] + log.read_text()[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["interfaces"] == ["lo"]  # really nothing but loopback in there
    assert report["answer"] is not None
    assert report["stack_exit"] == 0
