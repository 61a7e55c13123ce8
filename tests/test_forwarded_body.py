"""What a screened image request costs the gateway less to forward, unchanged: the body sent to the engine is
byte for byte ``json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()`` (server/forwarded_body.py),
and pybase64 decodes what ``binascii.a2b_base64(strict_mode=True)`` did but surplus padding (server/images.py).
No engine: these compare the fast paths with the plain ones on generated input (hypothesis, reproducible, no
database written)."""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import sys
from typing import Any

import pybase64
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.auth import Principal
from server.config import PrivacySettings, ScreeningSettings
from server.errors import InvalidRequest
from server.forwarded_body import ForwardedBody
from server.images import IMAGE, decode_base64
from server.screening import Screening
from server.tenancy import TenantSalts

from .conftest import ROOT
from .images import image_bytes

FAST = settings(max_examples=400, derandomize=True, database=None, deadline=None)


def plain(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def strict(data: bytes) -> bytes | None:
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        return None


def fast(data: bytes) -> bytes | None:
    try:
        return pybase64.b64decode(data, validate=True)
    except binascii.Error:
        return None


# Base64's alphabet, '=' and what it is mistaken for: almost-valid input, where a difference would show.
NEAR_BASE64 = st.binary(max_size=24).map(base64.b64encode) | st.text("AQgw+/=-_ \n\r\x00é", max_size=16).map(
    lambda text: text.encode("utf-8"))


@FAST
@given(NEAR_BASE64, NEAR_BASE64)
def test_pybase64_decodes_what_strict_binascii_does_but_surplus_padding(head: bytes, tail: bytes) -> None:
    """The one difference: binascii's strict mode takes '=' after a complete group of four ("QUJD="), which
    pybase64, and so vLLM (vllm/multimodal/media/image.py decodes with it), refuses."""
    data = head + tail  # valid base64 followed by more of it, padding in the middle, stray characters
    if fast(data) != strict(data):
        assert fast(data) is None and data.endswith(b"=") and len(data.rstrip(b"=")) % 4 == 0, data


def test_surplus_padding_is_refused_as_vllm_refuses_it() -> None:
    assert strict(b"QUJD=") == b"ABC" and fast(b"QUJD=") is None
    with pytest.raises(InvalidRequest) as caught:
        decode_base64("QUJD=", 1000, "p", IMAGE)
    assert "length or '=' padding" in caught.value.message


@pytest.mark.parametrize(("data", "why"), [
    ("QUJD-A==", "URL-safe"), ("QUJD A==", "characters other than"), ("QUJDRA=", "length or '=' padding"),
    ("QQ==QQ==", "length or '=' padding"),
])
def test_base64_refusals_still_say_why(data: str, why: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_base64(data, 1000, "p", IMAGE)
    assert why in caught.value.message and caught.value.code == "invalid_image"


TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # quotes, backslashes, control characters, emoji
HEADER = st.builds(lambda mime, extra: f"data:{mime}{extra};base64",
                   st.sampled_from(["image/png", "image/jpeg", "IMAGE/PNG"]),
                   st.text(alphabet=st.characters(codec="utf-8", exclude_characters=","), max_size=12))
URL = st.builds(lambda header, data: f"{header},{base64.b64encode(data).decode()}", HEADER, st.binary(max_size=30))
PART = st.one_of(st.builds(lambda text: {"type": "text", "text": text}, TEXT),
                 st.builds(lambda url, detail: {"type": "image_url", "image_url": {"url": url, **detail}}, URL,
                           st.sampled_from([{}, {"detail": "high"}])))


@FAST
@given(st.lists(st.lists(PART, max_size=4), min_size=1, max_size=3), TEXT)
def test_a_body_with_images_is_byte_for_byte_what_json_dumps_writes(contents: list[list[Any]], prompt: str) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": content} for content in contents],
               "max_tokens": 3, "temperature": 0.5, "stream": True, "cache_salt": prompt}
    images = [(part["image_url"], part["image_url"]["url"].partition(",")[2].encode("ascii"))
              for content in contents for part in content if part["type"] == "image_url"]
    before = plain(payload)
    assert ForwardedBody().encode(payload, images) == before
    assert plain(payload) == before  # payload left as it was


def test_an_image_object_listed_twice_or_a_placeholder_in_text_still_gives_the_plain_body() -> None:
    url = "data:image/png;base64,QUJD"
    shared = {"url": url}
    payload = {"messages": [{"content": [{"image_url": shared}, {"image_url": shared}]}]}
    assert ForwardedBody().encode(payload, [(shared, b"QUJD"), (shared, b"QUJD")]) == plain(payload)
    body = ForwardedBody()
    mark = f"airlock-image-{body._token}-0"  # a leaked token (it never leaves the process)
    image = {"url": url}
    payload = {"messages": [{"content": [{"text": mark}, {"image_url": image}]}]}
    assert body.encode(payload, [(image, memoryview(b"QUJD"))]) == plain(payload)


def test_base64_that_is_not_the_urls_own_is_never_written() -> None:
    image = {"url": "data:image/png;base64,QUJD"}
    payload = {"messages": [{"content": [{"image_url": image}]}]}
    assert ForwardedBody().encode(payload, [(image, b"QUJDREVG")]) == plain(payload)


def test_screening_forwards_what_json_dumps_would_write() -> None:
    screening = Screening(ScreeningSettings(), TenantSalts(PrivacySettings()))
    png = base64.b64encode(image_bytes("PNG", (64, 48))).decode()
    wrapped = base64.encodebytes(image_bytes("PNG", (64, 48))).decode().replace("\n", "\r\n")
    payload = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "system", "content": 'Prüfe "Rechnung" \\ \n'},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;BASE64,{png}"}},
                                     {"type": "text", "text": "und 😀"},
                                     {"type": "image_url", "image_url": f"data:image/png;base64,{png}"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{wrapped}"}},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;n=ü;base64,{png}"}}]}]}
    screened = screening.screen("chat", payload, Principal("someone", source="api_key"))
    assert screened.body == plain(payload) and screened.image_sizes == ((64, 48),) * 4
    forwarded = json.loads(screened.body)
    assert [part.get("image_url") for part in forwarded["messages"][1]["content"]] == [
        {"url": f"data:image/png;base64,{png}"}, None, {"url": f"data:image/png;base64,{png}"},
        {"url": f"data:image/png;base64,{png}"}, {"url": f"data:image/png;n=ü;base64,{png}"}]


def test_pillow_has_its_format_plugins_once_screening_is_built() -> None:
    """Loaded as the gateway is built, not by the first image request after a start (76 ms of its CPU, measured)."""
    probe = ("import sys; from PIL import Image; from server.config import PrivacySettings, ScreeningSettings;"
             "from server.screening import Screening; from server.tenancy import TenantSalts;"
             "before = set(Image.ID); Screening(ScreeningSettings(), TenantSalts(PrivacySettings()));"
             "print(sorted(before), sorted({'BMP', 'GIF', 'JPEG', 'PNG', 'TIFF', 'WEBP'} - set(Image.ID)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "[]"], done.stdout  # none before, none missing after
