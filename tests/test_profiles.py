"""Engine profiles and the choice of model: local directories only, sized to the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.config import ConfigError, DocumentSettings, ScreeningSettings, load_settings
from server.gpus import Gpu
from server.profiles import choose_model, load_profiles
from server.sizing import DoesNotFit

PROFILES = load_profiles()
# GPUs as nvidia-smi describes them (no GPU here); server/sizing.py's tests work the figures by hand.
A100_40 = [Gpu("0", "NVIDIA A100-SXM4-40GB", 40960, None, (8, 0))]
L4 = [Gpu("0", "NVIDIA L4", 23034, None, (8, 9))]


def engine(tmp_path: Path, **values: object):  # type: ignore[no-untyped-def]
    return load_settings(engine={"models_dir": str(tmp_path), "demo_model_dir": str(tmp_path / "demo"),
                                 **values}).engine


def install(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_every_target_model_has_a_profile() -> None:
    for size in ("8b", "4b"):
        for variant in ("instruct", "thinking"):
            for suffix, quantization in (("", None), ("-fp8", "fp8")):
                profile = PROFILES[f"qwen3-vl-{size}-{variant}{suffix}"]
                assert profile.max_model_len >= 32768 and profile.max_images_per_request >= 1
                assert profile.weights_gib > 0 and profile.kv_cache_bytes_per_token > 0 and profile.overhead_gib > 0
                assert (profile.reasoning_parser == "qwen3") == (variant == "thinking")
                assert profile.quantization == quantization and profile.dtype == "auto"


def test_a_document_of_the_most_pages_fits_every_profile_and_the_gateway() -> None:
    # Pages count as images: the default documents.max_pages (a 10-page scan, and more) must pass the gateway's
    # screening limit and every engine's --limit-mm-per-prompt, and both limits must agree (the gateway refuses what
    # the engines would, with its own message, never less than they take).
    pages = DocumentSettings().max_pages
    assert pages >= 10
    assert ScreeningSettings().max_images_per_request == pages
    images = {name: profile.max_images_per_request for name, profile in PROFILES.items()}
    assert images == dict.fromkeys(PROFILES, pages)


def test_fp8_profiles_serve_under_the_bf16_models_name() -> None:
    # Clients and authorization rules name the model, not its precision: model: auto may pick either per card.
    fp8 = PROFILES["qwen3-vl-8b-instruct-fp8"]
    assert (fp8.served_model_name, fp8.directory, fp8.source) == (
        "Qwen3-VL-8B-Instruct", "Qwen3-VL-8B-Instruct-FP8", "Qwen/Qwen3-VL-8B-Instruct-FP8")


def test_auto_uses_installed_weights(tmp_path: Path) -> None:
    path = install(tmp_path, "Qwen3-VL-8B-Thinking")
    choice = choose_model(engine(tmp_path, variant="thinking"), A100_40, PROFILES)
    assert (choice.path, choice.served_name, choice.is_demo) == (path, "Qwen3-VL-8B-Thinking", False)
    assert choice.plan is not None and choice.plan.max_model_len == 65536
    assert choice.reason.startswith("engine.model is 'auto': Qwen3-VL-8B-Thinking (bfloat16) on NVIDIA A100")


def test_auto_prefers_a_fitting_model_that_is_installed(tmp_path: Path) -> None:
    # On an L4 the 8B in FP8 is the first choice; with only the 4B installed, the 4B (it fits) is served.
    path = install(tmp_path, "Qwen3-VL-4B-Instruct")
    choice = choose_model(engine(tmp_path), L4, PROFILES)
    assert (choice.path, choice.profile.name, choice.is_demo) == (path, "qwen3-vl-4b-instruct", False)


def test_auto_without_weights_falls_back_to_the_demo_and_says_why(tmp_path: Path) -> None:
    choice = choose_model(engine(tmp_path), A100_40, PROFILES)
    assert choice.is_demo
    assert choice.path == tmp_path / "demo"
    assert "Qwen3-VL-8B-Instruct" in choice.reason and str(tmp_path) in choice.reason
    # On an L4 it names the FP8 checkpoint, where it comes from and where it goes.
    choice = choose_model(engine(tmp_path), L4, PROFILES)
    assert choice.is_demo
    assert "(from Qwen/Qwen3-VL-8B-Instruct-FP8)" in choice.reason
    assert str(tmp_path / "Qwen3-VL-8B-Instruct-FP8") in choice.reason


def test_auto_on_cpu_looks_for_the_smallest_model(tmp_path: Path) -> None:
    choice = choose_model(engine(tmp_path), [], PROFILES)
    assert choice.is_demo and "Qwen3-VL-4B-Instruct weights" in choice.reason
    path = install(tmp_path, "Qwen3-VL-4B-Instruct")
    assert choose_model(engine(tmp_path), [], PROFILES).path == path


def test_auto_where_nothing_fits_is_an_error_not_the_smallest_model(tmp_path: Path) -> None:
    install(tmp_path, "Qwen3-VL-4B-Instruct")
    small = [Gpu("0", "NVIDIA GeForce RTX 3060 Ti", 8192, None, (8, 6))]
    with pytest.raises(DoesNotFit, match="no Qwen3-VL fits NVIDIA GeForce RTX 3060 Ti"):
        choose_model(engine(tmp_path), small, PROFILES)


def test_a_local_directory_is_served_under_its_profile(tmp_path: Path) -> None:
    path = install(tmp_path, "Qwen3-VL-4B-Instruct")
    choice = choose_model(engine(tmp_path, model=str(path)), [], PROFILES)
    assert choice.profile.name == "qwen3-vl-4b-instruct"


def test_an_unknown_local_directory_gets_the_generic_profile_and_its_own_name(tmp_path: Path) -> None:
    path = install(tmp_path, "our-finetune")
    choice = choose_model(engine(tmp_path, model=str(path)), [], PROFILES)
    assert (choice.profile.name, choice.served_name) == ("qwen3-vl-generic", "our-finetune")


@pytest.mark.parametrize("model", ["Qwen/Qwen3-VL-8B-Instruct", "/nonexistent/model", "qwen3-vl-8b-instruct"])
def test_nothing_is_ever_downloaded(tmp_path: Path, model: str) -> None:
    with pytest.raises(ConfigError, match="never downloads"):
        choose_model(engine(tmp_path, model=model), [], PROFILES)


def test_unknown_profile_is_named(tmp_path: Path) -> None:
    path = install(tmp_path, "x")
    with pytest.raises(ConfigError, match="no profile named 'nope'"):
        choose_model(engine(tmp_path, model=str(path), profile="nope"), [], PROFILES)


def test_every_shipped_profile_starts_with_tool_calling() -> None:
    # Qwen3-VL (Instruct and Thinking) writes <tool_call>{"name": ..., "arguments": ...}</tool_call>: vLLM's hermes
    # parser (tests/test_engine.py checks vLLM knows the name; tests/test_tool_calling.py drives it).
    for profile in PROFILES.values():
        assert profile.tool_call_parser == "hermes", profile.name


TOOLS = [{"type": "function", "function": {"name": "click", "description": "Click a point on the screen",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                          "required": ["x"]}}}]


def test_the_demo_chat_template_writes_tools_as_qwen3_vl_does(demo_model_dir: Path) -> None:
    """The demo must show the engine what a real Qwen3-VL would: the tools in the system turn, earlier calls as
    <tool_call> JSON (what the hermes parser reads back), results as <tool_response> in a user turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Press OK"}, {"type": "image"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "click", "arguments": '{"x": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "clicked"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    # (Turns are joined without Qwen's newlines, as the first demo builds wrote them: see demo_model.CHAT_TEMPLATE.)
    assert text.startswith("<|im_start|>systemBe brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(TOOLS[0])}\n</tools>" in text
    assert "<|im_start|>userPress OK<|vision_start|><|image_pad|><|vision_end|><|im_end|>" in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "click", "arguments": {"x": 3}}\n</tool_call><|im_end|>' \
        in text
    assert text.endswith("<|im_start|>user\n<tool_response>\nclicked\n</tool_response><|im_end|><|im_start|>assistant")
    # Without tools nothing about them is said.
    plain = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert plain == "<|im_start|>userPress OK<|vision_start|><|image_pad|><|vision_end|><|im_end|><|im_start|>assistant"


def test_a_demo_model_built_before_tool_calling_is_rebuilt(tmp_path: Path, demo_model_dir: Path) -> None:
    # Its chat template would ignore `tools`: `airlock up` (runner.ensure_demo_model) builds it again.
    from server.demo_model import COMPLETE_MARKER, is_built

    assert is_built(demo_model_dir)
    (tmp_path / COMPLETE_MARKER).write_text(json.dumps({"name": "airlock-demo-qwen3-vl", "random_weights": True,
                                                        "seed": 0}))
    assert not is_built(tmp_path)
    (tmp_path / COMPLETE_MARKER).write_text("not json")
    assert not is_built(tmp_path)


def test_auto_without_weights_is_an_error_when_verified_weights_are_required(tmp_path: Path) -> None:
    # The Helm chart's engines run with verify_model: require: an empty model volume must not serve random weights.
    with pytest.raises(ConfigError, match=r"engine\.verify_model is 'require', but no Qwen3-VL-8B-Instruct weights"):
        choose_model(engine(tmp_path, verify_model="require"), A100_40, PROFILES)
