"""Build a tiny, real Qwen3-VL checkpoint on the spot, with no download.

Its weights are random, so its answers are noise; it exists so that Airlock runs out of the box and the test
suite drives a real vLLM engine without hub access. The architecture, tokenizer special tokens, chat template and
processor follow Qwen3-VL closely enough that vLLM loads and serves it exactly like the real models.

This module imports torch and transformers; only the engine side (``airlock demo-model``) uses it, never the
gateway.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# Marks a finished build; written last so an interrupted build is rebuilt instead of half-loaded.
COMPLETE_MARKER = "airlock-demo-model.json"
DEMO_MODEL_NAME = "airlock-demo-qwen3-vl"
# Raised when a build changes what the engine sees (2: the chat template renders tools): an older build is rebuilt.
BUILD_VERSION = 2

# Qwen3-VL's chat template, reduced to what the demo needs: system/user/assistant turns, text and image parts, the
# Thinking switch, and tool calling as Qwen3-VL writes it (the tools in the system turn, calls as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, which vLLM's hermes parser reads; results as
# <tool_response> in a user turn). Image parts expand to the vision placeholder tokens vLLM looks for. Turns are
# joined without Qwen's newlines, as the first demo builds wrote them: what the random weights answer depends on the
# exact prompt, and the tests' expectations (answers long enough to stream in pieces) were measured with it.
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part['type'] in ['image', 'image_url'] or 'image' in part -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part['type'] in ['video', 'video_url'] -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(first=0) -%}
{%- if tools -%}
    {{- '<|im_start|>system' -}}
    {%- if messages and messages[0]['role'] == 'system' -%}
        {{- render(messages[0]['content']) + '\n\n' -}}
        {%- set ns.first = 1 -%}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": ' -}}
    {{- '<args-json-object>}\n</tool_call><|im_end|>' -}}
{%- endif -%}
{%- for message in messages[ns.first:] -%}
    {%- if message['role'] == 'tool' -%}
        {%- if loop.first or loop.previtem['role'] != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + render(message['content']) + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem['role'] != 'tool' -%}
            {{- '<|im_end|>' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + render(message['content']) -}}
        {%- for call in message['tool_calls'] or [] -%}
            {%- set call = call['function'] if call['function'] is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' + call['name'] + '", "arguments": ' -}}
            {%- if call['arguments'] is string -%}
                {{- call['arguments'] -}}
            {%- else -%}
                {{- call['arguments'] | tojson -}}
            {%- endif -%}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>' -}}
    {%- endif -%}
{%- endif -%}
"""

_TRAINING_TEXT = (
    "Airlock answers questions about invoices, contracts, screenshots and scans. "
    "The total amount due is 1,234.56 EUR. Invoice number 2026-0042, dated 22 November 2026. "
    '{"name": "value", "items": [1, 2, 3], "ok": true, "box": [10, 20, 30, 40]} '
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:-_()[]{}<>/\\'\" "
)


def is_built(directory: Path) -> bool:
    """True when ``directory`` holds a complete demo model from an earlier build of this version."""
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("build_version") == BUILD_VERSION


def build_demo_model(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen3-VL (about 1-2 MB) to ``directory`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (  # type: ignore[attr-defined]
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_TRAINING_TEXT] * 20, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "dtype": "bfloat16",
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)  # type: ignore[no-untyped-call,arg-type]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)

    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        min_pixels=32 * 32, max_pixels=1024 * 1024,
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    marker: dict[str, Any] = {"name": DEMO_MODEL_NAME, "random_weights": True, "seed": seed,
                              "build_version": BUILD_VERSION}
    (directory / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
    return directory


def ensure_demo_model(directory: Path) -> Path:
    """Build the demo model once; later calls reuse it."""
    if not is_built(directory):
        log.info("building the demo model (random weights) at %s", directory)
        build_demo_model(directory)
    return directory
