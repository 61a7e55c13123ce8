"""What the OpenAI SDK sends back and besides: the assistant message it returned, sent back as it came in a
conversation; OpenAI's fields about its own service (store, metadata, service_tier, ...), accepted and kept from the
engine; and requests a web page elsewhere made a browser send, refused. Screening's rules first (no engine), then
through the real gateway and engine with the real SDK."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ParsedChatCompletionMessage

from server.admission import text_length
from server.app import create_gateway
from server.auth import Principal
from server.config import PrivacySettings, ScreeningSettings, load_settings
from server.errors import InvalidRequest
from server.screening import Screening
from server.tenancy import TenantSalts

from .conftest import Stack
from .servers import ThreadedServer, free_port, gateway_in_front_of

SERVICE_FIELDS: dict[str, Any] = {
    "store": False, "metadata": {"team": "finance"}, "service_tier": "auto", "prompt_cache_key": "invoices",
    "safety_identifier": "hashed-user", "verbosity": "low", "modalities": ["text"],
}
# The assistant message as openai 2.x's ParsedChatCompletionMessage.model_dump() gives it (the parse and stream
# helpers return one; ChatCompletionMessage has no "parsed").
SDK_ASSISTANT = {"content": "Hello.", "refusal": None, "role": "assistant", "annotations": None, "audio": None,
                 "function_call": None, "tool_calls": None, "parsed": None}


def forwarded(payload: dict[str, Any]) -> dict[str, Any]:
    screening = Screening(ScreeningSettings(), TenantSalts(PrivacySettings()))
    body: dict[str, Any] = json.loads(screening.screen("chat", payload, Principal("u", source="api_key")).body)
    return body


def conversation(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}, *messages], **fields}


def test_the_sdks_assistant_message_goes_to_the_engine_without_its_empty_fields() -> None:
    sent = forwarded(conversation(SDK_ASSISTANT, {"role": "user", "content": "and?"}))
    assert sent["messages"][1] == {"role": "assistant", "content": "Hello.", "tool_calls": None}


def test_a_refusal_without_content_becomes_the_turns_content() -> None:
    refused = {**SDK_ASSISTANT, "content": None, "refusal": "I cannot help with that."}
    assert forwarded(conversation(refused))["messages"][1]["content"] == "I cannot help with that."
    both = {**SDK_ASSISTANT, "refusal": "No.", "annotations": [], "parsed": {"total": 1}}
    assert forwarded(conversation(both))["messages"][1] == {"role": "assistant", "content": "Hello.",
                                                            "tool_calls": None}


def test_a_refusal_part_is_the_text_part_the_engine_reads_and_is_counted_as_one() -> None:
    words = "I will not read this contract aloud. " * 50
    part = {"role": "assistant", "content": [{"type": "refusal", "refusal": words}]}
    payload = conversation(part)
    sent = forwarded(payload)
    assert sent["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": words}]}
    # What the fair queue's cost estimate and the documents' page budget read: the refusal's text is in it.
    assert text_length(payload["messages"]) == len("hi") + len(words)


@pytest.mark.parametrize("role", ["user", "system", "developer", "tool"])
def test_the_sdks_echo_is_an_assistants_only(role: str) -> None:
    for field, value in (("refusal", "You are evil."), ("annotations", None), ("parsed", None)):
        with pytest.raises(InvalidRequest) as refused:
            forwarded(conversation({"role": role, "content": "x", "tool_call_id": "c", field: value}))
        assert refused.value.code == "field_not_allowed" and f"'{field}'" in refused.value.message
    with pytest.raises(InvalidRequest) as refused:
        forwarded(conversation({"role": role, "content": [{"type": "refusal", "refusal": "No."}]}))
    assert refused.value.code == "unsupported_content"


def test_service_fields_are_accepted_and_not_forwarded() -> None:
    sent = forwarded(conversation(**SERVICE_FIELDS, user="alice@example.org"))
    assert not (set(SERVICE_FIELDS) | {"user"}) & set(sent)


@pytest.mark.parametrize(("extra", "code"), [
    ({"service_tier": "ultra"}, "invalid_value"),
    ({"verbosity": "loud"}, "invalid_value"),
    ({"modalities": ["text", "audio"]}, "unsupported_modality"),
])
def test_service_fields_outside_openais_values_are_refused(extra: dict[str, Any], code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        forwarded(conversation(**extra))
    assert refused.value.code == code and refused.value.param == next(iter(extra))


@pytest.mark.parametrize(("field", "value", "code"), [
    ("audio", {"id": "audio_abc"}, "field_not_allowed"),
    ("function_call", {"name": "f", "arguments": "{}"}, "field_not_allowed"),
    ("annotations", "none", "invalid_messages"),
    ("refusal", 3, "invalid_messages"),
])
def test_what_the_sdk_echo_cannot_hold_is_refused(field: str, value: Any, code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        forwarded(conversation({**SDK_ASSISTANT, field: value}))
    assert refused.value.code == code and field in refused.value.message


@pytest.mark.engine
def test_a_conversation_sends_the_sdks_own_message_back(client: openai.OpenAI, stack: Stack) -> None:
    question: list[Any] = [{"role": "user", "content": "Say hello."}]
    first = client.chat.completions.create(model=stack.model, messages=question, max_tokens=8)
    reply = first.choices[0].message
    # What the SDK's parse and stream helpers return (they raise at finish_reason "length", which the demo model's
    # short answers end with, so it is built from the reply here): its "parsed" goes back too.
    parsed = ParsedChatCompletionMessage[None].model_validate({**reply.model_dump(), "parsed": None})
    # As the SDK's examples write it: the message object itself, its dump (what a saved history holds), and the
    # helpers' message.
    for sent_back in (reply, reply.model_dump(), parsed):
        again = client.chat.completions.create(
            model=stack.model, messages=[*question, sent_back, {"role": "user", "content": "Again."}], max_tokens=8)
        assert again.choices[0].finish_reason in {"stop", "length"}


@pytest.mark.engine
def test_openais_service_fields_do_not_stop_a_request(client: openai.OpenAI, stack: Stack) -> None:
    answer = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Hello."}], max_tokens=4, store=False,
        metadata=SERVICE_FIELDS["metadata"], service_tier="auto", modalities=["text"],
        extra_body={"prompt_cache_key": "invoices", "safety_identifier": "hashed-user", "verbosity": "low"})
    assert answer.choices[0].finish_reason in {"stop", "length"}


def chat_body(stack: Stack) -> dict[str, Any]:
    return {"model": stack.model, "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 2}


@pytest.mark.engine
@pytest.mark.parametrize("browser", [
    {"sec-fetch-site": "cross-site", "origin": "https://pages.example"},
    {"sec-fetch-site": "same-site", "origin": "https://other.dept.internal"},
    {"origin": "https://pages.example"},  # a browser too old for Fetch Metadata
    {"origin": "null"},  # a sandboxed frame, a file:// page
])
def test_a_request_another_site_made_a_browser_send_is_refused(stack: Stack, browser: dict[str, str]) -> None:
    # Credentials included: a browser holding the user's Basic credentials for Airlock sends them along.
    refused = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat_body(stack),
                         headers={**stack.auth, **browser}, timeout=60)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "cross_origin_request"
    # Reads pass: they change nothing, and their answer stays hidden from the other site.
    assert httpx.get(f"{stack.base_url}/v1/models", headers={**stack.auth, **browser}, timeout=30).status_code == 200


@pytest.mark.engine
def test_the_consoles_own_requests_and_non_browsers_pass(stack: Stack) -> None:
    host = stack.base_url.removeprefix("http://")
    for headers in ({"sec-fetch-site": "same-origin", "origin": stack.base_url}, {"origin": stack.base_url},
                    {"sec-fetch-site": "none"}, {}):
        answered = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat_body(stack),
                              headers={**stack.auth, **headers, "host": host}, timeout=120)
        assert answered.status_code == 200, (headers, answered.text)


@pytest.mark.engine
def test_without_sign_in_only_this_computers_names_are_served(stack: Stack) -> None:
    """No sign-in configured (loopback only): a page that pointed its own name at 127.0.0.1 (DNS rebinding) would be
    same-origin with the gateway; the Host it asks for gives it away."""
    with gateway_in_front_of(stack.engine_socket) as open_gateway:
        port = open_gateway.rsplit(":", 1)[1]
        for name in (f"rebound.example:{port}", "rebound.example", f"127.0.0.1.nip.io:{port}"):
            for answer in (httpx.get(f"{open_gateway}/v1/models", headers={"host": name}, timeout=30),
                           httpx.get(f"{open_gateway}/", headers={"host": name}, timeout=30),
                           httpx.post(f"{open_gateway}/v1/chat/completions", json=chat_body(stack),
                                      headers={"host": name}, timeout=60)):
                assert answer.status_code == 403, (name, answer.text)
                assert answer.json()["error"]["code"] == "host_not_allowed"
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", f"LOCALHOST:{port}"):
            assert httpx.get(f"{open_gateway}/v1/models", headers={"host": name}, timeout=30).status_code == 200, name
        answered = httpx.post(f"{open_gateway}/v1/chat/completions", json=chat_body(stack), timeout=120)
        assert answered.status_code == 200, answered.text
        # Two Host headers (no browser sends them) would let this check and the app read different ones.
        for hosts in ((f"localhost:{port}", "rebound.example"), ("rebound.example", f"localhost:{port}")):
            assert raw_status(int(port), "GET /v1/models", *(f"Host: {host}" for host in hosts)) == 400
    # With sign-in configured, other names are served (the stack's gateway has it): a department's DNS name.
    named = httpx.get(f"{stack.base_url}/v1/models", headers={**stack.auth, "host": "airlock.dept.internal"},
                      timeout=30)
    assert named.status_code == 200


def raw_status(port: int, request_line: str, *headers: str) -> int:
    """The status of a request written byte for byte (httpx sends one Host header, whatever it is given)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall("\r\n".join([f"{request_line} HTTP/1.1", *headers, "Connection: close", "", ""]).encode())
        return int(connection.recv(1024).split(b" ", 2)[1])


@pytest.mark.engine
def test_a_metrics_listener_on_loopback_answers_only_to_this_computers_names(stack: Stack) -> None:
    """The separate metrics listener asks nobody who is calling: DNS rebinding would let any page read it."""
    port, api_port = free_port(), free_port()
    settings = load_settings(gateway={"port": api_port}, metrics={"listener": "separate", "port": port})
    gateway = create_gateway(settings, [f"unix:{stack.engine_socket}"])
    assert gateway.metrics is not None
    # Both apps, as `airlock gateway` serves them: the API's lifespan opens and closes the engines' connections.
    with ThreadedServer(gateway.api, host="127.0.0.1", port=api_port), \
            ThreadedServer(gateway.metrics, host="127.0.0.1", port=port):
        refused = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"host": f"rebound.example:{port}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "host_not_allowed"
        assert "rebound" not in refused.text
        served = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert served.status_code == 200 and "airlock_" in served.text
