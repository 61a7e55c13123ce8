"""The gateway stays light: it never imports torch, transformers or vLLM."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT

HEAVY = ("torch", "vllm", "transformers")


def test_gateway_and_launcher_import_no_engine_code() -> None:
    probe = (
        "import sys, server.cli, server.runner, server.app, server.proxy, server.supervisor;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
