"""Request screening against the real stack: a corpus of bad requests, each refused with the right 4xx in OpenAI
shape, the gateway healthy afterwards, and nothing of them written anywhere on disk."""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.config import ScreeningSettings

from .conftest import Stack
from .hostile_images import jpeg_with_fill, png_with_text_bomb
from .images import data_url, image_bytes, image_part
from .leaks import files_written_since, read

pytestmark = pytest.mark.engine

CANARY = "CANARY-7f3a9c-screening"
MODEL = "airlock-demo-qwen3-vl"


def chat(*parts: Any, **fields: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": CANARY}, *parts]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def image(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""
    png = bytearray(image_bytes("PNG", (16, 16)))
    ihdr = bytearray(png[12:29])  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def noise_png(size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def corpus() -> list[tuple[str, Any, int, str]]:
    """(name, body (a dict is sent as JSON, bytes as is), status, code)."""
    png = image_bytes("PNG")
    return [
        ("not json", b"{" + CANARY.encode(), 400, "invalid_json"),
        ("json array", json.dumps([CANARY]).encode(), 400, "invalid_json"),
        ("empty body", b"", 400, "invalid_json"),
        ("invalid utf-8", b'{"model": "\xff\xfe' + CANARY.encode() + b'"}', 400, "invalid_json"),
        ("no model", {"messages": [{"role": "user", "content": CANARY}]}, 400, "missing_model"),
        ("model is a number", {"model": 7, "messages": []}, 400, "missing_model"),
        ("unknown model", {**chat(), "model": "gpt-4o"}, 404, "model_not_found"),
        ("messages not a list", {"model": MODEL, "messages": CANARY}, 400, "invalid_messages"),
        ("messages empty", {"model": MODEL, "messages": []}, 400, "invalid_messages"),
        ("message not an object", {"model": MODEL, "messages": [CANARY]}, 400, "invalid_messages"),
        ("unknown role", {"model": MODEL, "messages": [{"role": "root", "content": CANARY}]}, 400,
         "invalid_messages"),
        ("content a number", {"model": MODEL, "messages": [{"role": "user", "content": 42}]}, 400,
         "invalid_messages"),
        ("unknown message field", {"model": MODEL, "messages": [{"role": "user", "content": CANARY, "x": 1}]}, 400,
         "field_not_allowed"),
        ("text not a string", chat({"type": "text", "text": ["a"]}), 400, "invalid_messages"),
        ("audio part", chat({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}), 400,
         "unsupported_content"),
        ("video part", chat({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}), 400,
         "unsupported_content"),
        ("image embeds part", chat({"type": "image_embeds", "image_embeds": "AAAA"}), 400, "unsupported_content"),
        ("http image", chat(image("http://192.0.2.1/invoice.png")), 400, "image_url_not_allowed"),
        ("https image", chat(image("https://example.com/invoice.png")), 400, "image_url_not_allowed"),
        ("file image", chat(image("file:///etc/passwd")), 400, "image_url_not_allowed"),
        ("unknown scheme", chat(image("gopher://example.com/1")), 400, "image_url_not_allowed"),
        ("no scheme", chat(image("/tmp/invoice.png")), 400, "image_url_not_allowed"),
        ("image url not a string", chat(image(123)), 400, "invalid_image"),  # type: ignore[arg-type]
        ("data url not base64", chat(image("data:image/png," + CANARY)), 400, "invalid_image"),
        ("bad base64", chat(image("data:image/png;base64,!!!" + CANARY)), 400, "invalid_image"),
        ("truncated png", chat(image(b64(png[: len(png) // 2]))), 400, "invalid_image"),
        ("not an image", chat(image(b64(CANARY.encode() * 10))), 400, "invalid_image"),
        ("gif not allowed", chat(image(b64(image_bytes("GIF"), "image/gif"))), 400, "invalid_image"),
        # Valid, but built to be slow to check: refused after a bounded amount of work (tests/test_hostile_images.py).
        ("jpeg padded with 200 KB of fill bytes", chat(image(b64(jpeg_with_fill(200_000), "image/jpeg"))), 400,
         "invalid_image"),
        ("png whose text inflates to 2 MiB", chat(image(b64(png_with_text_bomb(2)))), 400, "invalid_image"),
        ("decompression bomb", chat(image(b64(png_claiming(40_000, 40_000)))), 400, "image_too_large"),
        ("just over the pixel limit", chat(image(b64(png_claiming(5001, 5000)))), 400, "image_too_large"),
        ("image over the byte limit", chat(image(b64(noise_png((640, 640))))), 400, "image_too_large"),
        ("too many images", chat(*[image_part("PNG")] * (ScreeningSettings().max_images_per_request + 1)), 400,
         "too_many_images"),
        ("uuid on a part", chat(image(data_url("PNG"), uuid="someone-elses-image")), 400, "field_not_allowed"),
        ("uuid inside image_url", chat({"type": "image_url", "image_url": {"url": data_url("PNG"), "uuid": "x"}}),
         400, "invalid_image"),
        ("client cache_salt", chat(cache_salt="copied-from-a-colleague"), 400, "field_not_allowed"),
        ("mm_processor_kwargs", chat(mm_processor_kwargs={"max_pixels": 10**9}), 400, "field_not_allowed"),
        ("per-request chat_template", chat(chat_template="{{ " + CANARY + " }}"), 400, "field_not_allowed"),
        ("kv_transfer_params", chat(kv_transfer_params={"do_remote_prefill": True}), 400, "field_not_allowed"),
        ("vllm_xargs", chat(vllm_xargs={"a": 1}), 400, "field_not_allowed"),
        ("unknown field", chat(foo=CANARY), 400, "field_not_allowed"),
        ("chat_template_kwargs other key", chat(chat_template_kwargs={"tokenize": True}), 400, "field_not_allowed"),
        ("chat_template_kwargs not object", chat(chat_template_kwargs=[CANARY]), 400, "invalid_value"),
        ("max_tokens too large", chat(max_tokens=10**9), 400, "max_tokens_too_large"),
        ("max_tokens negative", chat(max_tokens=-1), 400, "invalid_value"),
        ("max_tokens a string", chat(max_tokens="many"), 400, "invalid_type"),
        ("max_completion_tokens a bool", chat(max_completion_tokens=True), 400, "invalid_type"),
        ("too many choices", chat(n=50), 400, "too_many_choices"),
        ("n zero", chat(n=0), 400, "invalid_value"),
        ("temperature a string", chat(temperature="hot"), 400, "invalid_type"),
        ("top_p out of range", chat(top_p=5), 400, "invalid_request"),  # the engine's own check
        # A grammar that derives no finite text: every replica's engine ends it with a bare internal error.
        ("grammar deriving nothing", chat(structured_outputs={"grammar": "root ::= root root"}), 400,
         "invalid_grammar"),
        # Output constraints the engine would spend seconds compiling (screening.max_structured_output_bytes).
        ("json_schema enum of 80 KB", chat(response_format={"type": "json_schema", "json_schema": {
            "name": "pick", "schema": {"type": "string", "enum": ENUM_80_KB}}}), 400, "structured_output_too_large"),
        ("required tools of 80 KB", chat(tools=[tool_choosing(ENUM_80_KB)], tool_choice="required"), 400,
         "structured_output_too_large"),
    ]


ENUM_80_KB = [f"{CANARY}-{index:05d}" for index in range(2800)]


def tool_choosing(values: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"value": {"type": "string", "enum": values}}}}}


def completions_corpus() -> list[tuple[str, Any, int, str]]:
    return [
        ("prompt a number", {"model": MODEL, "prompt": 42}, 400, "invalid_prompt"),
        ("prompt empty", {"model": MODEL, "prompt": ""}, 400, "invalid_prompt"),
        ("completions cache_salt", {"model": MODEL, "prompt": CANARY, "cache_salt": "x"}, 400, "field_not_allowed"),
        ("completions chat field", {"model": MODEL, "prompt": CANARY, "messages": []}, 400, "field_not_allowed"),
        ("completions choice of 80 KB", {"model": MODEL, "prompt": CANARY,
                                         "structured_outputs": {"choice": ENUM_80_KB}}, 400,
         "structured_output_too_large"),
    ]


@pytest.fixture(scope="module")
def written_since() -> Iterator[float]:
    started = time.time()
    yield started


def send(stack: Stack, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**stack.auth, "content-type": "application/json"}
    return httpx.post(f"{stack.base_url}{path}", content=content, headers=headers, timeout=60)


CHAT_CORPUS = corpus()
COMPLETIONS_CORPUS = completions_corpus()


@pytest.mark.parametrize(("name", "body", "status", "code"), CHAT_CORPUS, ids=[case[0] for case in CHAT_CORPUS])
def test_bad_chat_request(stack: Stack, written_since: float, name: str, body: Any, status: int, code: str) -> None:
    check(send(stack, "/v1/chat/completions", body), status, code)


@pytest.mark.parametrize(("name", "body", "status", "code"), COMPLETIONS_CORPUS,
                         ids=[case[0] for case in COMPLETIONS_CORPUS])
def test_bad_completion_request(stack: Stack, written_since: float, name: str, body: Any, status: int,
                                code: str) -> None:
    check(send(stack, "/v1/completions", body), status, code)


def check(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"] and CANARY not in error["message"]  # errors never echo content
    assert response.headers["cache-control"] == "no-store"


def test_huge_bodies_with_and_without_a_declared_length(stack: Stack) -> None:
    big = json.dumps(chat(image("data:image/png;base64," + "A" * 9_000_000))).encode()
    check(send(stack, "/v1/chat/completions", big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]

    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=chunks(), headers=stack.auth, timeout=60)
    check(response, 413, "request_too_large")


def test_the_leak_scan_finds_a_planted_file(tmp_path: Path, written_since: float) -> None:
    planted = tmp_path / "spool.bin"
    planted.write_bytes(b"header" + CANARY.encode())
    try:
        assert planted in [path for path in files_written_since(written_since) if CANARY.encode() in read(path)]
    finally:
        planted.unlink()


def test_after_the_corpus_the_gateway_is_healthy_and_nothing_was_written(
    client: openai.OpenAI, stack: Stack, written_since: float
) -> None:
    assert httpx.get(f"{stack.base_url}/healthz").json() == {"status": "ok"}
    answer = client.chat.completions.create(
        model=stack.model, max_tokens=4,
        messages=[{"role": "user", "content": [{"type": "text", "text": CANARY}, image_part("PNG")]}],
    )
    assert answer.choices[0].message.content is not None
    assert stack.process.poll() is None
    leaks = [path for path in files_written_since(written_since) if CANARY.encode() in read(path)]
    assert leaks == []


def test_privacy_posture_for_auditors(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/v1/airlock/privacy").status_code == 401
    posture = httpx.get(f"{stack.base_url}/v1/airlock/privacy", headers=stack.auth).json()
    assert posture["cache_isolation"]["tenant"] == "user"
    assert posture["cache_isolation"]["multimodal_processor_cache_gb"] == 0
    assert posture["limits"]["max_image_bytes"] == 1_000_000
    assert posture["telemetry"]["engine_environment"]["VLLM_NO_USAGE_STATS"] == "1"
    assert posture["egress"]["engine_transport"] == ["unix"]
    assert posture["authentication"] == {"methods": ["basic", "api_key", "oidc"], "required": True}
    assert "alice" not in json.dumps(posture)
