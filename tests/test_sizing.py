"""Sizing (server/sizing.py): model, precision, context, image budget and concurrency per GPU, by vLLM 0.32's rules.

There is no GPU here: the GPUs are described as nvidia-smi reports them (memory.total in MiB, compute_cap), and
every figure below is worked by hand in the comments from the profiles' estimates, not recomputed by the code's
formula. The figures a real card gives are measured by `make gpu-check`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.cli import main as airlock
from server.config import ConfigError, EngineSettings, load_settings
from server.gpus import Gpu
from server.profiles import load_profiles
from server.sizing import (
    DoesNotFit,
    auto_candidates,
    card_table,
    check_free_memory,
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
    # Context: 9,776 floored to 1,024s = 9,216 (>= the Instruct minimum, 8,192). 9,776 // 4,096 = 2 at once.
    result = plan("qwen3-vl-8b-instruct", L4)
    assert (result.kv_cache_tokens, result.max_model_len, result.max_num_seqs) == (9776, 9216, 2)
    assert (result.dtype, result.gpu_memory_utilization) == ("bfloat16", 0.9)
    # (9,216 - 2,048 reserve) // 4,096 tokens an image = 1.
    assert result.max_images_per_request == 1
    assert not result.comfortable  # 9,760 < 4 x 4,096


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
    with pytest.raises(DoesNotFit, match=r"Qwen3-VL-4B-Instruct \(bfloat16\) does not fit: its shortest useful "
                                         r"context \(8,192 tokens\) needs .* the budget is 10\.8 GiB"):
        plan("qwen3-vl-4b-instruct", RTX3060)


def test_a_higher_utilization_gives_a_bigger_cache() -> None:
    # 0.95 x 23,034 MiB = 22,945,254,605 B - 20,293,720,473 = 2,651,534,132 B / 147,456 = 17,981 -> 1,123 blocks - 1
    # = 1,122 x 16 = 17,952 tokens; context 17,408.
    result = plan("qwen3-vl-8b-instruct", L4, gpu_memory_utilization=0.95)
    assert (result.kv_cache_tokens, result.max_model_len, result.gpu_memory_utilization) == (17952, 17408, 0.95)


def test_tensor_parallel_splits_the_language_model_and_keeps_the_vision_tower_whole() -> None:
    # 2 x L4, 8B bf16: per GPU (16.3 - 1.1) / 2 + 1.1 = 8.7 GiB of weights (9,341,553,868 B) + 2.6 GiB overhead;
    # 21,737,609,626 - 9,341,553,868 - 2,791,728,742 = 9,604,327,016 B each, x 2 GPUs = 19,208,654,032 B
    # / 147,456 = 130,267 tokens -> 8,141 blocks - 1 = 130,240 tokens; 130,240 // 4,096 = 31 at once.
    result = plan("qwen3-vl-8b-instruct", L4, Gpu("1", "NVIDIA L4", 23034, None, (8, 9)))
    assert (result.kv_cache_tokens, result.max_model_len, result.max_num_seqs) == (130240, 32768, 31)


def test_the_smallest_gpu_of_a_group_decides() -> None:
    small = Gpu("1", "NVIDIA L4", 20000, None, (8, 9))
    assert plan("qwen3-vl-8b-instruct", L4, small).kv_cache_tokens < plan(
        "qwen3-vl-8b-instruct", L4, L4).kv_cache_tokens


# -- rule 2: vLLM's free-memory check at start-up ------------------------------------------------------------

def test_a_gpu_with_memory_held_by_another_process_is_refused() -> None:
    # vLLM needs ceil(0.9 x 23,034 MiB) = 21,737,609,626 B free. 20,730 MiB = 21,736,980,480 B: short by 629,146 B.
    busy = Gpu("0", "NVIDIA L4", 23034, 20730, (8, 9))
    with pytest.raises(DoesNotFit) as refused:
        plan("qwen3-vl-8b-instruct-fp8", busy)
    message = str(refused.value)
    assert "20.2 GiB free of 22.5 GiB" in message and "another process" in message
    assert "engine.gpu_memory_utilization" in message
    # 20,731 MiB = 21,738,029,056 B is enough.
    assert plan("qwen3-vl-8b-instruct-fp8", Gpu("0", "NVIDIA L4", 23034, 20731, (8, 9))).max_model_len == 32768
    # Free memory unknown (MIG in a container): nothing to check.
    check_free_memory([L4], 0.9)


def test_free_memory_never_changes_the_choice() -> None:
    # The same card gets the same model whatever a few MiB of driver memory do; only the free check may refuse.
    roomy = Gpu("0", "NVIDIA L4", 23034, 22800, (8, 9))
    tighter = Gpu("0", "NVIDIA L4", 23034, 21000, (8, 9))
    assert auto(roomy).profile.name == auto(tighter).profile.name == "qwen3-vl-8b-instruct-fp8"
    with pytest.raises(DoesNotFit, match="another process"):
        auto(Gpu("0", "NVIDIA L4", 23034, 15000, (8, 9)))


# -- rules 3 and 4: model facts and precision ----------------------------------------------------------------

def test_model_facts_from_config_json() -> None:
    for name in ("qwen3-vl-8b-instruct", "qwen3-vl-4b-thinking", "qwen3-vl-8b-thinking-fp8"):
        # 36 layers x 8 KV heads x head_dim 128 x 2 (K, V) x 2 bytes.
        assert PROFILES[name].kv_cache_bytes_per_token == 36 * 8 * 128 * 2 * 2 == 147456
    assert PROFILES["qwen3-vl-8b-instruct"].weights_gib == 16.3
    assert PROFILES["qwen3-vl-4b-instruct"].weights_gib == 8.3
    assert PROFILES["qwen3-vl-8b-instruct-fp8"].weights_gib == 10.2
    assert PROFILES["qwen3-vl-4b-thinking-fp8"].weights_gib == 5.2


@pytest.mark.parametrize(("gpu", "dtype"), [(T4, "float16"), (V100, "float16"), (L4, "bfloat16"),
                                             (A100_80, "bfloat16")])
def test_dtype_auto_follows_compute_capability(gpu: Gpu, dtype: str) -> None:
    assert plan("qwen3-vl-4b-instruct", gpu).dtype == dtype


def test_bfloat16_asked_for_on_a_t4_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"Tesla T4 .*has no bfloat16"):
        plan("qwen3-vl-4b-instruct", T4, dtype="bfloat16")
    assert plan("qwen3-vl-4b-instruct", L4, dtype="float16").dtype == "float16"


def test_fp8_needs_compute_capability_7_5() -> None:
    # vLLM's Fp8Config.get_min_capability() is 75: a V100 (7.0) cannot load the FP8 checkpoints.
    with pytest.raises(DoesNotFit, match=r"FP8 needs compute capability 7\.5"):
        plan("qwen3-vl-4b-instruct-fp8", V100)
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


def test_images_per_request_follow_the_context_and_the_image_budget() -> None:
    # A100 80 GB, 8B bf16 Instruct: 32,768 tokens; (32,768 - 2,048) // 4,096 = 7 images (profile allows 8).
    result = plan("qwen3-vl-8b-instruct", A100_80)
    assert (result.max_model_len, result.max_images_per_request) == (32768, 7)
    assert (result.max_pixels, result.min_pixels) == (4096 * 32 * 32, 64 * 32 * 32)
    # Half the pixels: 2,048 tokens an image, (32,768 - 2,048) // 2,048 = 15, capped at the profile's 8.
    assert plan("qwen3-vl-8b-instruct", A100_80, max_pixels=2048 * 32 * 32).max_images_per_request == 8
    # Thinking at 65,536: (65,536 - 24,576) // 4,096 = 10, capped at 8.
    assert plan("qwen3-vl-8b-thinking", A100_80).max_images_per_request == 8
    # At least one, and none where the profile or the settings say none.
    # 7,000 tokens, images of 1,024 tokens: (7,000 - 2,048) // 1,024 = 4.
    assert plan("qwen3-vl-8b-instruct", L4, max_model_len=7000, max_pixels=1024 * 1024).max_images_per_request == 4
    assert plan("qwen3-vl-8b-instruct", A100_80, max_images_per_request=0).max_images_per_request == 0


def test_an_image_budget_the_context_cannot_hold_is_refused() -> None:
    # 8,192 tokens explicit, images of 8,192 tokens (8,388,608 pixels) + the 2,048 reserve do not fit.
    with pytest.raises(ConfigError, match="no room for one image"):
        plan("qwen3-vl-8b-instruct", A100_80, max_model_len=8192, max_pixels=8192 * 1024)
    with pytest.raises(ConfigError, match="min_pixels"):
        plan("qwen3-vl-8b-instruct", A100_80, min_pixels=8192 * 1024, max_pixels=4096 * 1024)


def test_the_demo_on_cpu_keeps_its_profile_values() -> None:
    # 4 GiB of KV cache / 512 B a token = 8,388,608 tokens -> 524,288 blocks - 1 = 8,388,592 tokens: far more than
    # 4,096; 8,388,592 // 4,096 = 2,047 at once, capped at vLLM's CPU default of 128.
    # Images: (4,096 - 1,024 reserve) // (1,048,576 // 1,024 = 1,024 tokens) = 3.
    result = plan_cpu(PROFILES["airlock-demo"], engine(), EXPECTED)
    assert (result.max_model_len, result.max_num_seqs, result.kv_cache_tokens) == (4096, 128, 8388592)
    assert (result.max_pixels, result.min_pixels, result.max_images_per_request) == (1024 * 1024, 1024, 3)
    assert result.dtype == "bfloat16"


def test_a_real_model_on_cpu_is_held_to_its_kv_cache() -> None:
    # 4 GiB / 147,456 B = 29,127 tokens -> 1,820 blocks - 1 = 1,819 x 16 = 29,104 tokens; context 28,672; 7 at once.
    result = plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(), EXPECTED)
    assert (result.kv_cache_tokens, result.max_model_len, result.max_num_seqs) == (29104, 28672, 7)
    with pytest.raises(DoesNotFit, match=r"engine\.cpu_kvcache_gb"):
        plan_cpu(PROFILES["qwen3-vl-4b-instruct"], engine(max_model_len=32768), EXPECTED)


# -- rule 6: concurrency --------------------------------------------------------------------------------------

def test_max_num_seqs_from_the_kv_cache_capped_at_vllms_default() -> None:
    # H100 80 GB (81,559 MiB), 4B bf16: ceil(0.9 x 81,559 MiB) = 76,968,728,986 B - 11,059,540,787 = 65,909,188,199 B
    # / 147,456 = 446,975 tokens -> 27,935 blocks - 1 = 446,944 tokens; // 4,096 = 109; // 1,024 = 436 -> 256.
    h100 = Gpu("0", "NVIDIA H100 80GB HBM3", 81559, None, (9, 0))
    result = plan_engine(PROFILES["qwen3-vl-4b-instruct"], [h100], engine(), EXPECTED)
    assert (result.kv_cache_tokens, result.max_num_seqs) == (446944, 109)
    assert plan_engine(PROFILES["qwen3-vl-4b-instruct"], [h100], engine(), 1024).max_num_seqs == 256
    assert plan("qwen3-vl-4b-instruct", h100, max_num_seqs=7).max_num_seqs == 7


# -- rule 7: model: auto --------------------------------------------------------------------------------------

def test_auto_on_an_l4_takes_the_8b_in_fp8_over_a_cramped_bf16() -> None:
    # 8B bf16 holds 9,776 tokens (< 4 x 4,096: not comfortable). 8B FP8: 21,737,609,626 - 10.2 GiB (10,952,166,604)
    # - 2,791,728,742 = 7,993,714,280 B / 147,456 = 54,210 -> 3,388 blocks - 1 = 54,192 tokens; 13 at once.
    result = auto(L4)
    assert (result.profile.name, result.profile.served_model_name) == ("qwen3-vl-8b-instruct-fp8",
                                                                      "Qwen3-VL-8B-Instruct")
    assert (result.kv_cache_tokens, result.max_model_len, result.max_num_seqs) == (54192, 32768, 13)


def test_a_24_gb_card_takes_the_8b_in_fp8_over_a_comfortable_but_short_bf16() -> None:
    # RTX 4090 (24,564 MiB): ceil(0.9 x 24,564 MiB) = 23,181,498,778 B. 8B bf16: - 16.3 GiB (17,501,781,197)
    # - 2,791,728,742 = 2,887,988,839 B / 147,456 = 19,585 -> 1,224 - 1 blocks = 19,568 tokens: four requests of
    # 4,096 (comfortable) but a 19,456 context, not the 32,768 the profile wants. 8B FP8: 23,181,498,778
    # - 10,952,166,604 - 2,791,728,742 = 9,437,603,432 B / 147,456 = 64,002 -> 4,000 - 1 blocks = 63,984: whole.
    rtx4090 = Gpu("0", "NVIDIA GeForce RTX 4090", 24564, None, (8, 9))
    assert auto(rtx4090, quantization="none").kv_cache_tokens == 19568
    result = auto(rtx4090)
    assert (result.profile.name, result.max_model_len, result.kv_cache_tokens, result.max_num_seqs) == (
        "qwen3-vl-8b-instruct-fp8", 32768, 63984, 15)


def test_quantization_none_and_fp8() -> None:
    # none on an L4: 8B bf16 is cramped, 4B bf16 holds 21,737,609,626 - 11,059,540,787 = 10,678,068,839 B
    # / 147,456 = 72,415 -> 4,525 blocks - 1 = 72,384 tokens: comfortable.
    result = auto(L4, quantization="none")
    assert (result.profile.name, result.kv_cache_tokens) == ("qwen3-vl-4b-instruct", 72384)
    # fp8 tries the FP8 checkpoints first, even where bf16 would be comfortable.
    assert auto(A100_80, quantization="fp8").profile.name == "qwen3-vl-8b-instruct-fp8"
    assert auto(A100_80).profile.name == "qwen3-vl-8b-instruct"
    # A V100 cannot load FP8: fp8 falls back to fp16 weights.
    assert (auto(V100, quantization="fp8").profile.name, auto(V100).dtype) == ("qwen3-vl-8b-instruct", "float16")


def test_a_fitting_but_cramped_plan_is_taken_when_nothing_is_comfortable(caplog: pytest.LogCaptureFixture) -> None:
    # An RTX A4000 (16,376 MiB): ceil(0.9 x 16,376 MiB) = 15,454,332,519 B. 8B FP8: - 10,952,166,604 - 2,791,728,742
    # = 1,710,437,173 B / 147,456 = 11,599 tokens -> 724 blocks - 1 = 11,568 (fits 8,192, not comfortable); 4B bf16:
    # 15,454,332,519 - 11,059,540,787 = 4,394,791,732 B / 147,456 = 29,804 -> 1,862 - 1 blocks = 29,776: comfortable.
    # Comfortable, but 29,776 tokens is short of the 4B's whole context (32,768): its FP8 checkpoint has it
    # (15,454,332,519 - 5.2 GiB (5,583,457,485) - 2,147,483,648 = 7,723,391,386 B / 147,456 = 52,377 -> 3,273 - 1
    # blocks = 52,352 tokens; 12 at once).
    a4000 = Gpu("0", "NVIDIA RTX A4000", 16376, None, (8, 6))
    assert (auto(a4000).profile.name, auto(a4000).max_model_len) == ("qwen3-vl-4b-instruct-fp8", 32768)
    assert auto(a4000, quantization="none").kv_cache_tokens == 29776
    # Without FP8 and with 8,192 tokens expected, nothing is comfortable: the 8B's weights alone (16.3 GiB) exceed
    # the budget (14.4 GiB), and 4 x 8,192 = 32,768 > 29,776. The first that fits, the 4B, is taken, and said to be
    # cramped.
    result = choose_profile(auto_candidates(PROFILES, "instruct", "none"), [a4000], engine(), 8192)
    assert (result.profile.name, result.kv_cache_tokens, result.max_num_seqs) == ("qwen3-vl-4b-instruct", 29776, 3)
    assert "low concurrency" in result.reason
    assert "low concurrency" in caplog.text


def test_nothing_fits_lists_every_candidate() -> None:
    # A 12 GB RTX 3060 and Thinking (32,768 tokens at least): 4B FP8 holds 26,192, the others less or nothing.
    with pytest.raises(DoesNotFit) as refused:
        auto(RTX3060, variant="thinking")
    message = str(refused.value)
    assert message.startswith("no Qwen3-VL fits NVIDIA GeForce RTX 3060 with a useful context")
    for label in ("Qwen3-VL-8B-Thinking (bfloat16)", "Qwen3-VL-8B-Thinking (FP8)", "Qwen3-VL-4B-Thinking (bfloat16)",
                  "Qwen3-VL-4B-Thinking (FP8)"):
        assert f"{label} does not fit" in message
    assert "engine.model: demo" in message
    assert refused.value.short == "Qwen3-VL-4B-Thinking (FP8) holds 26,192 of the 32,768 tokens it needs"


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

# What auto picks per card, worked out above for the L4, T4, RTX A4000, 3060 and H100; the others follow the same
# steps (model, precision, context, images per request, at once).
EXPECTED_TABLE = {
    ("RTX 3060 12 GB", "instruct"): ("Qwen3-VL-4B-Instruct", "FP8 (weight-only)", "25,600", "5", "6"),
    # bf16 would hold 29,696 (A4000) and fp16 22,528 (T4) of the 4B's 32,768: its FP8 checkpoint holds it whole
    # (T4: ceil(0.9 x 15,360 MiB) = 14,495,514,625 - 5,583,457,485 - 2,147,483,648 = 6,764,573,492 B / 147,456
    # = 45,875 -> 2,867 - 1 blocks = 45,856 tokens: 11 at once).
    ("RTX A4000 16 GB", "instruct"): ("Qwen3-VL-4B-Instruct", "FP8 (weight-only)", "32,768", "7", "12"),
    ("T4 16 GB", "instruct"): ("Qwen3-VL-4B-Instruct", "FP8 (weight-only)", "32,768", "7", "11"),
    ("RTX 4090 24 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "FP8 (weight-only)", "32,768", "7", "15"),
    ("V100 32 GB", "thinking"): ("Qwen3-VL-8B-Thinking", "fp16", "65,536", "8", "17"),
    ("L4 24 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "FP8 (weight-only)", "32,768", "7", "13"),
    ("A10 / A10G 24 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "FP8 (weight-only)", "32,768", "7", "13"),
    ("H100 80 GB", "instruct"): ("Qwen3-VL-8B-Instruct", "bf16", "32,768", "7", "93"),
    ("2 x L4 (tensor parallel 2)", "instruct"): ("Qwen3-VL-8B-Instruct", "bf16", "32,768", "7", "31"),
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
    assert rows[("RTX 3060 12 GB", "thinking")][0].startswith("does not fit: ")


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
        "max_images_per_request": 8, **changes}.items()]
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
    # tests/test_audit.py and test_engine_tls.py start the demo with max_model_len 2048 and 1 GiB of KV cache:
    # one 1,024-token image + the demo's 1,024-token reserve = 2,048 fits; (2,048 - 1,024) // 1,024 = 1 image.
    result = plan_cpu(PROFILES["airlock-demo"], engine(max_model_len=2048, cpu_kvcache_gb=1), EXPECTED)
    assert (result.max_model_len, result.max_images_per_request) == (2048, 1)


def test_a_larger_image_budget_costs_vision_profiling_memory_and_images_per_request() -> None:
    # Qwen's own maximum (16,384 tokens an image) on an L4 with the 8B FP8: vLLM profiles the vision tower with such
    # an image, 12,288 tokens more than the profile's budget: 12,288 x 160 KiB = 2,013,265,920 B more overhead, so
    # the KV cache loses 2,013,265,920 / 147,456 = 13,653.3 tokens: 54,192 -> 7,993,714,280 - 2,013,265,920
    # = 5,980,448,360 B / 147,456 = 40,557 -> 2,534 - 1 blocks = 40,528. One such image fits beside the answer
    # reserve in 32,768 tokens ((32,768 - 2,048) // 16,384 = 1).
    default = plan("qwen3-vl-8b-instruct-fp8", L4)
    large = plan("qwen3-vl-8b-instruct-fp8", L4, max_pixels=16384 * 32 * 32)
    assert (default.kv_cache_tokens, default.max_images_per_request) == (54192, 7)
    assert (large.kv_cache_tokens, large.max_images_per_request, large.max_pixels) == (40528, 1, 16_777_216)
