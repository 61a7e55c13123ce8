"""vLLM command lines and environments, one per replica, with every privacy setting forced on.

The privacy settings are applied last and cannot be changed from a profile or ``engine.extra_args``: an extra
argument that names one of them is refused at start-up.

Every engine also gets a server-side default for a request that asks no ``max_tokens``: the generation config's
``max_new_tokens`` set to ``screening.max_tokens_limit``. vLLM bounds it by what is left of the context
(``get_max_tokens``), so a request without ``max_tokens`` works whatever the engine's ``max_model_len``; the gateway
invents no value of its own. vLLM merges this key into the model's own ``generation_config.json`` (Qwen's
recommended temperature, top_p and top_k stay).
"""

from __future__ import annotations

import json
import math
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import engine_logging
from .config import ConfigError, EngineSettings, EngineTlsSettings
from .gpus import Gpu
from .privacy import HARDENED_START
from .profiles import ModelChoice
from .sizing import EnginePlan
from .tls import TLS12_CIPHERS

Device = Literal["cpu", "gpu"]

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Forced on every engine: no usage statistics, no hub, no telemetry, no debug logging of bodies.
PRIVACY_ENV: Mapping[str, str] = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    # Without it vLLM finds "its" address by connecting a UDP socket to 8.8.8.8 (found by `airlock audit`): no
    # packet leaves, but it is an attempt to route outside, and a replica only ever talks over loopback.
    "VLLM_HOST_IP": "127.0.0.1",
}
# The gateway is an engine's only client and never sends on a connection idle for 3 s (engine_http.KEEPALIVE_EXPIRY_S;
# it closes such connections as others are released). With vLLM's own 5 s, an engine whose event loop stalls for a
# few seconds under load closes a connection just as the gateway sends a request on it (`make bench`, concurrency
# 64: bursts of dropped requests, then 503s). Kept for 60 s, the gateway always gives up a connection first.
KEEPALIVE_ENV: Mapping[str, str] = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "60"}

# Forced on every engine: no access log (it carries client addresses), no prompt or output logging, no
# cross-user multimodal cache unless the operator asks, no file:// media, no API docs.
PRIVACY_ARGS = (
    "--disable-uvicorn-access-log",
    "--no-enable-log-requests",
    "--no-enable-log-outputs",
    "--disable-fastapi-docs",
)

# Flags an operator may not pass through extra_args: they would undo a privacy setting, bind the engine
# elsewhere, load something other than the chosen local model, or read a config file that could do any of it.
PROTECTED_FLAGS = frozenset({
    "--model", "--served-model-name", "--tokenizer", "--download-dir", "--hf-token", "--revision",
    "--host", "--port", "--uds", "--api-key", "--root-path",
    # TLS and client certificates come from engine.tls only (a weaker --ssl-cert-reqs would let anyone in).
    "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-ciphers", "--enable-ssl-refresh",
    "--disable-uvicorn-access-log", "--enable-log-requests", "--enable-log-outputs", "--enable-log-deltas",
    "--disable-log-requests", "--allowed-local-media-path", "--allowed-media-domains",
    "--mm-processor-cache-gb", "--mm-processor-cache-type", "--limit-mm-per-prompt",
    "--disable-fastapi-docs", "--enable-server-load-tracking", "--config", "--trust-remote-code",
    "--middleware", "--tool-server", "--media-io-kwargs",
    # Imports a Python file into the engine, like --middleware.
    "--tool-parser-plugin",
})

# Flags sized to the GPU by Airlock (server/sizing.py) or set from a setting, each with the setting that changes it:
# passed in extra_args as well, argparse would keep the last one and the plan (and the gateway's idea of the engine)
# would no longer be what runs.
SIZED_FLAGS: Mapping[str, str] = {
    "--max-model-len": "engine.max_model_len",
    "--max-num-seqs": "engine.max_num_seqs",
    "--gpu-memory-utilization": "engine.gpu_memory_utilization",
    "--dtype": "engine.dtype",
    "--quantization": "engine.quantization (and the profile's checkpoint)",
    "--mm-processor-kwargs": "engine.max_pixels and engine.min_pixels",
    "--tensor-parallel-size": "engine.tensor_parallel_size",
    "--pipeline-parallel-size": "engine.tensor_parallel_size (Airlock places GPUs for tensor parallel only)",
    "--data-parallel-size": "engine.replicas",
    "--stream-interval": "engine.stream_interval",
}
# vLLM's short spellings of the same (vllm/engine/arg_utils.py), also with the value attached (-qfp8, -tp2).
SIZED_SHORT_FLAGS: Mapping[str, str] = {
    "-q": "engine.quantization", "-tp": "engine.tensor_parallel_size",
    "-pp": "engine.tensor_parallel_size (Airlock places GPUs for tensor parallel only)",
    "-dp": "engine.replicas",
}

