"""Sizing (server/sizing.py): model, precision, context, image budget and concurrency per GPU, by vLLM 0.32's rules.

There is no GPU here: the GPUs are described as nvidia-smi reports them (memory.total in MiB, compute_cap), and
every figure below is worked by hand in the comments from the profiles' estimates, not recomputed by the code's
formula. The figures a real card gives are measured by `make gpu-check`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import main as airlock
from server.config import ConfigError, EngineSettings, load_settings
from server.gpus import Gpu
from server.profiles import load_profiles
from server.sizing import (
    DoesNotFit,
    auto_candidates,
    card_table,
    check_free_memory,
    check_tensor_parallel,
    choose_profile,
    plan_cpu,
    plan_engine,
)

from .conftest import ROOT

PROFILES = load_profiles()
EXPECTED = 4096  # admission.expected_tokens_per_request's default

L4 = Gpu("0", "NVIDIA L4", 23034, None, (8, 9))
A10G = Gpu("0", "NVIDIA A10G", 23028, None, (8, 6))
T4 = Gpu("0", "Tesla T4", 15360, None, (7, 5))
V100 = Gpu("0", "Tesla V100-SXM2-32GB", 32768, None, (7, 0))
RTX3060 = Gpu("0", "NVIDIA GeForce RTX 3060", 12288, None, (8, 6))
A100_80 = Gpu("0", "NVIDIA A100-SXM4-80GB", 81920, None, (8, 0))


def engine(**values: object) -> EngineSettings:
    return EngineSettings.model_validate(values)


def plan(name: str, *group: Gpu, **values: object):  # type: ignore[no-untyped-def]
    return plan_engine(PROFILES[name], list(group), engine(**values), EXPECTED)


def auto(gpu: Gpu, variant: str = "instruct", quantization: str = "auto", **values: object):  # type: ignore[no-untyped-def]
    settings = engine(variant=variant, quantization=quantization, **values)
    return choose_profile(auto_candidates(PROFILES, variant, quantization), [gpu], settings, EXPECTED)


# -- rule 1: the budget is utilization x TOTAL memory; the KV cache must hold one whole sequence ----------------

def test_8b_bf16_on_an_l4_gets_what_is_left_of_0_9_x_total() -> None:
    # Budget: ceil(0.9 x 23,034 MiB) = ceil(21,737,609,625.6) = 21,737,609,626 B (20.24 GiB).
    # Weights 16.3 GiB = 17,501,991,731 B, overhead 2.6 GiB = 2,791,728,742 B: 1,443,889,153 B of KV cache (1.34 GiB).
    # / 147,456 B a token = 9,792 tokens = 612 blocks of 16, less vLLM's null block: 611 blocks = 9,776 tokens.
    # Fitted, it leaves a margin of max(977, 4,096) = 4,096 tokens: 9,776 - 4,096 = 5,680, floored to 1,024s = 5,120,
    # below the Instruct minimum (8,192): refused.
    with pytest.raises(DoesNotFit) as refused:
        plan("qwen3-vl-8b-instruct", L4)
    assert refused.value.short == "Qwen3-VL-8B-Instruct (bfloat16) holds 5,680 of the 8,192 tokens it needs"
    # An explicit context is held to the 9,776 tokens themselves (no margin): all of them fit, one more does not.
    result = plan("qwen3-vl-8b-instruct", L4, max_model_len=9776)
    assert (result.kv_cache_tokens, result.max_model_len) == (9776, 9776)
    # 9,776 // 4,096 = 2 at once; vLLM's --max-num-seqs 2 x 2 = 4.
    assert (result.concurrency, result.max_num_seqs) == (2, 4)
    assert (result.dtype, result.gpu_memory_utilization) == ("bfloat16", 0.9)
    assert not result.comfortable  # 9,776 < 4 x 4,096 = 16,384
    with pytest.raises(DoesNotFit, match=r"engine\.max_model_len 9,777 does not fit"):
        plan("qwen3-vl-8b-instruct", L4, max_model_len=9777)


def test_an_explicit_context_that_does_not_fit_is_refused_with_need_and_budget() -> None:
    # 16,384 tokens: 1,024 blocks + the null block = 1,025 x 16 x 147,456 B = 2,418,278,400 B (2.25 GiB) of KV cache.
    # 16.3 + 2.6 + 2.25 = 21.15 GiB per GPU (the "about 23.5 GiB" is this / 0.9), budget 20.24 GiB.
    with pytest.raises(DoesNotFit) as refused:
        plan("qwen3-vl-8b-instruct", L4, max_model_len=16384)
    message = str(refused.value)
    assert "21.2 GiB per GPU" in message and "budget is 20.2 GiB" in message
    assert "engine.max_model_len 16,384" in message and "9,776 tokens" in message


def test_an_explicit_context_that_fits_is_used_as_is() -> None:
    result = plan("qwen3-vl-8b-instruct", L4, max_model_len=9000)
    assert result.max_model_len == 9000  # not floored: the operator chose it
    assert result.kv_cache_tokens == 9776


def test_below_the_minimum_context_the_profile_does_not_fit() -> None:
    # 12 GB RTX 3060, 4B bf16: ceil(0.9 x 12,288 MiB) = 11,596,411,700 B - 8.3 GiB (8,912,057,139) - 2.0 GiB
    # (2,147,483,648) = 536,870,913 B / 147,456 = 3,640 tokens -> 227 blocks - 1 = 3,616 tokens < 8,192.
    # The margin is max(361, 4,096) = 4,096 tokens, so it needs 8,192 + 4,096 = 12,288 tokens: 769 blocks x 16
    # x 147,456 = 1,814,298,624 B of KV cache + 11,059,540,787 B = 12,873,839,411 B (11.99 GiB) per GPU.
    with pytest.raises(DoesNotFit, match=r"Qwen3-VL-4B-Instruct \(bfloat16\) does not fit: its shortest useful "
                                         r"context \(8,192 tokens\), with a margin of 4,096 tokens for the estimate, "
                                         r"needs 12\.0 GiB per GPU .* the budget is 10\.8 GiB") as refused:
        plan("qwen3-vl-4b-instruct", RTX3060)
    # It holds 3,616 - 4,096 < 0 tokens: said as 0.
    assert refused.value.short == "Qwen3-VL-4B-Instruct (bfloat16) holds 0 of the 8,192 tokens it needs"


def test_a_fitted_context_leaves_a_margin_below_the_kv_cache() -> None:
    # L4, 8B Thinking FP8: 21,737,609,626 - 10.2 GiB (10,952,166,604) - 2,791,728,742 = 7,993,714,280 B / 147,456
    # = 54,210 tokens -> 3,388 blocks - 1 = 54,192 tokens. Margin: max(int(5,419.2), 4,096) = 5,419 tokens;
    # 54,192 - 5,419 = 48,773, floored to 1,024s = 48,128 (without the margin it would be 53,248).
    result = plan("qwen3-vl-8b-thinking-fp8", L4)
    assert (result.kv_cache_tokens, result.max_model_len) == (54192, 48128)
    # An explicit context is checked against the estimate itself: 54,192 fits, 54,193 does not.
    assert plan("qwen3-vl-8b-thinking-fp8", L4, max_model_len=54192).max_model_len == 54192
    with pytest.raises(DoesNotFit, match=r"engine\.max_model_len 54,193 does not fit"):
        plan("qwen3-vl-8b-thinking-fp8", L4, max_model_len=54193)


def test_a_higher_utilization_gives_a_bigger_cache() -> None:
    # 0.95 x 23,034 MiB = 22,945,254,605 B - 20,293,720,473 = 2,651,534,132 B / 147,456 = 17,981 -> 1,123 blocks - 1
    # = 1,122 x 16 = 17,952 tokens; margin max(1,795, 4,096) = 4,096: 13,856 -> context 13,312 (0.9 gave none).
    result = plan("qwen3-vl-8b-instruct", L4, gpu_memory_utilization=0.95)
    assert (result.kv_cache_tokens, result.max_model_len, result.gpu_memory_utilization) == (17952, 13312, 0.95)


def test_tensor_parallel_splits_the_language_model_and_keeps_the_vision_tower_whole() -> None:
    # 2 x L4, 8B bf16: per GPU (16.3 - 1.1) / 2 + 1.1 = 8.7 GiB of weights (9,341,553,868 B) + 2.6 GiB overhead;
    # 21,737,609,626 - 9,341,553,868 - 2,791,728,742 = 9,604,327,016 B each, x 2 GPUs = 19,208,654,032 B
    # / 147,456 = 130,267 tokens -> 8,141 blocks - 1 = 130,240 tokens; margin 13,024: 117,216, so the whole 32,768.
    # 130,240 // 4,096 = 31 at once; --max-num-seqs 2 x 31 = 62.
    result = plan("qwen3-vl-8b-instruct", L4, Gpu("1", "NVIDIA L4", 23034, None, (8, 9)))
    assert (result.kv_cache_tokens, result.max_model_len) == (130240, 32768)
    assert (result.concurrency, result.max_num_seqs) == (31, 62)


def test_tensor_parallel_must_split_the_heads_evenly() -> None:
    profile = PROFILES["qwen3-vl-8b-instruct"]
    assert (profile.num_attention_heads, profile.num_key_value_heads) == (32, 8)
    # 32 attention heads: 3 and 6 do not divide them (32 = 3 x 10 + 2 = 6 x 5 + 2).
    for tp in (3, 6):
        with pytest.raises(ConfigError, match=rf"engine\.tensor_parallel_size {tp}: .*32 attention heads and 8 KV"):
            check_tensor_parallel(profile, tp)
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel_size 3"):
        plan("qwen3-vl-8b-instruct", L4, L4, L4)
    # 2, 4 and 8 divide both 32 and 8; 16 divides 32, and 8 KV heads divide 16 (each is replicated on two ranks).
    for tp in (2, 4, 8, 16):
        check_tensor_parallel(profile, tp)


def test_beyond_eight_ranks_the_kv_heads_are_replicated_not_split() -> None:
    # 16 x L4, 8B bf16: per GPU (16.3 - 1.1) / 16 + 1.1 = 2.05 GiB of weights (2,201,170,739 B) + 2,791,728,742 B of
    # overhead; 21,737,609,626 - 2,201,170,739 - 2,791,728,742 = 16,744,710,145 B each. The 8 KV heads spread over
    # 8 ranks only: x 8 = 133,957,681,160 B / 147,456 = 908,458 tokens -> 56,778 blocks - 1 = 908,432 tokens
    # (x 16 would say 1,816,917). 908,432 // 4,096 = 221 at once; --max-num-seqs min(256, 442) = 256.
    result = plan("qwen3-vl-8b-instruct", *[Gpu(str(i), "NVIDIA L4", 23034, None, (8, 9)) for i in range(16)])
    assert (result.kv_cache_tokens, result.concurrency, result.max_num_seqs) == (908432, 221, 256)


def test_the_smallest_gpu_of_a_group_decides() -> None:
    small = Gpu("1", "NVIDIA L4", 20000, None, (8, 9))
    assert plan("qwen3-vl-8b-instruct", L4, small).kv_cache_tokens < plan(
        "qwen3-vl-8b-instruct", L4, L4).kv_cache_tokens


# -- rule 2: vLLM's free-memory check at start-up ------------------------------------------------------------

def test_a_gpu_with_memory_held_by_another_process_is_refused() -> None:
    # vLLM needs ceil(0.9 x 23,034 MiB) = 21,737,609,626 B free once its CUDA context (512 MiB) is made.
    # 21,242 MiB - 512 = 20,730 MiB = 21,736,980,480 B: short by 629,146 B (21,242 MiB = 20.7 GiB).
    busy = Gpu("GPU-5f2c0d9e-1111-2222-3333-444455556666", "NVIDIA L4", 23034, 21242, (8, 9))
    with pytest.raises(DoesNotFit) as refused:
        plan("qwen3-vl-8b-instruct-fp8", busy)
    message = str(refused.value)
    assert message.startswith("a GPU (NVIDIA L4) has 20.7 GiB free of 22.5 GiB")
    assert "another process" in message and "engine.gpu_memory_utilization" in message
    assert "GPU-5f2c" not in message  # named by model, never by UUID
    # 21,243 MiB - 512 = 20,731 MiB = 21,738,029,056 B is enough.
    assert plan("qwen3-vl-8b-instruct-fp8", Gpu("0", "NVIDIA L4", 23034, 21243, (8, 9))).max_model_len == 32768
    # Free memory unknown (MIG in a container): nothing to check.
    check_free_memory([L4], 0.9)


def test_free_memory_leaves_512_mib_for_vllms_cuda_context() -> None:
    # 0.5 x 16,384 MiB = 8,192 MiB exactly. 8,704 MiB free - 512 = 8,192: enough; 8,703 - 512 = 8,191: refused.
    check_free_memory([Gpu("0", "NVIDIA RTX A4000", 16384, 8704, (8, 6))], 0.5)
    with pytest.raises(DoesNotFit, match=r"a GPU \(NVIDIA RTX A4000\) has 8\.5 GiB free .*512 MiB for its CUDA"):
        check_free_memory([Gpu("0", "NVIDIA RTX A4000", 16384, 8703, (8, 6))], 0.5)
    # Exactly utilization x total free (8,192 MiB) is no longer enough: vLLM's context would take from it.
    with pytest.raises(DoesNotFit, match="another process"):
        check_free_memory([Gpu("0", "NVIDIA RTX A4000", 16384, 8192, (8, 6))], 0.5)


def test_free_memory_never_changes_the_choice() -> None:
    # The same card gets the same model whatever a few MiB of driver memory do; only the free check may refuse.
    # (21,243 MiB free is the least the 0.9 budget starts with: see above.)
    roomy = Gpu("0", "NVIDIA L4", 23034, 22800, (8, 9))
    tighter = Gpu("0", "NVIDIA L4", 23034, 21300, (8, 9))
    assert auto(roomy).profile.name == auto(tighter).profile.name == "qwen3-vl-8b-instruct-fp8"
    with pytest.raises(DoesNotFit, match="another process"):
        auto(Gpu("0", "NVIDIA L4", 23034, 15000, (8, 9)))


# -- rules 3 and 4: model facts and precision ----------------------------------------------------------------

def test_model_facts_from_config_json() -> None:
    for name in ("qwen3-vl-8b-instruct", "qwen3-vl-4b-thinking", "qwen3-vl-8b-thinking-fp8"):
        # 36 layers x 8 KV heads x head_dim 128 x 2 (K, V) x 2 bytes.
        assert PROFILES[name].kv_cache_bytes_per_token == 36 * 8 * 128 * 2 * 2 == 147456
        assert (PROFILES[name].num_attention_heads, PROFILES[name].num_key_value_heads) == (32, 8)
    assert PROFILES["qwen3-vl-8b-instruct"].weights_gib == 16.3
    assert PROFILES["qwen3-vl-4b-instruct"].weights_gib == 8.3
    assert PROFILES["qwen3-vl-8b-instruct-fp8"].weights_gib == 10.2
    assert PROFILES["qwen3-vl-4b-thinking-fp8"].weights_gib == 5.2


@pytest.mark.parametrize(("gpu", "dtype"), [(T4, "float16"), (L4, "bfloat16"), (A100_80, "bfloat16")])
def test_dtype_auto_follows_compute_capability(gpu: Gpu, dtype: str) -> None:
    assert plan("qwen3-vl-4b-instruct", gpu).dtype == dtype


def test_bfloat16_asked_for_on_a_t4_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"Tesla T4 .*has no bfloat16"):
        plan("qwen3-vl-4b-instruct", T4, dtype="bfloat16")
    assert plan("qwen3-vl-4b-instruct", L4, dtype="float16").dtype == "float16"


def test_gpus_older_than_vllms_cuda_build_and_fp8_need_compute_capability_7_5() -> None:
    # vLLM 0.32's PyTorch is built with CUDA 13, for compute capability 7.5 and later: a V100 (7.0) runs nothing,
    # bf16, fp16 or FP8 (whose own minimum, Fp8Config.get_min_capability(), is 75 too).
    for name in ("qwen3-vl-4b-instruct-fp8", "qwen3-vl-4b-instruct"):
        with pytest.raises(DoesNotFit, match=r"compute capability 7\.0\) is older than vLLM 0\.32's CUDA build"):
            plan(name, V100)
    with pytest.raises(DoesNotFit) as refused:
        auto(V100)
    # Said once, not once for each candidate.
    assert str(refused.value).count("older than vLLM 0.32's CUDA build") == 1
    # A T4 (7.5) runs them through vLLM's weight-only Marlin kernel, in float16.
    assert plan("qwen3-vl-4b-instruct-fp8", T4).dtype == "float16"


def test_a_gpu_that_does_not_say_its_capability_is_taken_as_mig_capable() -> None:
    mig = Gpu("MIG-0c4e", "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192, None, None)
    assert plan("qwen3-vl-8b-instruct", mig).dtype == "bfloat16"


# -- rule 5: context ranges and the image budget -------------------------------------------------------------

def test_thinking_profiles_are_sized_for_long_reasoning() -> None:
    for size in ("4b", "8b"):
        for suffix in ("", "-fp8"):
            thinking = PROFILES[f"qwen3-vl-{size}-thinking{suffix}"]
            assert (thinking.max_model_len, thinking.min_model_len, thinking.answer_reserve_tokens) == (
                65536, 32768, 24576)
            instruct = PROFILES[f"qwen3-vl-{size}-instruct{suffix}"]
            assert (instruct.max_model_len, instruct.min_model_len, instruct.answer_reserve_tokens) == (
                32768, 8192, 2048)


def test_images_per_request_are_the_profiles_or_the_setting_whatever_the_card() -> None:
    # The profile's 16 on every card and context: A100 80 GB 8B bf16 (32,768 tokens), L4 8B FP8 (32,768), T4 4B FP8
    # (32,768), L4 8B Thinking FP8 (48,128), A100 Thinking (65,536), and an explicit 7,000 tokens on an L4 with
    # images of 1,024 tokens (room for (7,000 - 2,048) // 1,024 = 4 of them: still 16, vLLM answers 400 beyond).
    result = plan("qwen3-vl-8b-instruct", A100_80)
    assert (result.max_model_len, result.max_images_per_request) == (32768, 16)
    assert (result.max_pixels, result.min_pixels) == (4096 * 32 * 32, 64 * 32 * 32)
    assert plan("qwen3-vl-8b-instruct-fp8", L4).max_images_per_request == 16
    assert plan("qwen3-vl-4b-instruct-fp8", T4).max_images_per_request == 16
    assert plan("qwen3-vl-8b-thinking-fp8", L4).max_images_per_request == 16
    assert plan("qwen3-vl-8b-thinking", A100_80).max_images_per_request == 16
    assert plan("qwen3-vl-8b-instruct", L4, max_model_len=7000, max_pixels=1024 * 1024).max_images_per_request == 16
    # Half the pixels: still 16.
    assert plan("qwen3-vl-8b-instruct", A100_80, max_pixels=2048 * 32 * 32).max_images_per_request == 16
    # engine.max_images_per_request, whatever the card: 3 on an A100 and on a T4, none where it says none.
    assert plan("qwen3-vl-8b-instruct", A100_80, max_images_per_request=3).max_images_per_request == 3
    assert plan("qwen3-vl-4b-instruct-fp8", T4, max_images_per_request=3).max_images_per_request == 3
    assert plan("qwen3-vl-8b-instruct", A100_80, max_images_per_request=0).max_images_per_request == 0


def test_an_image_budget_the_context_cannot_hold_is_refused() -> None:
    # 8,192 tokens explicit, images of 8,192 tokens (8,388,608 pixels) + the 2,048 reserve do not fit.
    with pytest.raises(ConfigError, match="no room for one image"):
        plan("qwen3-vl-8b-instruct", A100_80, max_model_len=8192, max_pixels=8192 * 1024)
    with pytest.raises(ValidationError, match="min_pixels"):
        plan("qwen3-vl-8b-instruct", A100_80, min_pixels=8192 * 1024, max_pixels=4096 * 1024)
    # One of them set: checked against the profile's other one, saying so.
    with pytest.raises(ConfigError, match=r"engine.min_pixels \(5,000,000\) is above engine.max_pixels \(4,194,304, "
                                          "the profile default"):
        plan("qwen3-vl-8b-instruct", A100_80, min_pixels=5_000_000)


def test_the_demo_on_cpu_keeps_its_profile_values() -> None:
    # 4 GiB of KV cache / 512 B a token = 8,388,608 tokens -> 65,536 blocks of 128 - 1 = 8,388,480 tokens: far more
    # than 4,096 + the margin (838,848); 8,388,480 // 4,096 = 2,047 at once, capped at vLLM's CPU default of 128,
    # and --max-num-seqs min(128, 2 x 128) = 128. Images: the profile's 16.
    result = plan_cpu(PROFILES["airlock-demo"], engine(), EXPECTED)
    assert (result.max_model_len, result.max_num_seqs, result.kv_cache_tokens) == (4096, 128, 8388480)
    assert result.concurrency == 128
    assert (result.max_pixels, result.min_pixels, result.max_images_per_request) == (1024 * 1024, 1024, 16)
    assert result.dtype == "bfloat16"


def test_a_real_model_on_cpu_is_held_to_its_kv_cache() -> None:
    # 4 GiB / 147,456 B = 29,127 tokens -> 227 blocks of 128 - 1 = 226 x 128 = 28,928 tokens; margin 4,096: 24,832
    # -> context 24,576; 28,928 // 4,096 = 7 at once, --max-num-seqs 14.
    result = plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(), EXPECTED)
    assert (result.kv_cache_tokens, result.max_model_len) == (28928, 24576)
    assert (result.concurrency, result.max_num_seqs) == (7, 14)
    with pytest.raises(DoesNotFit, match=r"engine\.cpu_kvcache_gb"):
        plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(max_model_len=32768), EXPECTED)


def test_vllm_cpu_blocks_are_128_tokens() -> None:
    # 4 GiB / 147,456 B = 29,127 tokens: in blocks of 128, 227 - 1 = 226 blocks = 28,928 tokens (in blocks of 16 it
    # would be 1,820 - 1 = 1,819 blocks = 29,104). An explicit context of 28,928 fits; 28,929 does not (nor 29,104).
    assert plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(max_model_len=28928), EXPECTED).max_model_len == 28928
    for tokens in (28929, 29104):
        with pytest.raises(DoesNotFit, match=rf"engine\.max_model_len {tokens:,} does not fit"):
            plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(max_model_len=tokens), EXPECTED)
    # 1 GiB for the demo: 2,097,152 tokens -> 16,384 blocks of 128 - 1 = 16,383 x 128 = 2,097,024.
    assert plan_cpu(PROFILES["airlock-demo"], engine(cpu_kvcache_gb=1), EXPECTED).kv_cache_tokens == 2097024


# -- rule 6: concurrency --------------------------------------------------------------------------------------

def test_concurrency_from_the_kv_cache_capped_at_vllms_default() -> None:
    # H100 80 GB (81,559 MiB), 4B bf16: ceil(0.9 x 81,559 MiB) = 76,968,728,986 B - 11,059,540,787 = 65,909,188,199 B
    # / 147,456 = 446,975 tokens -> 27,935 blocks - 1 = 446,944 tokens; // 4,096 = 109 at once, --max-num-seqs 218.
    h100 = Gpu("0", "NVIDIA H100 80GB HBM3", 81559, None, (9, 0))
    result = plan_engine(PROFILES["qwen3-vl-4b-instruct"], [h100], engine(), EXPECTED)
    assert (result.kv_cache_tokens, result.concurrency, result.max_num_seqs) == (446944, 109, 218)
    # // 1,024 = 436 -> 256 at once; --max-num-seqs min(256, 512) = 256.
    small = plan_engine(PROFILES["qwen3-vl-4b-instruct"], [h100], engine(), 1024)
    assert (small.concurrency, small.max_num_seqs) == (256, 256)


def test_max_num_seqs_is_twice_the_concurrency_or_the_setting() -> None:
    # L4, 8B FP8: 54,192 tokens // 4,096 = 13 at once; vLLM's --max-num-seqs 2 x 13 = 26.
    result = plan("qwen3-vl-8b-instruct-fp8", L4)
    assert (result.concurrency, result.max_num_seqs) == (13, 26)
    # H100, 4B bf16, requests of 2,048 tokens: 446,944 // 2,048 = 218 at once; 2 x 218 = 436, capped at 256.
    h100 = Gpu("0", "NVIDIA H100 80GB HBM3", 81559, None, (9, 0))
    wide = plan_engine(PROFILES["qwen3-vl-4b-instruct"], [h100], engine(), 2048)
    assert (wide.concurrency, wide.max_num_seqs) == (218, 256)
    # engine.max_num_seqs is passed as set; the concurrency is no more than it: min(13, 7) = 7, min(13, 40) = 13.
    assert (plan("qwen3-vl-8b-instruct-fp8", L4, max_num_seqs=7).concurrency,
            plan("qwen3-vl-8b-instruct-fp8", L4, max_num_seqs=7).max_num_seqs) == (7, 7)
    assert (plan("qwen3-vl-8b-instruct-fp8", L4, max_num_seqs=40).concurrency,
            plan("qwen3-vl-8b-instruct-fp8", L4, max_num_seqs=40).max_num_seqs) == (13, 40)
    # On CPU too: the 4B's 28,928 tokens hold 7; engine.max_num_seqs 5 -> (5, 5).
    cpu = plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(max_num_seqs=5), EXPECTED)
    assert (cpu.concurrency, cpu.max_num_seqs) == (5, 5)


# -- rule 7: model: auto --------------------------------------------------------------------------------------

def test_auto_on_an_l4_takes_the_8b_in_fp8_over_a_cramped_bf16() -> None:
    # 8B bf16 holds 9,776 tokens, 5,680 after the margin (< 8,192: does not fit). 8B FP8: 21,737,609,626 - 10.2 GiB
    # (10,952,166,604) - 2,791,728,742 = 7,993,714,280 B / 147,456 = 54,210 -> 3,388 blocks - 1 = 54,192 tokens;
    # margin 5,419: 48,773, so the whole 32,768; 13 at once, --max-num-seqs 26.
    result = auto(L4)
    assert (result.profile.name, result.profile.served_model_name) == ("qwen3-vl-8b-instruct-fp8",
                                                                      "Qwen3-VL-8B-Instruct")
    assert (result.kv_cache_tokens, result.max_model_len) == (54192, 32768)
    assert (result.concurrency, result.max_num_seqs) == (13, 26)


def test_a_24_gb_card_takes_the_8b_in_fp8_over_a_comfortable_but_short_bf16() -> None:
    # RTX 4090 (24,564 MiB): ceil(0.9 x 24,564 MiB) = 23,181,498,778 B. 8B bf16: - 16.3 GiB (17,501,991,731)
    # - 2,791,728,742 = 2,887,778,305 B / 147,456 = 19,584 -> 1,224 - 1 blocks = 19,568 tokens: four requests of
    # 4,096 (comfortable) but, less the 4,096 margin, a 15,472 -> 15,360 context, not the 32,768 the profile wants.
    # 8B FP8: 23,181,498,778 - 10,952,166,604 - 2,791,728,742 = 9,437,603,432 B / 147,456 = 64,002 -> 4,000 - 1
    # blocks = 63,984; margin 6,398: 57,586, the whole 32,768. 63,984 // 4,096 = 15 at once, --max-num-seqs 30.
    rtx4090 = Gpu("0", "NVIDIA GeForce RTX 4090", 24564, None, (8, 9))
    bf16 = auto(rtx4090, quantization="none")
    assert (bf16.profile.name, bf16.kv_cache_tokens, bf16.max_model_len) == ("qwen3-vl-8b-instruct", 19568, 15360)
    result = auto(rtx4090)
    assert (result.profile.name, result.max_model_len, result.kv_cache_tokens) == (
        "qwen3-vl-8b-instruct-fp8", 32768, 63984)
    assert (result.concurrency, result.max_num_seqs) == (15, 30)


def test_quantization_none_and_fp8() -> None:
    # none on an L4: 8B bf16 does not fit, 4B bf16 holds 21,737,609,626 - 11,059,540,787 = 10,678,068,839 B
    # / 147,456 = 72,415 -> 4,525 blocks - 1 = 72,384 tokens: comfortable.
    result = auto(L4, quantization="none")
    assert (result.profile.name, result.kv_cache_tokens) == ("qwen3-vl-4b-instruct", 72384)
    # fp8 tries the FP8 checkpoints first, even where bf16 would be comfortable.
    assert auto(A100_80, quantization="fp8").profile.name == "qwen3-vl-8b-instruct-fp8"
    assert auto(A100_80).profile.name == "qwen3-vl-8b-instruct"
    # A V100 cannot load FP8: fp8 falls back to fp16 weights.
    # A T4 takes fp16 weights without FP8 and FP8 (weight-only, in float16) with it.
    assert (auto(T4, quantization="none").profile.name, auto(T4, quantization="none").dtype) == (
        "qwen3-vl-4b-instruct", "float16")
    assert auto(T4, quantization="fp8").profile.name == "qwen3-vl-4b-instruct-fp8"


def test_a_fitting_but_cramped_plan_is_taken_when_nothing_is_comfortable(caplog: pytest.LogCaptureFixture) -> None:
    # An RTX A4000 (16,376 MiB): ceil(0.9 x 16,376 MiB) = 15,454,332,519 B. 8B FP8: - 10,952,166,604 - 2,791,728,742
    # = 1,710,437,173 B / 147,456 = 11,599 tokens -> 724 blocks - 1 = 11,568, less the 4,096 margin 7,472 -> 7,168
    # (< 8,192: does not fit); 4B bf16: 15,454,332,519 - 11,059,540,787 = 4,394,791,732 B / 147,456 = 29,804
    # -> 1,862 - 1 blocks = 29,776 (comfortable), context 29,776 - 4,096 = 25,680 -> 25,600.
    # Comfortable, but 25,600 tokens is short of the 4B's whole context (32,768): its FP8 checkpoint has it
    # (15,454,332,519 - 5.2 GiB (5,583,457,484) - 2,147,483,648 = 7,723,391,387 B / 147,456 = 52,377 -> 3,273 - 1
    # blocks = 52,352 tokens; margin 5,235: 47,117; 12 at once).
    a4000 = Gpu("0", "NVIDIA RTX A4000", 16376, None, (8, 6))
    assert (auto(a4000).profile.name, auto(a4000).max_model_len) == ("qwen3-vl-4b-instruct-fp8", 32768)
    assert (auto(a4000, quantization="none").kv_cache_tokens, auto(a4000, quantization="none").max_model_len) == (
        29776, 25600)
    # Without FP8 and with 8,192 tokens expected, nothing is comfortable: the 8B's weights alone (16.3 GiB) exceed
    # the budget (14.4 GiB), and 4 x 8,192 = 32,768 > 29,776. The first that fits, the 4B, is taken, and said to be
    # cramped: 29,776 // 8,192 = 3 at once, --max-num-seqs 6.
    result = choose_profile(auto_candidates(PROFILES, "instruct", "none"), [a4000], engine(), 8192)
    assert (result.profile.name, result.kv_cache_tokens) == ("qwen3-vl-4b-instruct", 29776)
    assert (result.concurrency, result.max_num_seqs) == (3, 6)
    assert "low concurrency" in result.reason
    assert "low concurrency" in caplog.text


def test_nothing_fits_lists_every_candidate() -> None:
    # A 12 GB RTX 3060 and Thinking (32,768 tokens at least): 4B FP8: 11,596,411,700 - 5,583,457,484 - 2,147,483,648
    # = 3,865,470,568 B / 147,456 = 26,214 -> 1,638 - 1 blocks = 26,192 tokens, less the 4,096 margin 22,096; the
    # others less or nothing.
    with pytest.raises(DoesNotFit) as refused:
        auto(RTX3060, variant="thinking")
    message = str(refused.value)
    assert message.startswith("no Qwen3-VL fits NVIDIA GeForce RTX 3060 with a useful context")
    for label in ("Qwen3-VL-8B-Thinking (bfloat16)", "Qwen3-VL-8B-Thinking (FP8)", "Qwen3-VL-4B-Thinking (bfloat16)",
                  "Qwen3-VL-4B-Thinking (FP8)"):
        assert f"{label} does not fit" in message
    assert "engine.model: demo" in message
    assert refused.value.short == "Qwen3-VL-4B-Thinking (FP8) holds 22,096 of the 32,768 tokens it needs"


def test_the_candidates_order() -> None:
    names = [p.name for p in auto_candidates(PROFILES, "instruct", "auto")]
    assert names == ["qwen3-vl-8b-instruct", "qwen3-vl-8b-instruct-fp8", "qwen3-vl-4b-instruct",
                     "qwen3-vl-4b-instruct-fp8"]
    assert [p.name for p in auto_candidates(PROFILES, "thinking", "none")] == ["qwen3-vl-8b-thinking",
                                                                               "qwen3-vl-4b-thinking"]
    assert [p.name for p in auto_candidates(PROFILES, "thinking", "fp8")] == [
        "qwen3-vl-8b-thinking-fp8", "qwen3-vl-4b-thinking-fp8", "qwen3-vl-8b-thinking", "qwen3-vl-4b-thinking"]


def test_installed_weights_are_preferred() -> None:
    candidates = auto_candidates(PROFILES, "instruct", "auto")
    only_4b = choose_profile(candidates, [L4], engine(), EXPECTED,
                             installed=lambda profile: profile.name == "qwen3-vl-4b-instruct")
    assert only_4b.profile.name == "qwen3-vl-4b-instruct"
    # Nothing installed: still the best that fits (the caller names it and falls back to the demo).
    nothing = choose_profile(candidates, [L4], engine(), EXPECTED, installed=lambda profile: False)
    assert nothing.profile.name == "qwen3-vl-8b-instruct-fp8"


# -- rule 8: the README table ----------------------------------------------------------------------------------

# What auto picks per card (model, precision, context, at once), worked out above for the L4, T4, RTX A4000, 4090,
# 3060 and H100; the others follow the same steps. Context: min(the profile's, KV cache - max(10 %, 4,096)),
# floored to 1,024s; at once: KV cache // 4,096 (Thinking: // 12,288, its profile's expected_tokens_per_request).
EXPECTED_TABLE = {
    # 4B FP8: 26,192 tokens - 4,096 = 22,096 -> 21,504; 26,192 // 4,096 = 6.
    ("RTX 3060 12 GB", "instruct"): ("Qwen3-VL-4B-Instruct", "FP8 (weight-only)", "21,504", "6"),
    # bf16 would hold 25,600 (A4000) and fp16 18,432 (T4: 23,280 - 4,096 = 19,184) of the 4B's 32,768: its FP8
    # checkpoint holds it whole (T4: ceil(0.9 x 15,360 MiB) = 14,495,514,624 - 5,583,457,484 - 2,147,483,648
    # = 6,764,573,492 B / 147,456 = 45,875 -> 2,867 - 1 blocks = 45,856 tokens; margin 4,585: 41,271 >= 32,768;
    # 45,856 // 4,096 = 11 at once).
    ("RTX A4000 16 GB", "instruct"): ("Qwen3-VL-4B-Instruct", "FP8 (weight-only)", "32,768", "12"),
    ("T4 16 GB", "instruct"): ("Qwen3-VL-4B-Instruct", "FP8 (weight-only)", "32,768", "11"),
    # T4 Thinking, 4B FP8: 41,271 -> 40,960 of 65,536; 45,856 // 12,288 = 3.
    ("T4 16 GB", "thinking"): ("Qwen3-VL-4B-Thinking", "FP8 (weight-only)", "40,960", "3"),
    # 8B FP8: 63,984 tokens, 57,586 after the margin: 32,768 whole; 63,984 // 4,096 = 15.
    ("RTX 4090 24 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "FP8 (weight-only)", "32,768", "15"),
    # V100 (compute capability 7.0): vLLM 0.32's CUDA 13 build runs from 7.5.
    ("V100 32 GB", "thinking"): ("does not fit: compute capability 7.0: vLLM's CUDA build needs 7.5", "-", "-", "-"),
    # 8B FP8: 54,192 tokens, 48,773 after the margin: 32,768 whole for Instruct, 48,128 of Thinking's 65,536 (8B
    # bf16 holds 5,680 after the margin: does not fit either); 54,192 // 4,096 = 13, // 12,288 = 4 for Thinking.
    ("L4 24 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "FP8 (weight-only)", "32,768", "13"),
    ("L4 24 GB", "thinking"): ("Qwen3-VL-8B-Thinking", "FP8 (weight-only)", "48,128", "4"),
    ("A10 / A10G 24 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "FP8 (weight-only)", "32,768", "13"),
    # H100, 8B bf16: 76,968,728,986 - 17,501,991,731 - 2,791,728,742 = 56,675,008,513 B / 147,456 = 384,352
    # -> 24,022 - 1 blocks = 384,336; // 4,096 = 93.
    ("H100 80 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "bf16", "32,768", "93"),
    ("2 x L4 (tensor parallel 2)", "instruct"): ("Qwen3-VL-8B-Instruct", "bf16", "32,768", "31"),
}


def table_rows(text: str) -> dict[tuple[str, str], tuple[str, ...]]:
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    return {(row[0], row[1]): tuple(row[2:]) for row in rows}


def test_card_table_has_every_card_and_the_worked_rows() -> None:
    rows = table_rows(card_table(PROFILES))
    assert len(rows) == 14 * 2
    for key, expected in EXPECTED_TABLE.items():
        assert rows[key] == expected, key
    # T4 (fp16, 4B: 3,435,973,837 B = 23,280 tokens) cannot hold Thinking's 32,768 in bf16/fp16, but its 4B FP8 can.
    assert rows[("T4 16 GB", "thinking")][:2] == ("Qwen3-VL-4B-Thinking", "FP8 (weight-only)")
    assert rows[("RTX 3060 12 GB", "thinking")] == (
        "does not fit: Qwen3-VL-4B-Thinking (FP8) holds 22,096 of the 32,768 tokens it needs", "-", "-", "-")
    # No images-per-request column: they no longer depend on the card.
    assert card_table(PROFILES).splitlines()[0] == "| GPU | variant | model | precision | context | at once |"


def test_the_readme_table_is_what_the_code_prints(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- gpu-table:start -->\n(.*?)<!-- gpu-table:end -->", readme, re.DOTALL)
    assert found, "README.md lacks the gpu-table markers"
    assert found.group(1) == card_table(PROFILES)
    assert airlock(["gpu-table"]) == 0
    assert capsys.readouterr().out == card_table(PROFILES)


def test_gpu_table_follows_the_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "airlock.yaml"
    config.write_text("engine:\n  quantization: none\n")
    assert airlock(["gpu-table", "--config", str(config)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[("L4 24 GB", "instruct")][:2] == ("Qwen3-VL-4B-Instruct", "bf16")
    assert load_settings(config).engine.quantization == "none"


# -- profile validation -----------------------------------------------------------------------------------------

def write_profiles(directory: Path, **changes: object) -> None:
    for name in ("airlock-demo", "qwen3-vl-generic"):
        (directory / f"{name}.yaml").write_text((ROOT / "configs" / "models" / f"{name}.yaml").read_text())
    lines = [f"{key}: {value}" for key, value in {
        "name": "mine", "served_model_name": "mine", "max_model_len": 32768, "min_model_len": 8192,
        "max_images_per_request": 16, **changes}.items()]
    (directory / "mine.yaml").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_model_len": 65536}, "min_model_len (65536) is above max_model_len (32768)"),
    ({"min_pixels": 8388608}, "min_pixels (8388608) is above max_pixels (4194304)"),
    # 4,096 tokens an image + 6,000 reserve = 10,096 > 8,192.
    ({"answer_reserve_tokens": 6000}, "min_model_len (8192) does not hold one image of max_pixels (4096 tokens) "
                                      "plus answer_reserve_tokens (6000)"),
    ({"weights_gib": 1.0, "vision_weights_gib": 2.0}, "vision_weights_gib is part of weights_gib"),
])
def test_profiles_are_validated_on_load(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    write_profiles(tmp_path, **changes)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_profiles(tmp_path)


def test_a_text_only_profile_needs_no_room_for_images(tmp_path: Path) -> None:
    write_profiles(tmp_path, answer_reserve_tokens=6000, max_images_per_request=0)
    assert load_profiles(tmp_path)["mine"].max_images_per_request == 0


def test_the_demo_settings_the_other_tests_use_still_plan() -> None:
    # tests/test_audit.py and test_engine_tls.py start the demo with max_model_len 2048 and 1 GiB of KV cache
    # (2,097,024 tokens in blocks of 128): one 1,024-token image + the demo's 1,024-token reserve = 2,048 fits; the
    # profile's 16 images a request.
    result = plan_cpu(PROFILES["airlock-demo"], engine(max_model_len=2048, cpu_kvcache_gb=1), EXPECTED)
    assert (result.max_model_len, result.max_images_per_request) == (2048, 16)


def test_a_larger_image_budget_costs_vision_profiling_memory_not_images_per_request() -> None:
    # Qwen's own maximum (16,384 tokens an image) on an L4 with the 8B FP8: vLLM profiles the vision tower with such
    # an image, 12,288 tokens more than the profile's budget: 12,288 x 160 KiB = 2,013,265,920 B more overhead, so
    # the KV cache loses 2,013,265,920 / 147,456 = 13,653.3 tokens: 54,192 -> 7,993,714,280 - 2,013,265,920
    # = 5,980,448,360 B / 147,456 = 40,557 -> 2,534 - 1 blocks = 40,528; margin 4,052: 36,476, the whole 32,768
    # (one such image + the 2,048 reserve = 18,432 fits). Images a request stay the profile's 16.
    default = plan("qwen3-vl-8b-instruct-fp8", L4)
    large = plan("qwen3-vl-8b-instruct-fp8", L4, max_pixels=16384 * 32 * 32)
    assert (default.kv_cache_tokens, default.max_images_per_request) == (54192, 16)
    assert (large.kv_cache_tokens, large.max_model_len, large.max_pixels) == (40528, 32768, 16_777_216)
    assert large.max_images_per_request == 16
