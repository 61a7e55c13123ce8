"""The OpenAI API through the gateway, driven by the official SDK against a real vLLM engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from .conftest import TEST_MAX_BODY_BYTES, Stack
from .images import image_part

pytestmark = pytest.mark.engine

GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 7}


def ask(client: openai.OpenAI, model: str, content: list[dict[str, object]] | str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **{"max_tokens": 12, **GREEDY, **kwargs}
    )


def test_models_lists_the_served_model(client: openai.OpenAI, stack: Stack) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [stack.model]
    assert models[0].owned_by == "airlock"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_chat(client: openai.OpenAI, stack: Stack, fmt: str) -> None:
    text_only = ask(client, stack.model, [{"type": "text", "text": "What is in this picture?"}])
    with_image = ask(client, stack.model, [{"type": "text", "text": "What is in this picture?"}, image_part(fmt)])
    assert with_image.choices[0].message.role == "assistant"
    assert isinstance(with_image.choices[0].message.content, str)
    assert with_image.usage.completion_tokens > 0
    # The image became vision tokens in the prompt: proof that the engine decoded and processed it.
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens + 4


def test_two_images_in_one_message(client: openai.OpenAI, stack: Stack) -> None:
    question = {"type": "text", "text": "Compare these two scans."}
    one = ask(client, stack.model, [question, image_part("PNG")])
    two = ask(client, stack.model, [question, image_part("PNG"), image_part("JPEG", (128, 96))])
    assert two.choices[0].finish_reason in {"stop", "length"}
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + 4


def test_streamed_answer_matches_the_whole_answer(client: openai.OpenAI, stack: Stack) -> None:
    content = [{"type": "text", "text": "Describe the image."}, image_part("PNG")]
    whole = ask(client, stack.model, content, max_tokens=24)
    pieces: list[str] = []
    finish_reasons: list[str] = []
    for chunk in ask(client, stack.model, content, max_tokens=24, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finish_reasons.append(chunk.choices[0].finish_reason)
    assert len(pieces) >= 10, "the answer should arrive token by token"
    assert finish_reasons == [whole.choices[0].finish_reason]
    assert "".join(pieces) == whole.choices[0].message.content


INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "paid": {"type": "boolean"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "kind": {"type": "string", "enum": ["invoice", "receipt", "contract"]},
    },
    "required": ["paid", "currency", "kind"],
    "additionalProperties": False,
}


def test_structured_output_with_json_schema(client: openai.OpenAI, stack: Stack) -> None:
    answer = ask(
        client, stack.model,
        [{"type": "text", "text": "Extract the invoice fields as JSON."}, image_part("JPEG")],
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE_SCHEMA}},
    )
    document = json.loads(answer.choices[0].message.content)
    jsonschema.validate(document, INVOICE_SCHEMA)


def test_text_completions(client: openai.OpenAI, stack: Stack) -> None:
    completion = client.completions.create(model=stack.model, prompt="The invoice total is", max_tokens=8, **GREEDY)
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 8


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "gpt-4o", "hello")
    assert caught.value.code == "model_not_found"
    assert caught.value.body["type"] == "not_found_error"


def test_engine_rejection_keeps_its_message_in_openai_shape(client: openai.OpenAI, stack: Stack) -> None:
    # A field the gateway lets through but whose value the engine refuses: its own words reach the client.
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, stack.model, "hello", top_p=5)
    assert caught.value.body["type"] == "invalid_request_error"
    assert "top_p" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b"\xff\xfe", 400, "invalid_json"),
    ],
)
def test_malformed_requests_get_clear_errors(stack: Stack, body: bytes, status: int, code: str) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=body, headers=stack.auth, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_oversized_body_is_refused_with_413(stack: Stack) -> None:
    padding = "x" * (TEST_MAX_BODY_BYTES + 1)
    body = json.dumps({"model": stack.model, "messages": [{"role": "user", "content": padding}]})
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=body, headers=stack.auth, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)].encode()

    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=chunks(), headers=stack.auth, timeout=30)
    assert response.status_code == 413


def test_unknown_endpoint_is_404_in_openai_shape(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/v1/embeddingz", headers=stack.auth, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_api_responses_are_not_cached(stack: Stack) -> None:
    response = httpx.get(f"{stack.base_url}/v1/models", headers=stack.auth, timeout=10)
    assert response.headers["cache-control"] == "no-store"


def test_gateway_survives_all_of_the_above(client: openai.OpenAI, stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/healthz", timeout=5).json() == {"status": "ok"}
    assert ask(client, stack.model, "still there?").choices[0].message.content is not None
    assert stack.process.poll() is None
