"""Engine profiles (configs/models/*.yaml) and the choice of which model to serve.

Models load only from a local directory. A name that is not a profile and not an existing directory is an
error, never a hub download.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import ConfigError, EngineSettings, describe_validation_error
from .gpus import Gpu
from .sizing import PIXELS_PER_TOKEN, EnginePlan, auto_candidates, choose_profile

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
    # Of weights_gib, the vision tower's share: whole on every GPU of a tensor-parallel group, which runs it with
    # --mm-encoder-tp-mode data (vllm/config/multimodal.py: "hosting the full weights on each TP rank").
    vision_weights_gib: float = Field(0, ge=0)
    kv_cache_bytes_per_token: int = Field(0, ge=0)
    # From config.json's text_config (0: not known): how tensor parallel can split the model.
    num_attention_heads: int = Field(0, ge=0)
    num_key_value_heads: int = Field(0, ge=0)
    overhead_gib: float = Field(0, ge=0)
    # Context in tokens: the most worth having (the engine gets this where the GPU holds it) and the least that is
    # useful (below it the profile is not started on that GPU).
    max_model_len: int = Field(ge=256)
    min_model_len: int = Field(4096, ge=256)
    # The model's own longest context (config.json's max_position_embeddings; 0: not known): vLLM refuses a
    # max_model_len above it.
    max_position_embeddings: int = Field(0, ge=0)
    # Tokens of the context kept for the answer beside one image of the budget (Thinking: long reasoning).
    answer_reserve_tokens: int = Field(2048, ge=0)
    # A typical request's tokens, prompt and answer, when more than admission.expected_tokens_per_request (Thinking:
    # its reasoning comes on top): what its concurrency is sized for (0: the admission setting's).
    expected_tokens_per_request: int = Field(0, ge=0)
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

    @model_validator(mode="after")
    def _consistent(self) -> EngineProfile:
        """The context range and image budget must agree: even the shortest context holds one image of max_pixels
        and the answer reserve, so no single image can take a request's whole context."""
        if self.min_model_len > self.max_model_len:
            raise ValueError(f"min_model_len ({self.min_model_len}) is above max_model_len ({self.max_model_len})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        if self.vision_weights_gib > self.weights_gib:
            raise ValueError("vision_weights_gib is part of weights_gib and cannot be larger")
        one_image = self.max_pixels // PIXELS_PER_TOKEN + self.answer_reserve_tokens
        if self.max_images_per_request and self.min_model_len < one_image:
            raise ValueError(f"min_model_len ({self.min_model_len}) does not hold one image of max_pixels "
                             f"({self.max_pixels // PIXELS_PER_TOKEN} tokens) plus answer_reserve_tokens "
                             f"({self.answer_reserve_tokens})")
        return self


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


@dataclass(frozen=True)
class ModelChoice:
    """The model a launcher will serve, and why."""

    path: Path
    profile: EngineProfile
    served_name: str
    is_demo: bool
    reason: str
    # With model: auto on GPUs, the sizing that chose it (the launcher may size a named model itself).
    plan: EnginePlan | None = None


def choose_model(settings: EngineSettings, group: Sequence[Gpu], profiles: dict[str, EngineProfile],
                 expected_tokens_per_request: int = 4096) -> ModelChoice:
    """Turn ``engine.model`` into a local directory and a profile.

    ``group`` is one replica's GPUs (empty on CPU). With ``auto`` the choice is server/sizing.py's (the same card
    always gets the same model); without the chosen weights installed, the demo, saying what would fit and where
    its weights go. On CPU, auto means the smallest Qwen3-VL."""
    demo = profiles[DEMO_PROFILE]
    demo_name = settings.served_model_name or demo.served_model_name
    model = settings.model
    if model == "demo":
        return ModelChoice(settings.demo_model_dir, demo, demo_name, True, "engine.model is 'demo'")
    if model == "auto":
        def path_of(profile: EngineProfile) -> Path:
            return settings.models_dir / (profile.directory or profile.name)

        candidates = auto_candidates(profiles, settings.variant, settings.quantization)
        if not candidates:
            raise ConfigError(f"no engine profile for variant {settings.variant!r}")
        plan: EnginePlan | None = None
        if group:
            plan = choose_profile(candidates, group, settings, expected_tokens_per_request,
                                  installed=lambda profile: _looks_like_model(path_of(profile)))
            profile = plan.profile
        else:
            unquantised = [p for p in candidates if p.quantization is None]
            profile = (unquantised or candidates)[-1]
        path = path_of(profile)
        name = settings.served_model_name or profile.served_model_name
        if _looks_like_model(path):
            reason = f"engine.model is 'auto': {plan.reason}" if plan else "engine.model is 'auto' (no GPU)"
            return ModelChoice(path, profile, name, False, reason, plan)
        fits = f"; it would fit: {plan.reason}" if plan else ""
        source = f" (from {profile.source})" if profile.source else ""
        missing = f"no {profile.served_model_name} weights{source} are in {path}{fits}"
        if settings.verify_model == "require" or settings.manifest_public_key is not None:
            # Verified (or signed) weights were asked for (the Helm chart does): a random-weight demo is no fallback.
            asked = ("engine.verify_model is 'require'" if settings.verify_model == "require"
                     else "engine.manifest_public_key is set")
            raise ConfigError(f"engine.model is 'auto' and {asked}, but {missing}. Copy the "
                              "weights there (see the README, 'Serving real Qwen3-VL weights')")
        return ModelChoice(settings.demo_model_dir, demo, demo_name, True, f"engine.model is 'auto' and {missing}")
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
    if profile.name == GENERIC_PROFILE:
        profile = sized_from_directory(profile, path)
    return ModelChoice(path, profile, settings.served_model_name or default_name, False, "engine.model names it")


def sized_from_directory(profile: EngineProfile, path: Path) -> EngineProfile:
    """The generic profile with the directory's own figures (a fine-tune, a smaller or quantised build): weights
    from the size of its ``*.safetensors`` files, KV cache per token and heads from its ``config.json``
    (``text_config`` for Qwen3-VL: layers x KV heads x head dim x 2 (K, V) x 2 bytes). What the directory does not
    say keeps the profile's (8B) figure."""
    update: dict[str, float | int] = {}
    weights = sum(file.stat().st_size for file in path.glob("*.safetensors") if file.is_file())
    if weights:
        update["weights_gib"] = round(weights / 1024**3, 2)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    text = config.get("text_config", config) if isinstance(config, dict) else {}
    keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
            "max_position_embeddings")
    figures = {key: text.get(key) for key in keys} if isinstance(text, dict) else {}
    known = {key: value for key, value in figures.items() if isinstance(value, int) and value > 0}
    if "max_position_embeddings" in known:
        update["max_position_embeddings"] = known["max_position_embeddings"]
    if "head_dim" not in known and {"hidden_size", "num_attention_heads"} <= known.keys():
        known["head_dim"] = known["hidden_size"] // known["num_attention_heads"]
    if {"num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"} <= known.keys():
        update.update(
            kv_cache_bytes_per_token=known["num_hidden_layers"] * known["num_key_value_heads"] * known["head_dim"] * 4,
            num_attention_heads=known["num_attention_heads"], num_key_value_heads=known["num_key_value_heads"],
        )
    return profile.model_copy(update=update) if update else profile


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