# What one gateway process relays with room to spare, in streamed events a second: the profiles' largest host at 4
# tokens an event, 7,500 events a second, took 62% of its core, and 10,000 took 57 to 65% (README, "Streamed
# events"); its CPU goes by events, not by tokens. 8,000 gives both kinds of eight 80 GB cards 4 tokens an event.
GATEWAY_EVENTS_PER_S = 8_000
# A stream's pace on a GPU while its replica is full: about 40 tokens a second for Qwen3-VL 4B/8B (issue 20's
# department of eight GPUs, 64 streams each).
STREAM_TOKENS_PER_S = 40

# Merged with an operator's own, never passed twice: argparse keeps only the last JSON given, which would silently
# drop either the server's default answer length or the operator's sampling settings.
GENERATION_CONFIG_FLAG = "--override-generation-config"

# Parent environment variables that never reach an engine: they could log bodies, cache media on disk,
# send traffic through a proxy, or authenticate to a hub.
_BLOCKED_ENV_PREFIXES = ("VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_")
_BLOCKED_ENV = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"})
# VLLM_* variables an operator may still set for tuning.
# (VLLM_ATTENTION_BACKEND is not among them: vLLM 0.32 no longer reads it; --attention-backend in extra_args is
# the way.)
_ALLOWED_VLLM_ENV = frozenset({
    "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_WORKER_MULTIPROC_METHOD",
    "VLLM_CPU_SGL_KERNEL",
})


@dataclass(frozen=True)
class ReplicaLaunch:
    """Everything needed to start one engine replica."""

    index: int
    argv: list[str]
    env: dict[str, str]
    url: str


def _flag_name(arg: str) -> str:
    """The flag an argument sets as vLLM reads it: before any ``=value`` or ``.key`` (vLLM's dotted JSON form,
    ``--limit-mm-per-prompt.image 99``), with ``_`` read as ``-``."""
    return arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-")


def check_extra_args(args: list[str]) -> None:
    """Refuse extra vLLM arguments that touch a protected flag, however spelt (abbreviated, _ for -, =value,
    .key)."""
    for arg in args:
        short = next((flag for flag in SIZED_SHORT_FLAGS if not arg.startswith("--") and arg.startswith(flag)), None)
        if short is not None:
            raise ConfigError(f"engine.extra_args: {short} is set by Airlock (sized to the GPU, or from a setting): "
                              f"set {SIZED_SHORT_FLAGS[short]} instead")
        if not arg.startswith("--"):
            continue
        flag = _flag_name(arg)
        bare = "--" + flag.removeprefix("--").removeprefix("no-")
        if any(protected == bare or protected.startswith(bare) for protected in PROTECTED_FLAGS):
            raise ConfigError(
                f"engine.extra_args: {flag} is set by Airlock itself (privacy, binding or model choice) "
                "and cannot be overridden"
            )
        sized = [setting for sized_flag, setting in SIZED_FLAGS.items() if sized_flag.startswith(bare)]
        if sized:
            raise ConfigError(f"engine.extra_args: {flag} is set by Airlock (sized to the GPU, or from a setting): "
                              f"set {sized[0]} instead")


def generation_config_args(args: list[str], default_max_tokens: int) -> tuple[dict[str, Any], list[str]]:
    """Split ``--override-generation-config`` out of extra arguments and merge it over the server's default.

    Returns the merged generation config (``max_new_tokens`` = ``default_max_tokens`` unless an operator chose a
    lower one) and the other arguments, in order. Read in vLLM's spellings: one JSON object (``--flag JSON`` or
    ``--flag=JSON``) or dotted keys (``--flag.temperature 0.6``); an abbreviation is refused, since it could not be
    merged."""
    merged: dict[str, Any] = {}
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        flag = _flag_name(arg) if arg.startswith("--") else ""
        if not flag or not GENERATION_CONFIG_FLAG.startswith(flag) or len(flag) < len("--ov"):
            rest.append(arg)
            continue
        if flag != GENERATION_CONFIG_FLAG:
            raise ConfigError(f"engine.extra_args: spell {GENERATION_CONFIG_FLAG} in full (it is merged with "
                              "Airlock's own, see the README)")
        name, has_value, value = arg.partition("=")
        if not has_value:
            following = next(items, None)
            if following is None:
                raise ConfigError(f"engine.extra_args: {GENERATION_CONFIG_FLAG} needs a value")
            value = following
        key_path = name.split(".")[1:]
        if key_path:
            _set_path(merged, key_path, _json_or_text(value))
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(f"engine.extra_args: {GENERATION_CONFIG_FLAG} takes a JSON object")
        merged.update(parsed)
    chosen = merged.get("max_new_tokens")
    if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 1
                               or chosen > default_max_tokens):
        raise ConfigError(
            f"engine.extra_args: {GENERATION_CONFIG_FLAG} max_new_tokens must be a whole number from 1 to "
            f"screening.max_tokens_limit ({default_max_tokens}); leave it out to default to that limit"
        )
    return {"max_new_tokens": default_max_tokens, **merged}, rest


