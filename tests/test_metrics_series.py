"""``GatewayMetrics.finish`` finds its labelled series in a table of its own instead of calling ``labels`` per request:
the exposition is what ``labels`` would have made (a series appears at its first use, not before), and the table is
bounded."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server import metrics as metrics_module
from server.metrics import GatewayMetrics, RequestRecord, _Children


def series(gateway: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(gateway.registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(("airlock_requests", "airlock_request_duration", "airlock_time_to_first",
                                       "airlock_queue_wait", "airlock_prompt_tokens", "airlock_output_tokens",
                                       "airlock_gateway_overhead", "airlock_output_tokens_per_second"))}


def forwarded(model: str, *, stream: bool, tokens: tuple[int, int] | None = (12, 8), chunks: int = 0) -> RequestRecord:
    record = RequestRecord(route="chat_completions", arrived=100.0)
    record.identified(model, stream)
    record.queue_wait = 0.001
    record.forwarded_at, record.first_byte_at = 100.002, 100.01
    record.counted(tokens)
    record.relay_s, record.chunks = 0.0001 * chunks, chunks
    return record


def test_finish_exports_the_series_labels_would_make_and_no_other() -> None:
    gateway = GatewayMetrics(60.0)
    before = series(gateway)
    assert not any(name.startswith(("airlock_request_duration", "airlock_gateway_overhead"))
                   for name, _ in before)  # nothing observed yet: no series at all, not even at zero
    gateway.finish(RequestRecord(route="chat_completions", arrived=1.0), 401)  # refused before forwarding
    after_refusal = series(gateway)
    assert after_refusal[("airlock_requests_total",
                          (("model", "none"), ("route", "chat_completions"), ("status", "401")))] == 1.0
    assert not any(name.startswith("airlock_request_duration") for name, _ in after_refusal)
    for _ in range(3):
        gateway.finish(forwarded("qwen", stream=False), 200)
    gateway.finish(forwarded("qwen", stream=True, chunks=4), 200)
    gateway.finish(forwarded("unknown", stream=False, tokens=None), 502)
    seen = series(gateway)
    labels = (("model", "qwen"), ("route", "chat_completions"))
    assert seen[("airlock_requests_total", (*labels, ("status", "200")))] == 4.0
    assert seen[("airlock_request_duration_seconds_count", (*labels, ("stream", "false")))] == 3.0
    assert seen[("airlock_request_duration_seconds_count", (*labels, ("stream", "true")))] == 1.0
    assert seen[("airlock_time_to_first_token_seconds_count", (*labels, ("stream", "false")))] == 3.0
    assert seen[("airlock_queue_wait_seconds_count", (("model", "qwen"),))] == 4.0
    assert seen[("airlock_prompt_tokens_total", (("model", "qwen"),))] == 48.0
    assert seen[("airlock_output_tokens_total", (("model", "qwen"),))] == 32.0
    assert seen[("airlock_output_tokens_per_second_count", (("model", "qwen"),))] == 4.0
    assert seen[("airlock_gateway_overhead_seconds_count", (("stage", "before_forward"),))] == 5.0
    assert seen[("airlock_gateway_overhead_seconds_count", (("stage", "per_chunk"),))] == 1.0
    # No token counts reported: no token series for that model, as before.
    assert ("airlock_output_tokens_total", (("model", "unknown"),)) not in seen
    assert seen[("airlock_request_duration_seconds_count",
                 (("model", "unknown"), ("route", "chat_completions"), ("stream", "false")))] == 1.0


def test_a_kept_series_is_the_registrys_own() -> None:
    gateway = GatewayMetrics(60.0)
    children = _Children(gateway.requests)
    child = children("qwen", "chat_completions", "200")
    assert child is gateway.requests.labels("qwen", "chat_completions", "200")
    assert children("qwen", "chat_completions", "200") is child


def test_the_table_is_bounded_and_counts_go_on_after_it_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "CHILDREN_KEPT", 4)
    gateway = GatewayMetrics(60.0)
    children = _Children(gateway.requests)
    for _ in range(3):
        for status in range(200, 210):
            children("qwen", "chat_completions", str(status)).inc()
            assert len(children._children) <= 4
    # Forgotten and found again: the same series (counts were not reset), three increments each.
    for status in range(200, 210):
        assert gateway.requests.labels("qwen", "chat_completions", str(status))._value.get() == 3.0
