"""No core dumps anywhere in the stack, and the gateway (which holds prompts, images and keys) is not dumpable."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from server.privacy import HARDENED_START

from .conftest import ROOT, Stack


def core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max core file size"))
    return " ".join(line.split()[4:6])


def test_hardening_turns_off_dumps_and_ptrace_access() -> None:
    probe = ("from server.privacy import harden_process, is_dumpable; import resource; "
             "print(is_dumpable()); harden_process(); print(is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[:2] == ["True", "False (0, 0)"], result.stderr


def test_engines_start_hardened_and_their_forked_children_inherit_it() -> None:
    """The engines' start line, with a probe in place of vLLM's server module."""
    result = subprocess.run([sys.executable, "-c", HARDENED_START, "tests.hardened_probe", "--model", "m"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    report = json.loads(result.stdout)
    expected = {"dumpable": False, "core": [0, 0], "argv": ["--model", "m"]}
    assert report == {"process": expected, "forked_child": expected}, result.stderr


@pytest.mark.engine
def test_no_process_of_the_stack_can_dump_core(stack: Stack) -> None:
    gateway = psutil.Process(stack.process.pid)
    processes = [gateway, *gateway.children(recursive=True)]
    assert len(processes) >= 3  # the gateway, the vLLM API server, its engine core and workers
    assert {core_limit(process.pid) for process in processes} == {"0 0"}