def _json_or_text(value: str) -> Any:
    """A dotted value as vLLM reads it: JSON when it parses (0.6, true), else the text itself."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _set_path(into: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        into = into.setdefault(key, {})
    into[path[-1]] = value


def engine_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment minus anything that could weaken privacy, plus the forced settings."""
    env = {
        name: value
        for name, value in parent.items()
        if name.lower() not in _BLOCKED_ENV
        and (not name.startswith(_BLOCKED_ENV_PREFIXES) or name in _ALLOWED_VLLM_ENV)
    }
    env.update(PRIVACY_ENV)
    env.update(KEEPALIVE_ENV)
    env.update(logging_environment(env))
    return env


def logging_environment(env: Mapping[str, str]) -> dict[str, str]:
    """vLLM's processes log through ``engine_logging`` (vLLM's ``VLLM_LOGGING_CONFIG_PATH``): tracebacks without
    the exceptions' messages, as the gateway's own. Its directory alone goes first on ``PYTHONPATH``, so that an
    ``engine.python`` of its own finds the formatter and nothing else of Airlock's."""
    python_path = [str(engine_logging.DIRECTORY), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {"VLLM_LOGGING_CONFIG_PATH": str(engine_logging.CONFIG), "PYTHONPATH": os.pathsep.join(python_path)}


def replica_url(settings: EngineSettings, runtime_dir: Path, index: int) -> str:
    """Where this machine reaches replica ``index``: its socket, or https:// (engine.tls) or http:// on loopback.
    With TLS the host in the URL is what the engine's certificate must name (a SAN)."""
    if settings.bind == "unix":
        return f"unix:{runtime_dir / f'replica-{index}.sock'}"
    # Loopback when it listens on every address, else the address itself.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    scheme = "https" if settings.tls is not None else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{settings.base_port + index}"


def tls_args(tls: EngineTlsSettings) -> list[str]:
    """vLLM's own TLS: a client certificate from ``client_ca_file`` is required (``CERT_REQUIRED`` = 2) before any
    HTTP is read, and renewed files are loaded without a restart."""
    return [
        "--ssl-certfile", str(tls.cert_file),
        "--ssl-keyfile", str(tls.key_file),
        "--ssl-ca-certs", str(tls.client_ca_file),
        "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED)),
        "--ssl-ciphers", TLS12_CIPHERS,
        "--enable-ssl-refresh",
    ]


def build_replicas(
    settings: EngineSettings,
    choice: ModelChoice,
    plan: EnginePlan,
    runtime_dir: Path,
    gpu_groups: list[list[Gpu]] | None = None,
    parent_env: Mapping[str, str] | None = None,
    cpu_count: int | None = None,
    *,
    default_max_tokens: int,
) -> list[ReplicaLaunch]:
    """One launch per replica: the vLLM command line, its environment and where it will listen.

    ``plan`` (server/sizing.py) gives what is sized: context, sequences, memory share, dtype and the image budget.
    ``gpu_groups`` (server/gpus.py ``place_replicas``), one per replica, names each replica's GPUs as
    CUDA_VISIBLE_DEVICES will (None: on CPU). ``default_max_tokens`` (``screening.max_tokens_limit``) is the answer
    length of a request that asks none, bounded by vLLM to what is left of the context."""
    profile = choice.profile
    check_extra_args(profile.extra_args)
    check_extra_args(settings.extra_args)
    generation_config, extra_args = generation_config_args(
        [*profile.extra_args, *settings.extra_args], default_max_tokens,
    )
    base_env = engine_environment(os.environ if parent_env is None else parent_env)
    python = settings.python or sys.executable
    tokens_an_event = stream_interval(settings, plan, on_gpu=gpu_groups is not None)
    launches = []
    for index in range(settings.replicas):
        url = replica_url(settings, runtime_dir, index)
        argv = [
            python, "-c", HARDENED_START, VLLM_SERVER_MODULE,
            "--model", str(choice.path),
            "--served-model-name", choice.served_name,
            *sized_args(plan),
            "--stream-interval", str(tokens_an_event),
            "--mm-processor-cache-gb", _number(settings.mm_processor_cache_gb),
            "--tensor-parallel-size", str(settings.tensor_parallel_size),
            GENERATION_CONFIG_FLAG, json.dumps(generation_config),
            *PRIVACY_ARGS,
        ]
        if url.startswith("unix:"):
            argv += ["--uds", url.removeprefix("unix:")]
        else:
            argv += ["--host", settings.host, "--port", str(settings.base_port + index)]
            if settings.tls is not None:
                argv += tls_args(settings.tls)
        if profile.reasoning_parser:
            argv += ["--reasoning-parser", profile.reasoning_parser]
        if profile.tool_call_parser:
            # Tool calling (tools with tool_choice auto, required or a named function), as GUI agents use it.
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", profile.tool_call_parser]
        env = dict(base_env)
        if gpu_groups is not None:
            argv += ["--gpu-memory-utilization", _number(plan.gpu_memory_utilization)]
            if settings.tensor_parallel_size > 1:
                # The vision tower is small: each rank runs all of it on its share of the images instead of
                # splitting every layer across GPUs (the Qwen3-VL recipe in vLLM's docs; vllm/config/model.py).
                argv += ["--mm-encoder-tp-mode", "data"]
            # The GPUs this replica may see, named as the host's CUDA_VISIBLE_DEVICES named them (if it did).
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu.device for gpu in gpu_groups[index])
            # Indices as nvidia-smi (and so server/gpus.py) numbers them: CUDA's default order is fastest first,
            # which on a host with mixed cards would put a replica on another GPU than the one planned for.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        else:
            # CUDA graphs do not exist on CPU; eager mode also starts faster.
            argv += ["--enforce-eager"]
            env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gb)
            if settings.replicas > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in base_env:
                cpus = cpu_count or os.cpu_count() or 1
                env["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_share(index, settings.replicas, cpus)
        argv += extra_args
        launches.append(ReplicaLaunch(index, argv, env, url))
    return launches


def sized_args(plan: EnginePlan) -> list[str]:
    """The flags sized to the device: context, sequences at once, dtype, and the image budget (Qwen's processor
    scales every image to between min_pixels and max_pixels; vLLM also profiles the vision tower with the largest
    such image at start-up, so the budget bounds that memory too)."""
    return [
        "--max-model-len", str(plan.max_model_len),
        "--max-num-seqs", str(plan.max_num_seqs),
        "--dtype", plan.dtype,
        "--limit-mm-per-prompt", json.dumps({"image": plan.max_images_per_request, "video": 0}),
        # Qwen's processor's own keys (transformers deprecates the max_pixels / min_pixels aliases; vLLM's
        # qwen3_vl.py reads both).
        "--mm-processor-kwargs", json.dumps({"size": {"longest_edge": plan.max_pixels,
                                                      "shortest_edge": plan.min_pixels}}),
    ]


def stream_interval(settings: EngineSettings, plan: EnginePlan, *, on_gpu: bool) -> int:
    """Tokens each replica puts in one streamed event after the first (vLLM's ``--stream-interval``; the first token
    and the end of an answer go at once, vllm/v1/engine/output_processor.py): ``engine.stream_interval``, or with
    ``auto`` 1 on CPU and on GPUs the fewest that keep the events of every stream this launcher's replicas hold at
    once (``replicas x plan.concurrency`` at ``STREAM_TOKENS_PER_S``) within ``GATEWAY_EVENTS_PER_S``: one gateway
    process relays them all, and an event costs it the same CPU whatever it carries."""
    if settings.stream_interval != "auto":
        return settings.stream_interval
    if not on_gpu:
        return 1
    tokens_per_s = settings.replicas * plan.concurrency * STREAM_TOKENS_PER_S
    return max(1, math.ceil(tokens_per_s / GATEWAY_EVENTS_PER_S))


def _cpu_share(index: int, replicas: int, cpus: int) -> str:
    """Give each CPU replica its own cores, or they fight over the same ones."""
    per = max(1, cpus // replicas)
    first = (index * per) % cpus
    last = min(first + per, cpus) - 1
    return f"{first}-{last}" if last > first else str(first)


def _number(value: float) -> str:
    return f"{value:g}"
