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
