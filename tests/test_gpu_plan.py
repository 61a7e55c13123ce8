"""What the launcher starts on each GPU of the README's table: the whole engine command line, from nvidia-smi as
recorded on those cards (this machine has no GPU: tests/nvidia_smi.py is the one fake, and it says where its format
comes from), through the same code `airlock up` runs (runner.plan_engines, and the CLI with nvidia-smi on PATH).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from server.config import ConfigError, Settings, load_settings
from server.gpus import discover_gpus
from server.profiles import load_profiles
from server.runner import EnginesPlan, plan_engines
from server.sizing import CARDS, Card, DoesNotFit, card_table

from .conftest import AIRLOCK, ROOT, airlock_env, write_config
from .nvidia_smi import CARDS as RECORDED_CARDS
from .nvidia_smi import fake_nvidia_smi, recorded

PROFILES = load_profiles()


def install_every_model(models: Path) -> Path:
    """Every shipped Qwen3-VL profile's directory, as a department that carried them all in would have it."""
    for profile in PROFILES.values():
        if profile.directory:
            (models / profile.directory).mkdir(parents=True, exist_ok=True)
            (models / profile.directory / "config.json").write_text("{}")
    return models


def settings_for(tmp_path: Path, **engine: object) -> Settings:
    return load_settings(engine={"models_dir": str(install_every_model(tmp_path / "models")), "device": "gpu",
                                 **engine})


def plan_on(recording: str, tmp_path: Path, environ: dict[str, str] | None = None, **engine: object) -> EnginesPlan:
    return plan_engines(settings_for(tmp_path, **engine), tmp_path / "run", environ or {}, recorded(recording))


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, name
    return argv[argv.index(name) + 1]


def table_rows() -> dict[tuple[str, str], list[str]]:
    lines = card_table(PROFILES).splitlines()[2:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {(row[0], row[1]): row[2:] for row in rows}


def recording_of(card_name: str) -> str:
    """The recorded host whose one GPU nvidia-smi names ``card_name``."""
    for host in RECORDED_CARDS:
        (gpu,) = discover_gpus({}, recorded(host))
        if gpu.name == card_name:
            return host
    raise AssertionError(f"no recording of {card_name}")


SINGLE_CARDS = [card for card in CARDS if card.count == 1]


@pytest.mark.parametrize("variant", ["instruct", "thinking"])
@pytest.mark.parametrize("card", SINGLE_CARDS, ids=[card.label for card in SINGLE_CARDS])
def test_each_card_in_the_readme_table_gets_that_command_line(tmp_path: Path, card: Card, variant: str) -> None:
    label = card.label
    model, precision, context, at_once = table_rows()[(label, variant)]
    recording = recording_of(card.name)
    if model.startswith("does not fit"):
        with pytest.raises(DoesNotFit, match="no Qwen3-VL fits"):
            plan_on(recording, tmp_path, variant=variant)
        return
    planned = plan_on(recording, tmp_path, variant=variant)
    (launch,) = planned.launches
    argv = launch.argv
    profile = planned.choice.profile
    assert flag(argv, "--served-model-name") == model
    assert Path(flag(argv, "--model")).name == profile.directory
    assert (profile.quantization == "fp8") == precision.startswith("FP8")
    assert flag(argv, "--dtype") == ("float16" if card.compute_capability < (8, 0) else "bfloat16")
    assert flag(argv, "--max-model-len") == context.replace(",", "")
    # vLLM may run twice what the gateway will give it (the gateway's fair queue is what limits).
    assert flag(argv, "--max-num-seqs") == str(min(256, 2 * int(at_once)))
    assert json.loads(flag(argv, "--limit-mm-per-prompt")) == {"image": 16, "video": 0}
    assert json.loads(flag(argv, "--mm-processor-kwargs")) == {"size": {"longest_edge": 4096 * 32 * 32,
                                                                        "shortest_edge": 64 * 32 * 32}}
    assert flag(argv, "--gpu-memory-utilization") == "0.9"
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert "--mm-encoder-tp-mode" not in argv
    assert argv[argv.index("--enable-auto-tool-choice") + 1:argv.index("--enable-auto-tool-choice") + 3] == [
        "--tool-call-parser", "hermes"]
    assert (flag(argv, "--reasoning-parser") == "qwen3") if variant == "thinking" else "--reasoning-parser" not in argv
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "--enforce-eager" not in argv and "VLLM_CPU_KVCACHE_SPACE" not in launch.env


def test_tensor_parallel_pairs_run_the_vision_tower_data_parallel(tmp_path: Path) -> None:
    planned = plan_on("two-l4", tmp_path, tensor_parallel_size=2)
    (launch,) = planned.launches
    row = table_rows()[("2 x L4 (tensor parallel 2)", "instruct")]
    assert flag(launch.argv, "--served-model-name") == row[0]
    assert flag(launch.argv, "--max-model-len") == row[2].replace(",", "")
    assert flag(launch.argv, "--tensor-parallel-size") == "2"
    assert flag(launch.argv, "--mm-encoder-tp-mode") == "data"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_replicas_get_distinct_gpus_and_a_preset_cuda_visible_devices_is_kept(tmp_path: Path) -> None:
    # A shared host: the operator leaves GPUs 0-1 and 3-4 to others.
    planned = plan_on("h100x8", tmp_path, {"CUDA_VISIBLE_DEVICES": "2,5,6,7"}, replicas=2, tensor_parallel_size=2)
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in planned.launches] == ["2,5", "6,7"]
    planned = plan_on("h100x8", tmp_path, {"CUDA_VISIBLE_DEVICES": "5,2"}, replicas=2)
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in planned.launches] == ["5", "2"]
    with pytest.raises(ConfigError, match="need 3 GPUs"):
        plan_on("h100x8", tmp_path, {"CUDA_VISIBLE_DEVICES": "2,5"}, replicas=3)


