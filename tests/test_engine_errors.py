"""What a client is told of an engine's refusal: the engine's reason, without the values the client sent (vLLM
repeats them: pydantic's 'input', its own "(parameter=..., value=...)", quoted text). Unit tests of
``server.errors.translate_engine_error`` on vLLM 0.32's own wording; tests/test_request_input.py sends the same
through the real engine."""

from __future__ import annotations

import json

import pytest

from server.errors import EngineFailed, EngineRejected, translate_engine_error

MARK = "ZQMARK-secret"


def told(message: str, param: str | None = "body.x", status: int = 400) -> EngineRejected:
    error = translate_engine_error(status, json.dumps({"error": {"message": message, "param": param}}).encode())
    assert isinstance(error, EngineRejected)
    return error


@pytest.mark.parametrize(("engine_says", "client_reads"), [
    (f"1 validation error:\n  {{'type': 'bool_parsing', 'loc': 'body.parallel_tool_calls', 'msg': 'Input should be a "
     f"valid boolean, unable to interpret input', 'input': '{MARK}'}}",
     "parallel_tool_calls: Input should be a valid boolean, unable to interpret input"),
    (f"1 validation error:\n  {{'type': 'literal_error', 'loc': 'body.reasoning_effort', 'msg': \"Input should be "
     f"'low', 'medium' or 'high'\", 'input': '{MARK}'}}",
     "reasoning_effort: Input should be 'low', 'medium' or 'high'"),
    (f"1 validation error:\n  {{'type': 'value_error', 'loc': 'body', 'msg': \"Value error, no tool named "
     f"'{MARK}'\", 'input': {{'model': 'm'}}}}", "body: Value error, no tool named '...'"),
    (f"logit_bias keys cannot be converted to integer token IDs: ['{MARK}'] (parameter=logit_bias, "
     f"value=['{MARK}'])", "logit_bias keys cannot be converted to integer token IDs: [...]"),
    (f"`logprobs` must be an integer. (parameter=logprobs, value={MARK})", "`logprobs` must be an integer."),
    (f'Unsupported type "{MARK}"', 'Unsupported type "..."'),
    ("top_p must be in (0, 1], got 5.0. (parameter=top_p, value=5.0)", "top_p must be in (0, 1], got 5.0."),
    # A range is the engine's own limit, not the client's text.
    ("temperature must be in [0, 2], got 5.0. (parameter=temperature, value=5.0)",
     "temperature must be in [0, 2], got 5.0."),
    # Pydantic's own text of an error (vLLM checking a content part itself): each location and message, cut before
    # the details that repeat the input, even where the input holds a bracket and a line break; a location part
    # that is a key the client chose is not shown.
    (f"2 validation errors for ValidatorIterator\n0.ChatCompletionContentPartTextParam.text\n  Field required "
     f"[type=missing, input_value={{'type': 'image_url', 'i...'}}, input_type=dict]\n    For further information "
     f"visit https://errors.pydantic.dev/2.14/v/missing\n0.ChatCompletionContentPartImageParam.image_url.detail\n"
     f"  Input should be 'auto', 'low' or 'high' [type=literal_error, input_value='a]b\\n{MARK}', input_type=str]"
     f"\n    For further information visit https://errors.pydantic.dev/2.14/v/literal_error\n0.{MARK} x.y\n"
     f"  Value error, no '{MARK}' [type=value_error, input_value=1, input_type=int]",
     "0.ChatCompletionContentPartTextParam.text: Field required; 0.ChatCompletionContentPartImageParam.image_url."
     "detail: Input should be 'auto', 'low' or 'high'; 0.[...].y: Value error, no '...'"),
    # Any title; a union's tag repeats the input (not one of pydantic's fixed messages); a validator's message that
    # spans lines, or holds a details bracket of its own; an input holding one.
    (f"1 validation error for tagged-union[A,B]\npart\n  Input tag '{MARK}' found using 'type' does not match any of "
     f"the expected tags: 'a', 'b' [type=union_tag_invalid, input_value={{'type': '{MARK}'}}, input_type=dict]",
     "part: Input tag '...' found using '...' does not match any of the expected tags: '...', '...'"),
    (f"1 validation error for M\nv\n  Value error, unknown value 'a\n{MARK}.name\n  {MARK}' [type=value_error, "
     f"input_value='x', input_type=str]", "v: Value error, unknown value '...'"),
    (f"1 validation error for M\nv\n  Value error, unknown value '{MARK} [type=x' [type=value_error, "
     f"input_value='{MARK} [type=x', input_type=str]", "v: Value error, unknown value '...'"),
    (f"1 validation error for list[int]\n0\n  Input should be a valid integer, unable to parse string as an integer "
     f"[type=int_parsing, input_value='{MARK}] [type=missing, tail', input_type=str]",
     "0: Input should be a valid integer, unable to parse string as an integer"),
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
     "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
     "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
     "messages, 1000 in the completion). Please reduce the length of the messages or completion."),
])
def test_the_engines_reason_is_kept_and_the_clients_values_left_out(engine_says: str, client_reads: str) -> None:
    error = told(engine_says)
    assert error.message == client_reads
    assert MARK not in error.message


def test_the_param_is_openais_field_name() -> None:
    assert told("bad", param="body.top_p").param == "top_p"
    assert told("bad", param=None).param is None


def test_an_engine_5xx_says_nothing_of_the_engine() -> None:
    error = translate_engine_error(500, json.dumps({"error": {"message": "EngineCore encountered an issue"}}).encode())
    assert isinstance(error, EngineFailed) and "EngineCore" not in error.message
