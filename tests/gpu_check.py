"""`make gpu-check`: acceptance on a machine with an NVIDIA GPU and Qwen3-VL weights (issue 17).

Everything else about the GPU path is tested from recorded ``nvidia-smi`` outputs; this is what only a real card can
confirm. For every shipped Qwen3-VL profile whose weights are under ``--models-dir`` and that fits this machine's GPU
by Airlock's own sizing (``server/sizing.py``, the launcher's code), it starts ``airlock up`` with that profile (a
temporary config: loopback only, no sign-in, the metrics on a listener of their own) and checks:

- ready:    the gateway's ``/readyz`` answers 200 (the engine loaded and passed its health check);
- kv log:   vLLM logged its KV cache: "Available KV cache memory: <x> GiB" (``vllm/v1/worker/gpu_worker.py``,
            ``Worker.determine_available_memory``) and "GPU KV cache size: <n> tokens, Maximum concurrency for <len>
            tokens per request: <c>x" (``vllm/v1/core/kv_cache_utils.py``, ``update_kv_cache_capacity``), with
            <len> the planned context;
- metrics:  ``vllm:cache_config_info`` in the gateway's ``/metrics`` (``vllm/v1/metrics/loggers.py``,
            ``log_metrics_info``: CacheConfig's fields as labels, ``kv_cache_size_tokens`` among them);
- image:    an image chat with the official ``openai`` SDK and no ``max_tokens`` (the most common call), on a
            generated document page: the answer must name the number printed on it;
- tools:    ``tools`` with ``tool_choice: auto``: a call of the offered function with JSON arguments;
- thinking: (Thinking profiles) ``message.reasoning`` present (``--reasoning-parser qwen3``).

Nothing timed is a pass or a fail. It prints one markdown table row per profile (the card, the plan, what vLLM
reported, each check): paste the table into the issue and the README. Exit status 1 when a check failed, 2 when
nothing could be checked (no GPU, no weights).

    make gpu-check ARGS="--models-dir /var/lib/airlock/models"
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml
from openai.types.chat import ChatCompletionFunctionToolParam
from PIL import Image, ImageDraw, ImageFont
from prometheus_client.parser import text_string_to_metric_families

from server.config import AdmissionSettings, ConfigError, EngineSettings
from server.gpus import Gpu, discover_gpus, place_replicas
from server.profiles import EngineProfile, load_profiles
from server.sizing import EnginePlan, plan_engine

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = 2
FAILED = 1
# The number printed on the test page; a model that read the page names it.
PAGE_NUMBER = "4711"
# vLLM 0.32's wording (files above). Several tensor-parallel workers each log their own "Available" line.
_AVAILABLE = re.compile(r"Available KV cache memory: (?P<gib>[0-9.]+) GiB")
_CAPACITY = re.compile(r"KV cache size: (?P<tokens>[0-9,]+) tokens, Maximum concurrency for (?P<length>[0-9,]+) "
                       r"tokens per request: (?P<concurrency>[0-9.]+)x")
CHECKS = ("ready", "kv log", "metrics", "image", "tools", "thinking")


@dataclass(frozen=True)
class EngineReport:
    """What vLLM said about its KV cache at start-up (None: not logged)."""

    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    max_concurrency: float | None = None


def parse_engine_log(text: str) -> EngineReport:
    """The KV cache lines of a vLLM log; with tensor parallel, the smallest worker's memory (the one that limits)."""
    available = [float(match["gib"]) for match in _AVAILABLE.finditer(text)]
    capacity = list(_CAPACITY.finditer(text))
    last = capacity[-1] if capacity else None
    return EngineReport(
        kv_cache_gib=min(available) if available else None,
        kv_cache_tokens=int(last["tokens"].replace(",", "")) if last else None,
        max_model_len=int(last["length"].replace(",", "")) if last else None,
        max_concurrency=float(last["concurrency"]) if last else None,
    )


