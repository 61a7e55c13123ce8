"""The README's Python examples (an image, then a conversation going on) really run against a real stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, Stack
from .images import image_bytes

pytestmark = pytest.mark.engine


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    (example,) = [block for block in blocks if "chat.completions.create" in block and "image_url" in block]
    (conversation,) = [block for block in blocks if "history" in block]
    return example + conversation  # the conversation goes on from the first example's client and model


def test_readme_sdk_example_answers_about_an_image(stack: Stack, tmp_path: Path) -> None:
    example = readme_python_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in example
    (tmp_path / "invoice.png").write_bytes(image_bytes("PNG", (320, 240)))
    script = tmp_path / "example.py"
    # Run as typed; the last line only reports that the conversation's second request was answered.
    script.write_text(example.replace("http://127.0.0.1:8000", stack.base_url) + 'print("turns:", len(history))\n')
    env = {**os.environ, "OPENAI_API_KEY": stack.api_key}  # the test stack asks who is calling
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("turns: 3"), result.stdout
