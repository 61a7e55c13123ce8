"""Anonymized metrics on the real stack: the counts match what several users sent, nothing names them, the engines'
series come through labelled by replica, and the dashboard and alert rules read series that really exist."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ROOT, Credentials, Stack
from .servers import OidcProvider

pytestmark = pytest.mark.engine

DASHBOARD = ROOT / "helm" / "airlock" / "files" / "airlock-dashboard.json"
ALERTS = ROOT / "helm" / "airlock" / "files" / "airlock-alerts.yaml"
# Series a gateway exports only with a setting the session's stack leaves off, each read where that setting is on.
OPTIONAL_SERIES = {"airlock_shared_limits_connected": "admission.shared_limits: tests/test_shared_limits.py"}
TOKENS = 8

Samples = list[tuple[str, dict[str, str], float]]


def scrape(stack: Stack) -> str:
    response = httpx.get(f"{stack.base_url}/metrics", headers=stack.auth, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def parse(text: str) -> Samples:
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for sample, have, value in samples
               if sample == name and all(have.get(key) == wanted for key, wanted in labels.items()))


def chat(canary: str, stream: bool = False) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Summarise the contract. {canary}"}], "max_tokens": TOKENS,
            "temperature": 0.0, "stream": stream, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def traffic(stack: Stack, credentials: Credentials, oidc_provider: OidcProvider) -> Iterator[dict[str, Any]]:
    """Requests from three users (API key, Basic, OIDC), with a canary prompt, and three refusals; the metrics
    scraped before and after."""
    canary = f"METRICS-CANARY-{secrets.token_hex(6)}"
    subject = f"metrics-subject-{secrets.token_hex(4)}"
    display = f"Metrics Person {secrets.token_hex(3)}"
    token = oidc_provider.token(subject, {"preferred_username": display})
    basic = base64.b64encode(f"bob:{credentials.passwords['bob']}".encode()).decode()
    base = f"{stack.base_url}/v1"
    alice = openai.OpenAI(base_url=base, api_key=credentials.api_key, max_retries=0, timeout=120)
    bob = openai.OpenAI(base_url=base, api_key="unused", default_headers={"Authorization": f"Basic {basic}"},
                        max_retries=0, timeout=120)
    carol = openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=120)
    before = parse(scrape(stack))

    whole = [alice.chat.completions.create(model=stack.model, **chat(canary)) for _ in range(2)]
    streamed_events = []
    for _ in range(2):
        with bob.chat.completions.create(model=stack.model, **chat(canary, stream=True)) as stream:
            streamed_events.append(list(stream))
    with bob.chat.completions.create(model=stack.model, stream_options={"include_usage": True},
                                     **chat(canary, stream=True)) as stream:
        asked_usage = list(stream)
    completion = carol.completions.create(model=stack.model, prompt=f"Invoice total: {canary}", max_tokens=TOKENS,
                                          temperature=0.0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model=f"model-{canary}", **chat(canary))
    with pytest.raises(openai.BadRequestError):
        forbidden = chat(canary)
        forbidden["extra_body"] = {**forbidden["extra_body"], "mm_processor_kwargs": {}}
        alice.chat.completions.create(model=stack.model, **forbidden)
    wrong_key = openai.OpenAI(base_url=base, api_key=f"alk_{canary}", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()

    text = scrape(stack)
    yield {
        "before": before, "after": parse(text), "text": text, "canary": canary, "whole": whole,
        "streamed": streamed_events, "asked_usage": asked_usage, "completion": completion,
        "identities": [subject, display, "alice", "bob", credentials.api_key, credentials.passwords["bob"], token,
                       f"alk_{canary}", basic],
    }


def delta(traffic: dict[str, Any], name: str, **labels: str) -> float:
    return total(traffic["after"], name, **labels) - total(traffic["before"], name, **labels)


def test_request_counts_match_what_was_sent(traffic: dict[str, Any], stack: Stack) -> None:
    model = stack.model
    assert delta(traffic, "airlock_requests_total", model=model, route="chat_completions", status="200") == 5
    assert delta(traffic, "airlock_requests_total", model=model, route="completions", status="200") == 1
    # A model name a client typed is never a label: it is "unknown".
    assert delta(traffic, "airlock_requests_total", model="unknown", route="chat_completions", status="404") == 1
    assert delta(traffic, "airlock_requests_total", model=model, route="chat_completions", status="400") == 1
    assert delta(traffic, "airlock_requests_total", route="models", status="401") == 1
    assert delta(traffic, "airlock_rejected_requests_total", reason="auth", code="invalid_credentials") == 1
    assert delta(traffic, "airlock_rejected_requests_total", reason="screening", code="field_not_allowed") == 1
    assert delta(traffic, "airlock_rejected_requests_total", reason="not_found", code="model_not_found") == 1
    # Three signed-in users (the scrapes are alice's too).
    assert total(traffic["after"], "airlock_active_users") >= 3
    assert total(traffic["after"], "airlock_requests_in_flight") == 0


def test_histograms_observe_every_request_streaming_and_not(traffic: dict[str, Any], stack: Stack) -> None:
    model, chat_route = stack.model, "chat_completions"
    for name in ("airlock_request_duration_seconds_count", "airlock_time_to_first_token_seconds_count"):
        assert delta(traffic, name, model=model, route=chat_route, stream="false") == 2, name
        assert delta(traffic, name, model=model, route=chat_route, stream="true") == 3, name
        assert delta(traffic, name, model=model, route="completions", stream="false") == 1, name
    # Refused requests never reached an engine: no latency observed for them.
    assert delta(traffic, "airlock_request_duration_seconds_count", model="unknown") == 0
    assert delta(traffic, "airlock_queue_wait_seconds_count", model=model) == 6
    assert delta(traffic, "airlock_gateway_overhead_seconds_count", stage="before_forward") == 6
    assert delta(traffic, "airlock_gateway_overhead_seconds_count", stage="per_chunk") == 3
    assert delta(traffic, "airlock_output_tokens_per_second_count", model=model) == 6
    # The engines' own counts of tokens, streams included (their usage event is asked for by the gateway).
    assert delta(traffic, "airlock_output_tokens_total", model=model) == 6 * TOKENS
    prompt_tokens = sum(answer.usage.prompt_tokens for answer in traffic["whole"])
    prompt_tokens += traffic["asked_usage"][-1].usage.prompt_tokens * 3 + traffic["completion"].usage.prompt_tokens
    assert delta(traffic, "airlock_prompt_tokens_total", model=model) == prompt_tokens


def test_streams_end_as_the_client_asked(traffic: dict[str, Any]) -> None:
    # The usage event the gateway asks for is removed from streams that did not ask for it...
    for events in traffic["streamed"]:
        assert events and all(event.choices for event in events)
        assert all(event.usage is None for event in events)
        assert "".join(event.choices[0].delta.content or "" for event in events)
    # ...and kept, once, for a client that did.
    usage = [event for event in traffic["asked_usage"] if event.usage is not None]
    assert len(usage) == 1 and usage[0].choices == [] and usage[0].usage.completion_tokens == TOKENS


def test_nothing_in_the_metrics_names_a_user_a_key_an_address_or_content(traffic: dict[str, Any]) -> None:
    text = traffic["text"]
    for needle in [*traffic["identities"], traffic["canary"], "127.0.0.1", "localhost", "Summarise"]:
        assert needle not in text, needle
    labels = {key for _, have, _ in traffic["after"] for key in have}
    assert not labels & {"user", "user_id", "key", "api_key", "ip", "client", "tenant", "address", "prompt"}


def test_the_engines_series_come_through_labelled_by_replica(traffic: dict[str, Any], stack: Stack) -> None:
    engine = [(name, labels) for name, labels, _ in traffic["after"] if name.startswith("vllm:")]
    assert engine, "no vllm:* series in the scrape"
    assert {labels.get("replica") for _, labels in engine} == {"0"}
    assert total(traffic["after"], "airlock_engine_scrape_ok", replica="0") == 1
    assert total(traffic["after"], "airlock_replica_healthy", replica="0") == 1
    assert total(traffic["after"], "airlock_ready") == 1
    # Only vllm:* families: the engine's process series would clash with the gateway's own.
    assert not [name for name, labels, _ in traffic["after"] if name.startswith("process_")]
    generated = delta(traffic, "vllm:generation_tokens_total", replica="0")
    assert generated >= 6 * TOKENS


def test_metrics_need_a_signed_in_user_on_the_main_listener(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_refusals_are_summed_up_in_json_log_lines_without_identities(traffic: dict[str, Any], stack: Stack) -> None:
    # The session stack sums refusals up every second: the traffic's last refusal (a wrong key) may be in a line
    # still to come when earlier tests' refusals already have theirs.
    deadline = time.monotonic() + 10
    while True:
        events = json_lines(stack.log_path)
        refused = [event for event in events if event.get("event") == "requests_refused"]
        counted: dict[str, int] = {}
        for event in refused:
            for reason, count in event["counts"].items():
                counted[reason] = counted.get(reason, 0) + count
        if (counted.get("auth", 0) and counted.get("screening", 0)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert refused, "no requests_refused log line"
    assert counted.get("auth", 0) >= 1 and counted.get("screening", 0) >= 1, counted
    starts = [event for event in events if event.get("event") == "start"]
    assert starts and starts[0]["command"] == "up" and starts[0]["level"] == "info"
    assert any("replica 0 is healthy" in event["message"] for event in events)
    log = stack.log_path.read_text()
    for needle in [*traffic["identities"][:2], traffic["canary"], traffic["identities"][4]]:
        assert needle not in log, needle


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The gateway's JSON log lines (the engines' own output shares the file, as text)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "logger" in event:
            events.append(event)
    return events


def metric_names(expression: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The series names a PromQL expression reads, and the ``le`` buckets it names (from the real PromQL parser)."""
    names: set[str] = set()
    buckets: set[tuple[str, str]] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
            buckets.update((node.name, m.value) for m in node.matchers.matchers if m.name == "le")
        return True

    promql_parser.walk(promql_parser.parse(expression), pre_visit=visit)
    return names, buckets


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    expressions = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert len(expressions) >= 20
    # Grafana's variables, as a query would see them once filled in.
    return [expr.replace("$__rate_interval", "5m").replace("$model", ".*") for expr in expressions]