def cache_config_info(metrics_text: str) -> dict[str, str] | None:
    """The labels of ``vllm:cache_config_info`` in a Prometheus scrape (the first replica's), None when absent."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "vllm:cache_config_info" and family.samples:
            return dict(family.samples[0].labels)
    return None


@dataclass(frozen=True)
class Check:
    ok: bool | None  # None: not applicable
    note: str = ""

    def cell(self) -> str:
        mark = "n/a" if self.ok is None else ("pass" if self.ok else "FAIL")
        return f"{mark}: {self.note}" if self.note else mark


@dataclass
class Row:
    """One profile on one card: the plan, what vLLM reported, and each check."""

    card: str
    profile: str
    plan: EnginePlan
    report: EngineReport = field(default_factory=EngineReport)
    metrics_kv_tokens: int | None = None
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(check.ok is False for check in self.checks.values())


HEADER = ("| card | profile | dtype | context (plan / vLLM) | sequences (plan) / vLLM concurrency at full context "
          "| KV tokens (plan / vLLM log / metrics) | vLLM KV memory | " + " | ".join(CHECKS) + " |")


def table_header() -> str:
    return HEADER + "\n" + "|" + " --- |" * (HEADER.count("|") - 1)


def _number(value: float | None, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def format_row(row: Row) -> str:
    plan, report = row.plan, row.report
    cells = [
        row.card, f"`{row.profile}`", plan.dtype,
        f"{plan.max_model_len:,} / {_number(report.max_model_len)}",
        f"{plan.max_num_seqs} / {_number(report.max_concurrency, '.2f')}x",
        f"{plan.kv_cache_tokens:,} / {_number(report.kv_cache_tokens)} / {_number(row.metrics_kv_tokens)}",
        "-" if report.kv_cache_gib is None else f"{report.kv_cache_gib:.2f} GiB",
        *(row.checks.get(name, Check(None if name == "thinking" and row.plan.profile.variant != "thinking" else False,
                                     "not run")).cell() for name in CHECKS),
    ]
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def describe_card(group: Sequence[Gpu]) -> str:
    gpu = group[0]
    card = f"{gpu.name} ({gpu.total_mib / 1024:.1f} GiB)"
    return card if len(group) == 1 else f"{len(group)}x {card}"


def document_page() -> str:
    """A page like a scanned A4 document at 300 dpi (2480x3508, 8.7 MP: above the default image budget, so the
    engine's processor scales it down to max_pixels, as it will real scans), as a PNG data: URL: a title with a
    number, lines of text and a table."""
    page = Image.new("RGB", (2480, 3508), "white")
    draw = ImageDraw.Draw(page)
    title, body = ImageFont.load_default(size=144), ImageFont.load_default(size=56)
    draw.text((240, 280), f"INVOICE {PAGE_NUMBER}", fill="black", font=title)
    for line in range(6):
        draw.text((240, 640 + 88 * line), f"Line {line + 1}: delivery of office supplies, item group {line + 7}",
                  fill="black", font=body)
    for row in range(8):
        top = 1400 + 140 * row
        draw.rectangle((240, top, 2240, top + 140), outline="black", width=4)
        draw.line((1240, top, 1240, top + 140), fill="black", width=4)
        draw.text((280, top + 40), f"Item {row + 1}", fill="black", font=body)
        draw.text((1280, top + 40), f"{(row + 1) * 12.5:.2f} EUR", fill="black", font=body)
    buffer = io.BytesIO()
    page.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Stack:
    """``airlock up`` with one profile, its log in ``log_path``."""

    def __init__(self, profile: EngineProfile, args: argparse.Namespace, workdir: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / f"{profile.name}.log"
        config = workdir / f"{profile.name}.yaml"
        config.write_text(yaml.safe_dump({
            "log_format": "text",
            "gateway": {"host": "127.0.0.1", "port": self.port},
            "metrics": {"listener": "separate", "host": "127.0.0.1", "port": self.metrics_port},
            "engine": {"model": profile.name, "models_dir": str(args.models_dir), "device": "gpu", "replicas": 1,
                       "tensor_parallel_size": args.tensor_parallel_size, "verify_model": "if_present"},
        }))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "up", "--config", str(config)],
                                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> Check:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return Check(False, f"airlock exited with status {self.process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200:
                    return Check(True)
            except httpx.HTTPError:
                pass
            time.sleep(2)
        return Check(False, f"not ready after {timeout:.0f} s")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text

    def stop(self) -> None:
        """SIGTERM (the gateway drains, the engines stop), a kill if that takes more than two minutes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def request_checks(client: openai.OpenAI, model: str, thinking: bool) -> dict[str, Check]:
    """Image chat, tool call and (Thinking) reasoning, each an independent check; an API error fails only its own."""
    checks: dict[str, Check] = {}
    try:
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is the invoice number on this page? Answer with the number only."},
            {"type": "image_url", "image_url": {"url": document_page()}},
        ]}])
        content = answer.choices[0].message.content or ""
        checks["image"] = Check(PAGE_NUMBER in content, f"{answer.usage.prompt_tokens if answer.usage else '?'} "
                                "prompt tokens" + ("" if PAGE_NUMBER in content else ", number not in the answer"))
    except openai.APIError as exc:
        checks["image"] = Check(False, f"{type(exc).__name__}")
    tool: ChatCompletionFunctionToolParam = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    try:
        answer = client.chat.completions.create(
            model=model, tools=[tool], tool_choice="auto",
            messages=[{"role": "user", "content": "What is the weather in Paris right now? Use the tool."}])
        calls = answer.choices[0].message.tool_calls or []
        function = getattr(calls[0], "function", None) if calls else None
        arguments = json.loads(function.arguments) if function is not None else {}
        checks["tools"] = Check(function is not None and function.name == "get_weather" and "city" in arguments,
                                f"finish_reason {answer.choices[0].finish_reason}")
    except (openai.APIError, json.JSONDecodeError) as exc:
        checks["tools"] = Check(False, type(exc).__name__)
    if not thinking:
        checks["thinking"] = Check(None)
        return checks
    try:
        answer = client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "A train leaves at 9:40 and arrives at 11:15. How long is the journey?"}])
        reasoning = (answer.choices[0].message.model_extra or {}).get("reasoning")
        checks["thinking"] = Check(bool(reasoning), "message.reasoning " + ("present" if reasoning else "missing"))
    except openai.APIError as exc:
        checks["thinking"] = Check(False, type(exc).__name__)
    return checks


