"""What the OpenAI SDKs and HTTP monitors ask besides completions: one model's card, HEAD wherever GET is served,
and request encodings the gateway does not take, through the real gateway and engine."""

from __future__ import annotations

import gzip
import json

import httpx
import openai
import pytest

from .conftest import TEST_MAX_BODY_BYTES, Stack

pytestmark = pytest.mark.engine


def test_a_model_is_retrieved_by_its_id(client: openai.OpenAI, stack: Stack) -> None:
    card = client.models.retrieve(stack.model)
    assert card.id == stack.model and card.object == "model"
    assert card.model_dump() == client.models.list().data[0].model_dump()


@pytest.mark.parametrize("name", ["no-such-model", "org/no-such-model", "x" * 300])
def test_an_unknown_model_id_is_model_not_found(client: openai.OpenAI, name: str) -> None:
    with pytest.raises(openai.NotFoundError) as absent:
        client.models.retrieve(name)
    assert absent.value.code == "model_not_found"
    assert absent.value.body["type"] == "not_found_error"  # type: ignore[index]
    assert "x" * 101 not in absent.value.message  # a long name is cut, not echoed whole


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/models", "/v1/models/{model}", "/v1/airlock/privacy"])
def test_head_is_answered_wherever_get_is(stack: Stack, path: str) -> None:
    url = stack.base_url + path.format(model=stack.model)
    got = httpx.get(url, headers=stack.auth, timeout=10)
    head = httpx.head(url, headers=stack.auth, timeout=10)
    assert got.status_code == 200
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == got.headers["content-length"]


def test_head_needs_the_same_credentials_as_get(stack: Stack) -> None:
    assert httpx.head(f"{stack.base_url}/v1/models", timeout=10).status_code == 401


def test_head_on_an_engine_route_is_405_with_allow(stack: Stack) -> None:
    head = httpx.head(f"{stack.base_url}/v1/chat/completions", headers=stack.auth, timeout=10)
    assert head.status_code == 405
    assert head.headers["allow"] == "POST"


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_is_refused_with_415(stack: Stack, encoding: str) -> None:
    body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=gzip.compress(json.dumps(body).encode()),
                          headers={**stack.auth, "content-type": "application/json", "content-encoding": encoding},
                          timeout=30)
    assert response.status_code == 415
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_content_encoding")
    assert "Content-Encoding" in error["message"]


def test_an_identity_encoding_is_accepted(stack: Stack) -> None:
    body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body,
                          headers={**stack.auth, "content-encoding": "identity"}, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/v1/models", {"GET", "HEAD"}), ("PUT", "/healthz", {"GET", "HEAD"}),
    ("DELETE", "/v1/models/some-model", {"GET", "HEAD"}), ("GET", "/v1/completions", {"POST"}),
])
def test_405_says_which_methods_are_allowed(stack: Stack, method: str, path: str, allowed: set[str]) -> None:
    response = httpx.request(method, stack.base_url + path, headers=stack.auth, timeout=10)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert set(response.headers["allow"].split(", ")) == allowed


@pytest.mark.parametrize("path", ["/healthz/", "/v1/models/", "/console/app.js/"])
def test_a_trailing_slash_is_not_found_never_redirected(stack: Stack, path: str) -> None:
    # FastAPI's redirect would take its Location from the Host header a client chose.
    response = httpx.get(stack.base_url + path, headers={**stack.auth, "host": "elsewhere.example"}, timeout=10)
    assert response.status_code == 404
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


def test_every_route_bounds_its_body(stack: Stack) -> None:
    """The console's sign-in read and parsed any size before refusing it; gateway.max_body_bytes holds there too."""
    big = b'{"username": "' + b"a" * (TEST_MAX_BODY_BYTES + 1) + b'", "password": "x"}'
    for path in ("/console/api/sign-in", "/v1/models"):
        response = httpx.post(stack.base_url + path, content=big, headers={"content-type": "application/json"},
                              timeout=30)
        assert response.status_code == 413, (path, response.text[:200])
        assert response.json()["error"]["code"] == "request_too_large"
