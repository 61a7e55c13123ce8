"""Engine profiles (configs/models/*.yaml) and the choice of which model to serve.

Models load only from a local directory. A name that is not a profile and not an existing directory is an
error, never a hub download.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ConfigError, EngineSettings, describe_validation_error

log = logging.getLogger(__name__)

DEMO_PROFILE = "airlock-demo"
GENERIC_PROFILE = "qwen3-vl-generic"


class EngineProfile(BaseModel):
    """What a model needs from vLLM; privacy flags are not here on purpose (they are not negotiable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    served_model_name: str
    # Where the weights come from, outside the air gap (for the operator; never fetched by Airlock).
    source: str | None = None
    # Directory name under engine.models_dir.
    directory: str | None = None
    size: Literal["4b", "8b"] | None = None
    variant: Literal["instruct", "thinking"] | None = None
    # The checkpoint's weight format: None (bf16/fp16 as published) or fp8 (Qwen's official FP8 checkpoints,
    # fine-grained, block size 128; vLLM reads the format from the checkpoint's config).
    quantization: Literal["fp8"] | None = None
    # What sizing (server/sizing.py) needs, from the model's config.json: GiB the weights take on the GPU(s) as
    # loaded; KV cache bytes per token (layers x KV heads x head dim x 2 (K and V) x 2 bytes); GiB vLLM uses beyond
    # weights and KV cache per GPU (activations at its profiling run, CUDA graphs, NCCL and other non-torch memory).
    weights_gib: float = Field(0, ge=0)
    kv_cache_bytes_per_token: int = Field(0, ge=0)
    overhead_gib: float = Field(0, ge=0)
    # Context in tokens: the most worth having (the engine gets this where the GPU holds it) and the least that is
    # useful (below it the profile is not started on that GPU).
    max_model_len: int = Field(ge=256)
    min_model_len: int = Field(4096, ge=256)
    # Tokens of the context kept for the answer when the images' share is worked out (Thinking: long reasoning).
    answer_reserve_tokens: int = Field(2048, ge=0)
    # Image budget (Qwen's processor max_pixels / min_pixels; 32x32 pixels a token).
    max_pixels: int = Field(4096 * 32 * 32, ge=1024)
    min_pixels: int = Field(64 * 32 * 32, ge=1024)
    max_images_per_request: int = Field(ge=0)
    reasoning_parser: str | None = None
    # vLLM's parser for the model's tool calls; with it the engine starts with --enable-auto-tool-choice, so
    # `tools` with tool_choice auto, required or a named function work (null: the model has no tool calling).
    tool_call_parser: str | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: str = "auto"
    extra_args: list[str] = Field(default_factory=list)


def default_profiles_dir() -> Path:
    """configs/models, shipped inside the wheel as server/engine_profiles or read from the source tree."""
    packaged = Path(__file__).parent / "engine_profiles"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs" / "models"


def load_profiles(directory: Path | None = None) -> dict[str, EngineProfile]:
    directory = directory or default_profiles_dir()
    profiles: dict[str, EngineProfile] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            profile = EngineProfile(**(yaml.safe_load(path.read_text()) or {}))
        except ValidationError as exc:
            raise ConfigError(f"engine profile {path.name}: {describe_validation_error(exc)}") from exc
        except (OSError, yaml.YAMLError, TypeError) as exc:
            raise ConfigError(f"engine profile {path.name} cannot be read") from exc
        profiles[profile.name] = profile
    if DEMO_PROFILE not in profiles or GENERIC_PROFILE not in profiles:
        raise ConfigError(f"engine profiles in {directory} are incomplete (need {DEMO_PROFILE}, {GENERIC_PROFILE})")
    return profiles


def detect_gpu_free_gb() -> list[float]:
    """Free memory of each visible NVIDIA GPU in GiB; empty when there is none (or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=15, check=True,
        ).stdout
        return [int(line) / 1024 for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


@dataclass(frozen=True)
class ModelChoice:
    """The model a launcher will serve, and why."""

    path: Path
    profile: EngineProfile
    served_name: str
    is_demo: bool
    reason: str


def choose_size(free_gb_per_gpu: list[float], tensor_parallel: int, profiles: dict[str, EngineProfile],
                variant: str) -> EngineProfile:
    """With ``model: auto``: the largest Qwen3-VL whose memory need fits a replica's GPUs (4B on CPU)."""
    candidates = sorted(
        (p for p in profiles.values() if p.variant == variant and p.size is not None),
        key=lambda p: p.min_gpu_memory_gb,
        reverse=True,
    )
    if not candidates:
        raise ConfigError(f"no engine profile for variant {variant!r}")
    if not free_gb_per_gpu:
        return next(p for p in reversed(candidates))
    group = free_gb_per_gpu[:tensor_parallel]
    capacity = min(group) * len(group)
    for profile in candidates:
        if profile.min_gpu_memory_gb <= capacity:
            return profile
    return candidates[-1]


def choose_model(settings: EngineSettings, free_gb_per_gpu: list[float],
                 profiles: dict[str, EngineProfile]) -> ModelChoice:
    """Turn ``engine.model`` into a local directory and a profile."""
    demo = profiles[DEMO_PROFILE]
    demo_name = settings.served_model_name or demo.served_model_name
    model = settings.model
    if model == "demo":
        return ModelChoice(settings.demo_model_dir, demo, demo_name, True, "engine.model is 'demo'")
    if model == "auto":
        profile = choose_size(free_gb_per_gpu, settings.tensor_parallel_size, profiles, settings.variant)
        path = settings.models_dir / (profile.directory or profile.name)
        name = settings.served_model_name or profile.served_model_name
        if _looks_like_model(path):
            return ModelChoice(path, profile, name, False, "engine.model is 'auto'")
        return ModelChoice(
            settings.demo_model_dir, demo, demo_name, True,
            f"engine.model is 'auto' and no {profile.served_model_name} weights are in {path}",
        )
    if model in profiles:
        profile = profiles[model]
        path = settings.models_dir / (profile.directory or profile.name)
    else:
        path = Path(model).expanduser()
        profile = _profile_for_path(path, settings.profile, profiles)
    if not _looks_like_model(path):
        raise ConfigError(
            f"engine.model: {path} is not a local model directory (no config.json). Airlock never downloads "
            "models: copy the weights there (see the README, 'Serving real Qwen3-VL weights')."
        )
    default_name = path.name if profile.name == GENERIC_PROFILE else profile.served_model_name
    return ModelChoice(path, profile, settings.served_model_name or default_name, False, "engine.model names it")


def _profile_for_path(path: Path, explicit: str | None, profiles: dict[str, EngineProfile]) -> EngineProfile:
    if explicit is not None:
        if explicit not in profiles:
            raise ConfigError(f"engine.profile: no profile named {explicit!r} (known: {', '.join(sorted(profiles))})")
        return profiles[explicit]
    for profile in profiles.values():
        if profile.directory and profile.directory.lower() == path.name.lower():
            return profile
    return profiles[GENERIC_PROFILE]


def _looks_like_model(path: Path) -> bool:
    return (path / "config.json").is_file()