def test_mig_slices_are_used_by_their_uuids_and_sized_as_slices(tmp_path: Path) -> None:
    # A container given a 3g.40gb and a 1g.10gb slice of an A100 80GB: the memory query is refused there, and the
    # old launcher concluded "no GPU". Both replicas are sized for the smaller slice (the same model everywhere).
    # (A 1g.10gb slice holds the 4B FP8 with a short context only: 9,984 MiB x 0.9 less 7.2 GiB is about 10,000
    # tokens of KV cache, too few for a fitted 8,192 plus the estimate's margin; set explicitly, 8,192 fits.)
    slices = discover_gpus({}, recorded("a100-80gb-mig"))
    small = {"model": "qwen3-vl-4b-instruct-fp8", "max_model_len": 8192}
    planned = plan_on("a100-80gb-mig", tmp_path, replicas=2, **small)
    assert planned.device == "gpu"
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in planned.launches] == [gpu.device for gpu in slices]
    assert all(device.startswith("MIG-") for device in (gpu.device for gpu in slices))
    smallest = min(slices, key=lambda gpu: gpu.total_mib)
    alone = plan_engines(settings_for(tmp_path, **small), tmp_path / "run", {"CUDA_VISIBLE_DEVICES": smallest.device},
                         recorded("a100-80gb-mig"))
    assert flag(planned.launches[0].argv, "--max-model-len") == flag(alone.launches[0].argv, "--max-model-len")
    assert planned.plan == alone.plan


def test_an_explicit_context_is_used_as_given_or_refused(tmp_path: Path) -> None:
    planned = plan_on("l4", tmp_path, model="qwen3-vl-8b-instruct-fp8", max_model_len=16384, max_num_seqs=6)
    assert flag(planned.launches[0].argv, "--max-model-len") == "16384"
    assert flag(planned.launches[0].argv, "--max-num-seqs") == "6"
    with pytest.raises(DoesNotFit, match=r"engine\.max_model_len 16,384 does not fit"):
        plan_on("l4", tmp_path, model="qwen3-vl-8b-instruct", max_model_len=16384)


def test_a_gpu_busy_with_another_process_is_refused_before_anything_starts(tmp_path: Path) -> None:
    # The old-driver T4 recording reports only part of its memory free (another process holds some).
    (gpu,) = discover_gpus({}, recorded("old-driver"))
    assert gpu.free_mib is not None
    utilization = min(0.99, round(gpu.free_mib / gpu.total_mib + 0.02, 2))
    with pytest.raises(DoesNotFit, match="refuses to start with less free"):
        plan_on("old-driver", tmp_path, model="qwen3-vl-4b-instruct-fp8", gpu_memory_utilization=utilization)


# -- the CLI, as an operator runs it, with nvidia-smi on PATH printing the recordings ------------------------------