def check_profile(profile: EngineProfile, plan: EnginePlan, card: str, args: argparse.Namespace,
                  workdir: Path) -> Row:
    row = Row(card, profile.name, plan)
    stack = Stack(profile, args, workdir)
    try:
        row.checks["ready"] = stack.wait_ready(args.start_timeout)
        row.report = parse_engine_log(stack.log_path.read_text(errors="replace"))
        logged = row.report.kv_cache_gib is not None and row.report.max_model_len is not None
        row.checks["kv log"] = Check(
            logged and row.report.max_model_len == plan.max_model_len,
            "" if logged else "KV cache lines missing" if row.report.kv_cache_gib is None else "capacity missing")
        if not row.checks["ready"].ok:
            return row
        info = cache_config_info(stack.metrics())
        tokens = (info or {}).get("kv_cache_size_tokens", "None")
        row.metrics_kv_tokens = int(tokens) if tokens.isdigit() else None
        row.checks["metrics"] = Check(row.metrics_kv_tokens is not None,
                                      "" if info else "vllm:cache_config_info missing")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key="gpu-check", max_retries=0,
                               timeout=args.request_timeout)
        row.checks.update(request_checks(client, profile.served_model_name, profile.variant == "thinking"))
        return row
    finally:
        stack.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=EngineSettings().models_dir,
                        help="where the weights are (engine.models_dir; default %(default)s)")
    parser.add_argument("--profile", action="append", help="only this profile (repeatable; default: every one)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica (default 1)")
    parser.add_argument("--start-timeout", type=float, default=1800, help="seconds to load a model (default 1800)")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds per request (default 600)")
    parser.add_argument("--log-dir", type=Path, help="keep the configs and logs here (default: a new temp dir)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        gpus = discover_gpus(os.environ)
    except (ConfigError, OSError) as exc:
        print(f"gpu-check: cannot list the GPUs ({exc}); nothing was checked", file=sys.stderr)
        return NO_GPU
    if not gpus:
        print("gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none, or is not installed): this check "
              "needs one; nothing was checked", file=sys.stderr)
        return NO_GPU
    try:
        group = place_replicas(gpus, 1, args.tensor_parallel_size)[0]
    except ConfigError as exc:
        print(f"gpu-check: {exc}; nothing was checked", file=sys.stderr)
        return NO_GPU
    card = describe_card(group)
    settings = EngineSettings(models_dir=args.models_dir, device="gpu", tensor_parallel_size=args.tensor_parallel_size)
    workdir = args.log_dir or Path(tempfile.mkdtemp(prefix="airlock-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    profiles = [p for p in load_profiles().values()
                if p.size is not None and (not args.profile or p.name in args.profile)]
    rows: list[Row] = []
    for profile in sorted(profiles, key=lambda p: p.name):
        if not (args.models_dir / (profile.directory or profile.name) / "config.json").is_file():
            print(f"gpu-check: {profile.name}: no weights in {args.models_dir / (profile.directory or '')}",
                  file=sys.stderr)
            continue
        try:
            plan = plan_engine(profile, group, settings, AdmissionSettings().expected_tokens_per_request)
        except ConfigError as exc:  # DoesNotFit, or a tensor-parallel size the model cannot split into
            print(f"gpu-check: {profile.name} does not fit {card}: {exc}", file=sys.stderr)
            continue
        print(f"gpu-check: {profile.name} on {card}: {plan.reason}", file=sys.stderr, flush=True)
        rows.append(check_profile(profile, plan, card, args, workdir))
        print(f"gpu-check: {profile.name} done ({'FAILED' if rows[-1].failed else 'passed'})", file=sys.stderr)
    if not rows:
        print(f"gpu-check: no Qwen3-VL profile has weights in {args.models_dir} and fits {card}; nothing was checked",
              file=sys.stderr)
        if not args.log_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        return NO_GPU
    print(f"gpu-check: logs and configs in {workdir}", file=sys.stderr)
    print(table_header())
    for row in rows:
        print(format_row(row))
    return FAILED if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
