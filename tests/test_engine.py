"""Engine command lines: every privacy setting is on and cannot be undone."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from server.config import ConfigError, load_settings
from server.engine import (
    GATEWAY_EVENTS_PER_S,
    GENERATION_CONFIG_FLAG,
    PRIVACY_ARGS,
    PRIVACY_ENV,
    STREAM_TOKENS_PER_S,
    VLLM_SERVER_MODULE,
    ReplicaLaunch,
    check_extra_args,
)
from server.privacy import HARDENED_START
from server.profiles import load_profiles
from server.runner import plan_engines
from server.upstream import KEEPALIVE_EXPIRY_S

from .conftest import AIRLOCK, ROOT, airlock_env, stop, wait_ready, write_config
from .nvidia_smi import recorded
from .servers import free_port

PROFILES = load_profiles()


def fake_model(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def launches(tmp_path: Path, device: str = "cpu", parent_env: dict[str, str] | None = None,
             max_tokens_limit: int = 8192, recording: str = "h100x8", **engine: object) -> list[ReplicaLaunch]:
    """The launcher's plan (runner.plan_engines) on CPU, or on GPU from a host's recorded nvidia-smi (no GPU here).
    On CPU a real profile needs the KV cache of its shortest context (Thinking: 32,768 tokens, 4.5 GiB): 8 GiB."""
    engine.setdefault("cpu_kvcache_gb", 8)
    settings = load_settings(engine={"models_dir": str(tmp_path), "device": device, **engine},
                             screening={"max_tokens_limit": max_tokens_limit})
    planned = plan_engines(settings, tmp_path / "run", parent_env or {},
                           recorded(recording) if device == "gpu" else None, cpu_count=8)
    return planned.launches


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_every_privacy_setting_is_on(tmp_path: Path, device: str) -> None:
    (launch,) = launches(tmp_path, device, model="demo")
    for arg in PRIVACY_ARGS:
        assert arg in launch.argv
    for name, value in PRIVACY_ENV.items():
        assert launch.env[name] == value
    assert launch.env["VLLM_NO_USAGE_STATS"] == "1" and launch.env["HF_HUB_OFFLINE"] == "1"
    assert flag_value(launch.argv, "--mm-processor-cache-gb") == "0"
    assert json.loads(flag_value(launch.argv, "--limit-mm-per-prompt"))["video"] == 0
    assert "--enable-log-requests" not in launch.argv
    assert "--allowed-local-media-path" not in launch.argv
    assert not any(arg.startswith("--trust-remote-code") for arg in launch.argv)
    # Started hardened (no core dumps, not dumpable: see test_privacy_hardening.py), then vLLM's server module.
    assert launch.argv[1:4] == ["-c", HARDENED_START, VLLM_SERVER_MODULE]
    assert launch.env["VLLM_HOST_IP"] == "127.0.0.1"  # else vLLM routes towards 8.8.8.8 to find its address


def test_engines_keep_idle_connections_longer_than_the_gateway_does(tmp_path: Path) -> None:
    (launch,) = launches(tmp_path, model="demo", parent_env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "1"})
    assert int(launch.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > 4 * KEEPALIVE_EXPIRY_S


def test_engines_bind_to_private_unix_sockets_by_default(tmp_path: Path) -> None:
    (launch,) = launches(tmp_path, model="demo")
    assert flag_value(launch.argv, "--uds") == str(tmp_path / "run" / "replica-0.sock")
    assert launch.url == f"unix:{tmp_path / 'run' / 'replica-0.sock'}"
    assert "--host" not in launch.argv


def test_tcp_binding_is_loopback_only(tmp_path: Path) -> None:
    first, second = launches(tmp_path, model="demo", bind="tcp", replicas=2, base_port=9100)
    assert flag_value(first.argv, "--host") == "127.0.0.1"
    assert (flag_value(first.argv, "--port"), flag_value(second.argv, "--port")) == ("9100", "9101")


def test_environment_is_scrubbed_of_anything_that_could_leak(tmp_path: Path) -> None:
    parent = {
        "PATH": "/usr/bin",
        "VLLM_MEDIA_CACHE": "/tmp/media",
        "VLLM_REQUEST_BODY_LOG_LEVEL": "DEBUG",
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "VLLM_NO_USAGE_STATS": "0",
        "HF_TOKEN": "hf_secret",
        "https_proxy": "http://proxy:3128",
        "HTTPS_PROXY": "http://proxy:3128",
        "VLLM_CPU_OMP_THREADS_BIND": "0-3",
    }
    (launch,) = launches(tmp_path, parent_env=parent, model="demo")
    for leaked in ("VLLM_MEDIA_CACHE", "VLLM_REQUEST_BODY_LOG_LEVEL", "HF_TOKEN", "https_proxy", "HTTPS_PROXY"):
        assert leaked not in launch.env
    assert launch.env["VLLM_LOGGING_LEVEL"] == "INFO"
    assert launch.env["VLLM_NO_USAGE_STATS"] == "1"
    assert launch.env["PATH"] == "/usr/bin"
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"  # tuning the operator may keep


@pytest.mark.parametrize(
    "arg",
    [
        "--enable-log-requests", "--enable_log_requests", "--enable-log-req", "--no-disable-uvicorn-access-log",
        "--allowed-local-media-path=/", "--mm-processor-cache-gb=8", "--host=0.0.0.0", "--port", "--uds",
        "--config", "--model", "--enable-log-outputs", "--trust-remote-code", "--api-key=x",
        # TLS comes from engine.tls only: a weaker --ssl-cert-reqs or another CA would let other clients in.
        "--ssl-keyfile=k", "--ssl-certfile", "--ssl-ca-certs=/etc/ssl/certs/ca-certificates.crt", "--ssl-cert-reqs=0",
        "--ssl_cert_reqs", "--ssl-ciphers=ALL", "--no-enable-ssl-refresh", "--ssl",
        # vLLM's dotted JSON spelling sets the same flag (--limit-mm-per-prompt '{"image": 99}').
        "--limit-mm-per-prompt.image", "--limit_mm_per_prompt.image=99", "--media-io-kwargs.image.x=1",
        # Imports a Python file into the engine, as --middleware does.
        "--tool-parser-plugin=/tmp/parser.py",
    ],
)
def test_extra_args_cannot_touch_privacy_binding_or_model(tmp_path: Path, arg: str) -> None:
    with pytest.raises(ConfigError, match="cannot be overridden"):
        check_extra_args([arg])
    with pytest.raises(ConfigError):
        launches(tmp_path, model="demo", extra_args=[arg])


def test_harmless_extra_args_pass_through(tmp_path: Path) -> None:
    (launch,) = launches(tmp_path, model="demo", extra_args=["--enable-prefix-caching", "--max-num-batched-tokens",
                                                             "4096"])
    assert launch.argv[-3:] == ["--enable-prefix-caching", "--max-num-batched-tokens", "4096"]


@pytest.mark.parametrize(("arg", "setting"), [
    ("--max-model-len=65536", "engine.max_model_len"), ("--max_num_seqs", "engine.max_num_seqs"),
    ("--gpu-memory-utilization=0.95", "engine.gpu_memory_utilization"), ("--dtype=half", "engine.dtype"),
    ("--quantization=fp8", "engine.quantization"), ("--mm-processor-kwargs.max_pixels=99999999", "engine.max_pixels"),
    ("--tensor-parallel-size=2", "engine.tensor_parallel_size"), ("--max-model", "engine.max_model_len"),
    ("-q", "engine.quantization"), ("-tp=2", "engine.tensor_parallel_size"), ("-qfp8", "engine.quantization"),
    ("-tp2", "engine.tensor_parallel_size"), ("-pp", "engine.tensor_parallel_size"), ("-dp=2", "engine.replicas"),
    ("--pipeline-parallel-size=2", "engine.tensor_parallel_size"), ("--data-parallel-size", "engine.replicas"),
    ("--stream-interval=4", "engine.stream_interval"), ("--stream_interval", "engine.stream_interval"),
])
def test_extra_args_cannot_resize_what_airlock_sized(tmp_path: Path, arg: str, setting: str) -> None:
    # Passed twice, argparse keeps the last: the engine would run other than planned (and than the gateway
    # believes: its image budget, its concurrency).
    with pytest.raises(ConfigError, match=rf"set by Airlock \(sized to the GPU, or from a setting\): set {setting}"):
        launches(tmp_path, model="demo", extra_args=[arg])


def generation_config(launch: ReplicaLaunch) -> dict[str, object]:
    """The one --override-generation-config an engine gets (argparse would keep only the last of several)."""
    assert launch.argv.count(GENERATION_CONFIG_FLAG) == 1
    assert not any(arg.startswith((f"{GENERATION_CONFIG_FLAG}=", f"{GENERATION_CONFIG_FLAG}.")) for arg in launch.argv)
    value: dict[str, object] = json.loads(flag_value(launch.argv, GENERATION_CONFIG_FLAG))
    return value


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_request_without_max_tokens_gets_the_server_limit_as_the_engines_default(
    tmp_path: Path, device: str, profile: str,
) -> None:
    # Only max_new_tokens: vLLM merges it key by key into the model's generation_config.json ("auto"), so Qwen's
    # recommended temperature, top_p and top_k stay (test_vllm_keeps_the_models_sampling_with_our_default).
    model = "demo" if profile == "airlock-demo" else str(fake_model(tmp_path, "weights"))
    extra: dict[str, object] = {} if profile == "airlock-demo" else {"profile": profile}
    (launch,) = launches(tmp_path, device, max_tokens_limit=3000, model=model, **extra)
    assert generation_config(launch) == {"max_new_tokens": 3000}
    assert "--generation-config" not in launch.argv  # "auto": the model's own generation config is read


@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [
        # One JSON object, the = form, vLLM's dotted keys, underscores: all read as vLLM reads them.
        ([GENERATION_CONFIG_FLAG, '{"temperature": 0.2, "top_k": 5}'], {"temperature": 0.2, "top_k": 5}),
        ([f"{GENERATION_CONFIG_FLAG}={{\"max_new_tokens\": 512}}"], {"max_new_tokens": 512}),
        (["--override_generation_config.top_p", "0.9", "--override-generation-config.repetition_penalty=1.05"],
         {"top_p": 0.9, "repetition_penalty": 1.05}),
    ],
)
def test_an_operators_generation_config_is_merged_with_the_default(
    tmp_path: Path, extra_args: list[str], expected: dict[str, object],
) -> None:
    (launch,) = launches(tmp_path, model="demo", max_tokens_limit=4000,
                         extra_args=["--max-num-batched-tokens", "4096", *extra_args, "--enable-prefix-caching"])
    assert generation_config(launch) == {"max_new_tokens": 4000, **expected}
    assert launch.argv[-3:] == ["--max-num-batched-tokens", "4096", "--enable-prefix-caching"]


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ([GENERATION_CONFIG_FLAG, '{"max_new_tokens": 9000}'], "from 1 to screening.max_tokens_limit"),
        ([f"{GENERATION_CONFIG_FLAG}.max_new_tokens=0"], "from 1 to screening.max_tokens_limit"),
        ([GENERATION_CONFIG_FLAG, "[1]"], "takes a JSON object"),
        ([GENERATION_CONFIG_FLAG], "needs a value"),
        (["--override-generation", "{}"], "spell --override-generation-config in full"),
    ],
)
def test_a_generation_config_that_cannot_be_merged_is_refused_at_start_up(
    tmp_path: Path, extra_args: list[str], message: str,
) -> None:
    with pytest.raises(ConfigError, match=message):
        launches(tmp_path, model="demo", max_tokens_limit=8192, extra_args=extra_args)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_starts_with_tool_calling(tmp_path: Path, device: str, profile: str) -> None:
    model = "demo" if profile == "airlock-demo" else str(fake_model(tmp_path, "weights"))
    extra = {} if profile == "airlock-demo" else {"profile": profile}
    (launch,) = launches(tmp_path, device, model=model, **extra)
    assert "--enable-auto-tool-choice" in launch.argv
    assert flag_value(launch.argv, "--tool-call-parser") == "hermes"


def test_gpu_replicas_get_their_own_gpus(tmp_path: Path) -> None:
    fake_model(tmp_path, "Qwen3-VL-8B-Instruct")
    replicas = launches(tmp_path, "gpu", model="qwen3-vl-8b-instruct", replicas=2, tensor_parallel_size=2)
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in replicas] == ["0,1", "2,3"]
    assert all(flag_value(launch.argv, "--tensor-parallel-size") == "2" for launch in replicas)
    assert all("--enforce-eager" not in launch.argv for launch in replicas)
    assert flag_value(replicas[0].argv, "--gpu-memory-utilization") == "0.9"


def test_streamed_events_carry_one_token_each_unless_one_gateway_relays_a_large_host(tmp_path: Path) -> None:
    """engine.stream_interval auto (vLLM's --stream-interval): token by token on CPU and for one GPU; eight 80 GB
    replicas of the 8B hold ~750 streams, ~30,000 tokens a second, which the one gateway process of `airlock up`
    relays in events of several tokens (after the first, which goes at once)."""
    fake_model(tmp_path, "Qwen3-VL-8B-Instruct")
    (cpu,) = launches(tmp_path, model="demo")
    assert flag_value(cpu.argv, "--stream-interval") == "1"
    (one,) = launches(tmp_path, "gpu", model="qwen3-vl-8b-instruct")
    assert flag_value(one.argv, "--stream-interval") == "1"
    settings = load_settings(engine={"models_dir": str(tmp_path), "device": "gpu", "model": "qwen3-vl-8b-instruct",
                                     "replicas": 8})
    planned = plan_engines(settings, tmp_path / "run", {}, recorded("h100x8"), cpu_count=8)
    streams = 8 * planned.plan.concurrency
    assert streams > 700  # the profiles' largest host (README, "One gateway process, eight GPUs")
    tokens = {flag_value(launch.argv, "--stream-interval") for launch in planned.launches}
    assert tokens == {str(math.ceil(streams * STREAM_TOKENS_PER_S / GATEWAY_EVENTS_PER_S))}
    assert tokens == {"4"}  # as the README's table says
    # Set, it is used as is, on either device.
    chosen_8 = launches(tmp_path, "gpu", model="qwen3-vl-8b-instruct", replicas=8, stream_interval=1)
    assert {flag_value(launch.argv, "--stream-interval") for launch in chosen_8} == {"1"}
    (chosen,) = launches(tmp_path, model="demo", stream_interval=5)
    assert flag_value(chosen.argv, "--stream-interval") == "5"


def test_one_replica_of_tensor_parallel_4_is_enough_for_two_tokens_an_event(tmp_path: Path) -> None:
    """One replica (as each engine pod of the chart) at tensor parallel 4 on 80 GB cards holds the 256 sequences'
    cap: 10,240 tokens a second at 40 each, so auto is 2 there, not 1 (values.yaml, engine.streamInterval)."""
    fake_model(tmp_path, "Qwen3-VL-8B-Instruct")
    (one,) = launches(tmp_path, "gpu", model="qwen3-vl-8b-instruct", tensor_parallel_size=4)
    assert flag_value(one.argv, "--tensor-parallel-size") == "4" and flag_value(one.argv, "--stream-interval") == "2"


@pytest.mark.parametrize("value", [0, 65, "fast", 2.5])
def test_a_stream_interval_out_of_range_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="stream_interval"):
        load_settings(engine={"stream_interval": value})


def test_cpu_replicas_get_their_own_cores(tmp_path: Path) -> None:
    replicas = launches(tmp_path, model="demo", replicas=2, cpu_kvcache_gb=2)
    assert [launch.env["VLLM_CPU_OMP_THREADS_BIND"] for launch in replicas] == ["0-3", "4-7"]
    assert all(launch.env["VLLM_CPU_KVCACHE_SPACE"] == "2" for launch in replicas)


def test_thinking_models_get_the_reasoning_parser(tmp_path: Path) -> None:
    fake_model(tmp_path, "Qwen3-VL-4B-Thinking")
    fake_model(tmp_path, "Qwen3-VL-4B-Instruct")
    (thinking,) = launches(tmp_path, "gpu", model="qwen3-vl-4b-thinking")
    (instruct,) = launches(tmp_path, "gpu", model="qwen3-vl-4b-instruct")
    assert flag_value(thinking.argv, "--reasoning-parser") == "qwen3"
    assert "--reasoning-parser" not in instruct.argv
    assert flag_value(thinking.argv, "--served-model-name") == "Qwen3-VL-4B-Thinking"


def test_dry_run_with_replicas_and_tensor_parallel_flags() -> None:
    result = subprocess.run(
        [*AIRLOCK, "engine", "--dry-run", "--model", "demo", "--replicas", "2", "--tensor-parallel", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    replicas = json.loads(result.stdout)["replicas"]
    assert [replica["url"].rsplit("/", 1)[-1] for replica in replicas] == ["replica-0.sock", "replica-1.sock"]
    assert all("--tensor-parallel-size 1" in replica["argv"] for replica in replicas)
    # Two CPU replicas on this machine: each is pinned to its own share of the cores.
    assert len({replica["env"].get("VLLM_CPU_OMP_THREADS_BIND") for replica in replicas}) == 2


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    result = subprocess.run(
        [*AIRLOCK, "engine", "--dry-run", "--model", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["demo"] is True
    assert "--disable-uvicorn-access-log" in plan["replicas"][0]["argv"]
    # The screening limit (40,960 by default: Qwen's output length for Thinking models) is the engine's default
    # answer length; tool calling is on.
    assert f"{GENERATION_CONFIG_FLAG} '{{\"max_new_tokens\": 40960}}'" in plan["replicas"][0]["argv"]
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in plan["replicas"][0]["argv"]
    assert plan["replicas"][0]["env"]["VLLM_NO_USAGE_STATS"] == "1"
    # vLLM logs through Airlock's format (tests/test_logs.py), shipped in the package.
    assert Path(plan["replicas"][0]["env"]["VLLM_LOGGING_CONFIG_PATH"]).is_file()


ENGINE_TLS = {"cert_file": "/etc/airlock/tls/engine.pem", "key_file": "/etc/airlock/tls/engine.key",
              "client_ca_file": "/etc/airlock/tls/gateway-ca.pem"}


@pytest.mark.parametrize(("host", "reached_at"), [("0.0.0.0", "127.0.0.1"), ("engine-b.internal", "engine-b.internal"),
                                                  ("::", "[::1]")])
def test_tls_engines_require_a_client_certificate_and_are_reached_over_https(
    tmp_path: Path, host: str, reached_at: str,
) -> None:
    first, second = launches(tmp_path, model="demo", bind="tcp", host=host, replicas=2, base_port=9100,
                             tls=ENGINE_TLS)
    for launch in (first, second):
        assert flag_value(launch.argv, "--ssl-certfile") == ENGINE_TLS["cert_file"]
        assert flag_value(launch.argv, "--ssl-keyfile") == ENGINE_TLS["key_file"]
        assert flag_value(launch.argv, "--ssl-ca-certs") == ENGINE_TLS["client_ca_file"]
        assert flag_value(launch.argv, "--ssl-cert-reqs") == "2"  # ssl.CERT_REQUIRED
        assert "--enable-ssl-refresh" in launch.argv
        assert "RSA-AES128-GCM" in flag_value(launch.argv, "--ssl-ciphers")
        assert flag_value(launch.argv, "--host") == host
    assert (first.url, second.url) == (f"https://{reached_at}:9100", f"https://{reached_at}:9101")


def test_engines_without_tls_get_no_tls_flags(tmp_path: Path) -> None:
    for launch in (*launches(tmp_path, model="demo", bind="tcp"), *launches(tmp_path, model="demo")):
        assert not any("ssl" in arg for arg in launch.argv)
        assert not launch.url.startswith("https")


def test_dry_run_shows_the_tls_flags(tmp_path: Path) -> None:
    config = tmp_path / "engine.yaml"
    config.write_text(yaml.safe_dump({"engine": {"bind": "tcp", "host": "0.0.0.0", "tls": ENGINE_TLS}}))
    result = subprocess.run([*AIRLOCK, "engine", "--dry-run", "--model", "demo", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (replica,) = json.loads(result.stdout)["replicas"]
    assert replica["url"] == "https://127.0.0.1:8100"
    assert (f"--ssl-certfile {ENGINE_TLS['cert_file']} --ssl-keyfile {ENGINE_TLS['key_file']} "
            f"--ssl-ca-certs {ENGINE_TLS['client_ca_file']} --ssl-cert-reqs 2") in replica["argv"]
    assert "--enable-ssl-refresh" in replica["argv"]


# Run in a child: importing vLLM here would load torch into the test process. Reads the engine's argv (everything
# after the server module) with vLLM's own parser, builds its model config and says what vLLM will do with it.
VLLM_READS_ARGV = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.tool_parsers import ToolParserManager
from vllm.utils.argparse_utils import FlexibleArgumentParser

args = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))
ToolParserManager.get_tool_parser(args.tool_call_parser)  # raises for a name vLLM does not know
print(json.dumps({"defaults": EngineArgs.from_cli_args(args).create_model_config().get_diff_sampling_param(),
                  "auto_tool_choice": args.enable_auto_tool_choice, "tool_call_parser": args.tool_call_parser}))
"""


def test_vllm_keeps_the_models_sampling_with_our_default(tmp_path: Path, demo_model_dir: Path) -> None:
    """vLLM merges our max_new_tokens into the model's generation_config.json key by key: Qwen3-VL-Instruct's
    recommended sampling (from its generation_config.json) stays, and the default answer length is the limit."""
    model = tmp_path / "Qwen3-VL-4B-Instruct"
    shutil.copytree(demo_model_dir, model)
    qwen_sampling = {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7}
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "do_sample": True, **qwen_sampling}))
    (launch,) = launches(tmp_path, model=str(model), profile="qwen3-vl-4b-instruct", max_tokens_limit=3000,
                         max_model_len=4096, max_pixels=1024 * 1024)  # the demo's context holds a 1024-token image
    engine_args = launch.argv[launch.argv.index(VLLM_SERVER_MODULE) + 1:]
    result = subprocess.run([launch.argv[0], "-c", VLLM_READS_ARGV, json.dumps(engine_args)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**launch.env, "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["defaults"] == {**qwen_sampling, "max_tokens": 3000}
    assert seen["auto_tool_choice"] is True and seen["tool_call_parser"] == "hermes"


DEMO_CONTEXT = PROFILES["airlock-demo"].max_model_len


@pytest.fixture(scope="module")
def make_run_stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[tuple[str, Path]]:
    """`make run` as a new user starts it: the demo profile's context (4,096 tokens) under the default
    screening.max_tokens_limit (40,960), no sign-in on loopback. Its gateway's URL and its engine's socket."""
    workdir = tmp_path_factory.mktemp("make-run")
    port = free_port()
    config = write_config(workdir / "airlock.yaml", {
        "gateway": {"port": port},
        "engine": {"model": "demo", "demo_model_dir": str(demo_model_dir), "socket_dir": str(workdir / "sockets"),
                   "cpu_kvcache_gb": 1},
    })
    assert load_settings(config).screening.max_tokens_limit > DEMO_CONTEXT
    log_path = workdir / "airlock.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "up", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env=airlock_env())
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base_url}/readyz", process, log_path, 600)
        yield base_url, workdir / "sockets" / "replica-0.sock"
    finally:
        stop(process)


QUESTION = [{"role": "user", "content": "Describe this server."}]


@pytest.mark.engine
def test_an_engine_bounds_its_default_answer_length_by_the_context(make_run_stack: tuple[str, Path]) -> None:
    # Straight to the engine: the default (screening.max_tokens_limit, above this context) becomes what is left of
    # the context, not a 400. ignore_eos makes the random-weight model use all of it.
    _, socket = make_run_stack
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://engine", timeout=300) as engine:
        answer = engine.post("/v1/chat/completions", json={
            "model": "airlock-demo-qwen3-vl", "messages": QUESTION, "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == DEMO_CONTEXT
    assert answer.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.engine
def test_the_most_common_sdk_call_works_when_the_limit_is_above_the_context(make_run_stack: tuple[str, Path]) -> None:
    """The issue's first report: no max_tokens (or null) against `make run` got 400 "max_tokens=8192 cannot be
    greater than max_model_len=4096", blaming a value the user never sent."""
    base_url, _ = make_run_stack
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)
    answer = client.chat.completions.create(model="airlock-demo-qwen3-vl", messages=QUESTION)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.total_tokens <= DEMO_CONTEXT
    null = httpx.post(f"{base_url}/v1/chat/completions", timeout=300,
                      json={"model": "airlock-demo-qwen3-vl", "messages": QUESTION, "max_tokens": None})
    assert null.status_code == 200, null.text
    assert null.json()["usage"]["total_tokens"] <= DEMO_CONTEXT