def run_airlock(tmp_path: Path, recording: str, command: list[str], engine: dict[str, object],
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_nvidia_smi(bin_dir, recording)
    config = write_config(tmp_path / "airlock.yaml", {
        "engine": {"models_dir": str(install_every_model(tmp_path / "models")), "socket_dir": str(tmp_path / "s"),
                   **engine},
    })
    env = airlock_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run([*AIRLOCK, *command, "--config", str(config)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_dry_run_prints_the_sizing_and_the_gpu_command_line(tmp_path: Path) -> None:
    result = run_airlock(tmp_path, "l4", ["engine", "--dry-run"], {})
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["device"], printed["served_model_name"], printed["profile"]) == (
        "gpu", "Qwen3-VL-8B-Instruct", "qwen3-vl-8b-instruct-fp8")
    assert printed["gpus"] == [[{"device": "0", "name": "NVIDIA L4", "total_mib": 23034}]]
    assert printed["sizing"]["max_model_len"] == 32768 and printed["sizing"]["max_num_seqs"] == 26
    (replica,) = printed["replicas"]
    for expected in ("--max-model-len 32768", "--max-num-seqs 26", "--mm-processor-kwargs", "--limit-mm-per-prompt",
                     "--enable-auto-tool-choice --tool-call-parser hermes", "--gpu-memory-utilization 0.9"):
        assert expected in replica["argv"]
    assert replica["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_nothing_fits_is_a_clear_refusal_with_status_2_and_no_engine_started(tmp_path: Path) -> None:
    # A 12 GB card cannot hold a Thinking model's shortest useful context (32,768 tokens) in any precision.
    result = run_airlock(tmp_path, "rtx-3060", ["up"], {"variant": "thinking"})
    assert result.returncode == 2, result.stderr
    assert "no Qwen3-VL fits NVIDIA GeForce RTX 3060 with a useful context" in result.stderr
    assert "Qwen3-VL-4B-Thinking (FP8) does not fit" in result.stderr
    assert "replica 0 started" not in result.stderr + result.stdout


def l4_and_v100(argv: list[str]) -> str:
    """A host with two generations of cards (made from the L4 and V100 recordings)."""
    if argv[1] == "-L":
        return ("GPU 0: NVIDIA L4 (UUID: GPU-1e40b220-7c8e-5576-a308-9a61b422ff43)\n"
                "GPU 1: Tesla V100-SXM2-32GB (UUID: GPU-beb88d54-e6a6-58bc-814c-7d4c7c197c2d)\n")
    return ("0, GPU-1e40b220-7c8e-5576-a308-9a61b422ff43, NVIDIA L4, 23034, 22563, 8.9\n"
            "1, GPU-beb88d54-e6a6-58bc-814c-7d4c7c197c2d, Tesla V100-SXM2-32GB, 32768, 32446, 7.0\n")


def test_replicas_on_cards_of_different_generations_are_refused(tmp_path: Path) -> None:
    # One plan serves every replica: FP8 and bf16 for the L4 would be refused by the V100.
    with pytest.raises(ConfigError, match="different generations"):
        plan_engines(settings_for(tmp_path, replicas=2), tmp_path / "run", {}, l4_and_v100)
    planned = plan_engines(settings_for(tmp_path), tmp_path / "run", {"CUDA_VISIBLE_DEVICES": "0"}, l4_and_v100)
    assert flag(planned.launches[0].argv, "--served-model-name") == "Qwen3-VL-8B-Instruct"
    # The V100 alone: older than vLLM's CUDA build runs.
    with pytest.raises(DoesNotFit, match=r"older than vLLM 0\.32's CUDA build"):
        plan_engines(settings_for(tmp_path), tmp_path / "run", {"CUDA_VISIBLE_DEVICES": "1"}, l4_and_v100)


def test_the_demo_keeps_its_own_image_budget_when_real_weights_are_missing(tmp_path: Path) -> None:
    # engine.max_pixels is set for the real model; with its weights not yet carried in, the demo serves meanwhile.
    settings = load_settings(engine={"models_dir": str(tmp_path / "empty"), "device": "cpu",
                                     "max_pixels": 4096 * 32 * 32})
    planned = plan_engines(settings, tmp_path / "run", {})
    assert planned.choice.is_demo
    assert json.loads(flag(planned.launches[0].argv, "--mm-processor-kwargs")) == {
        "size": {"longest_edge": 1024 * 1024, "shortest_edge": 1024}}


def test_a_cuda_visible_devices_hiding_every_gpu_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    planned = plan_on("h100x8", tmp_path, {"CUDA_VISIBLE_DEVICES": ""}, device="auto")
    assert planned.device == "cpu"
    assert "CUDA_VISIBLE_DEVICES gives this process no GPU" in caplog.text
    with pytest.raises(ConfigError, match="no GPU is usable"):
        plan_on("h100x8", tmp_path, {"CUDA_VISIBLE_DEVICES": "-1"})
