"""Time to first token is taken at the engine's first byte, not at the answer's end: measured against a paced engine
(a fake on purpose, see ``paced_chat``: a real stream on this CPU cannot be relied on to arrive token by token)."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .servers import gateway_in_front_of
from .test_limits_and_drain import PACE_S, paced, paced_engine  # noqa: F401 (paced_engine is a fixture)

TOKENS = 40


def sums(text: str, name: str) -> dict[str, float]:
    """``name``'s value by its stream label."""
    return {sample.labels["stream"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def test_time_to_first_token_is_taken_at_the_engines_first_byte(paced_engine: Path) -> None:  # noqa: F811
    with gateway_in_front_of(paced_engine) as base_url:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=paced(TOKENS, stream=True),
                          timeout=60) as answer:
            assert answer.status_code == 200
            assert sum(line.startswith("data: {") for line in answer.iter_lines()) == TOKENS + 1
        assert httpx.post(f"{base_url}/v1/chat/completions", json=paced(TOKENS), timeout=60).status_code == 200
        text = httpx.get(f"{base_url}/metrics").text
    ttft = sums(text, "airlock_time_to_first_token_seconds_sum")
    duration = sums(text, "airlock_request_duration_seconds_sum")
    counts = sums(text, "airlock_time_to_first_token_seconds_count")
    assert counts == {"true": 1.0, "false": 1.0}
    # The stream's tokens come one every PACE_S: its first byte long before its end.
    assert duration["true"] >= TOKENS * PACE_S * 0.9
    assert ttft["true"] < duration["true"] / 4
    # A whole answer's first byte comes with the answer.
    assert ttft["false"] <= duration["false"]
