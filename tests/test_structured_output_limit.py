"""screening.max_structured_output_bytes on its own (no engine): what counts toward it and what the refusal says.
The real stack's refusals are in tests/test_screening.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.auth import Principal
from server.config import PrivacySettings, ScreeningSettings
from server.errors import InvalidRequest
from server.screening import Screening
from server.tenancy import TenantSalts

LIMIT = 2048


def screen(**fields: Any) -> None:
    screening = Screening(ScreeningSettings(max_structured_output_bytes=LIMIT), TenantSalts(PrivacySettings()))
    payload = {"model": "m", "messages": [{"role": "user", "content": "Read the invoice."}], **fields}
    screening.screen("chat", payload, Principal("someone", source="api_key"))


def schema_of(size: int) -> dict[str, Any]:
    """A response_format of exactly ``size`` bytes as compact JSON."""
    response_format: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [""]}}}
    padding = size - len(json.dumps(response_format, separators=(",", ":")))
    response_format["json_schema"]["schema"]["enum"] = ["a" * padding]
    return response_format


def tools_of(size: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "pick", "description": "d" * size}}]


def test_constraints_up_to_the_limit_pass_and_one_byte_more_is_refused_naming_the_limit() -> None:
    screen(response_format=schema_of(LIMIT))
    with pytest.raises(InvalidRequest) as refused:
        screen(response_format=schema_of(LIMIT + 1))
    assert refused.value.code == "structured_output_too_large" and refused.value.param == "response_format"
    assert refused.value.message == (f"the output constraints (response_format) take {LIMIT + 1} bytes, above this "
                                     f"server's limit of {LIMIT}: the engine compiles them before answering, which "
                                     "takes seconds at this size")


def test_tools_count_when_the_engine_compiles_them() -> None:
    screen(tools=tools_of(LIMIT), tool_choice="auto")  # only part of the prompt
    screen(tools=tools_of(LIMIT))
    for tool_choice in ("required", {"type": "function", "function": {"name": "pick"}}):
        with pytest.raises(InvalidRequest) as refused:
            screen(tools=tools_of(LIMIT), tool_choice=tool_choice)
        assert refused.value.param == "tools"
    # A strict tool is compiled even with "auto" (vLLM's VLLM_ENFORCE_STRICT_TOOL_CALLING), not with "none".
    strict = [{**tool, "function": {**tool["function"], "strict": True}} for tool in tools_of(LIMIT)]
    for tool_choice in ("auto", None):
        with pytest.raises(InvalidRequest) as refused:
            screen(tools=strict, tool_choice=tool_choice)
        assert refused.value.param == "tools"
    screen(tools=strict, tool_choice="none")
    # The fields are counted together.
    with pytest.raises(InvalidRequest, match=r"\(response_format, structured_outputs\)"):
        screen(response_format=schema_of(LIMIT // 2 + 10), structured_outputs={"regex": "a" * (LIMIT // 2)})