def alert_rules() -> list[dict[str, Any]]:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    return rules


def test_the_dashboard_and_alert_rules_read_series_the_stack_exports(traffic: dict[str, Any]) -> None:
    exported = {name for name, _, _ in traffic["after"]}
    rules = alert_rules()
    assert {"AirlockReplicaDown", "AirlockHighErrorRate", "AirlockFirstTokenSLOFastBurn"} <= {r["alert"] for r in rules}
    for expression in dashboard_expressions() + [rule["expr"] for rule in rules]:
        names, buckets = metric_names(expression)
        assert names, expression
        assert names <= exported | OPTIONAL_SERIES.keys(), f"{sorted(names - exported)} in {expression!r}"
        for name, bucket in buckets:  # a bucket bound that does not exist would match nothing
            assert any(sample == name and have.get("le") == bucket for sample, have, _ in traffic["after"]), bucket


def test_every_exported_gateway_series_is_on_the_dashboard(traffic: dict[str, Any]) -> None:
    shown = set().union(*(metric_names(expression)[0] for expression in dashboard_expressions()))
    families = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum").removesuffix("_total")
                for name in shown}
    gateway = {family.name for family in text_string_to_metric_families(traffic["text"])
               if family.name.startswith("airlock_") and not family.name.startswith("airlock_process_")}
    assert gateway - families == set()


def test_the_readme_lists_every_gateway_series(traffic: dict[str, Any]) -> None:
    readme = Path(ROOT / "README.md").read_text()
    gateway = {family.name + ("_total" if family.type == "counter" else "")
               for family in text_string_to_metric_families(traffic["text"]) if family.name.startswith("airlock_")}
    missing = sorted(name for name in gateway if f"`{name}`" not in readme and not name.startswith("airlock_process_"))
    assert not missing, missing
