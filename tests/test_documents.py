"""Documents (PDF, multi-page TIFF) as OpenAI ``file`` parts: parsing, validation and the page budget on their own;
then through the real gateway, render workers and engine with the real ``openai`` SDK, and the console's preview."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from server.config import ConfigError, DocumentSettings, EngineSettings, ScreeningSettings
from server.documents import Documents, document_kind, document_name, has_file_parts, parse_pages, split_file_data
from server.engine_limits import EngineLimits
from server.errors import DocumentTooLarge, InvalidRequest
from server.images import ImageLimits, check_image_url
from server.metrics import DOCUMENT_OUTCOMES, GatewayMetrics
from server.page_budget import PageBudget, label
from server.render_pool import RenderPool

from .conftest import LONG_CONTEXT, ROOT, Stack
from .document_files import data_url, encrypted_pdf, file_part, inflating_pdf, pdf_bytes, tiff_bytes
from .images import image_bytes, image_part

MODEL = "airlock-demo-qwen3-vl"
# One page more than the stack takes: documents.max_pages and the images a request may carry are both 16 there.
ABOVE_PAGE_LIMIT = DocumentSettings().max_pages + 1
DEMO = EngineLimits(1024 * 1024, 32 * 32, None, 16)  # the demo profile's budget (configs/models/airlock-demo.yaml)
A4_POINTS = (595.2756, 841.8898)
CANARY = "CANARY-5d1e0b-documents"


# --- parsing and validation, no engine ---------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "pages"), [
    ("1-3,7", (1, 2, 3, 7)), (" 2 , 5 - 6 ", (2, 5, 6)), ("4", (4,)), ([3, 1, 2], (3, 1, 2)), ("9-9", (9,)),
])
def test_page_selections_are_read_in_the_order_given(value: object, pages: tuple[int, ...]) -> None:
    assert parse_pages(value, "p", 16) == pages


@pytest.mark.parametrize(("value", "why"), [
    ("", "cannot be read"), ("1-", "cannot be read"), ("a", "cannot be read"), ("1;2", "cannot be read"),
    ("3-1", "runs backwards"), ("0", "below 1"), ([0, 1], "below 1"), ([], "is empty"), ([1, True], "string or"),
    ([1.5], "string or"), (7, "string or"), ("1-3,2", "twice"), ([2, 2], "twice"),
])
def test_malformed_page_selections_are_refused(value: object, why: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_pages(value, "messages[0].content[1].file.pages", 16)
    assert refused.value.code == "invalid_pages"
    assert why in refused.value.message
    assert refused.value.param == "messages[0].content[1].file.pages"


def test_a_huge_range_is_refused_before_it_is_expanded() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_pages("1-999999999999", "p", 16)
    assert refused.value.code == "too_many_pages"
    assert "999999999999 pages were chosen, more than the 16" in refused.value.message


@pytest.mark.parametrize(("filename", "shown"), [
    ("contract.pdf", "contract.pdf"), ("Überweisung März.pdf", "Überweisung März.pdf"), ("x" * 100, "x" * 100),
    ("x" * 101, "document 2"), ("a\nb.pdf", "document 2"), ("a\u202eb.pdf", "document 2"), ("  ", "document 2"),
    (None, "document 2"), (42, "document 2"),
])
def test_file_names_are_printable_and_short_or_replaced(filename: object, shown: str) -> None:
    assert document_name(filename, 2) == shown


def test_pdf_header_is_found_where_pdfium_looks_for_it() -> None:
    pdf = pdf_bytes()
    assert document_kind(pdf, "application/pdf", "p") == "pdf"
    assert document_kind(b"\0" * 1000 + pdf, None, "p") == "pdf"  # junk before the header: PDF readers allow 1024
    with pytest.raises(InvalidRequest, match="neither a PDF nor a TIFF") as refused:
        document_kind(b"\0" * 1030 + pdf, None, "p")
    assert refused.value.code == "unsupported_document"


def test_tiff_is_known_by_either_byte_order() -> None:
    tiff = tiff_bytes(2)
    assert tiff[:4] in (b"II*\0", b"MM\0*")
    assert document_kind(tiff, "image/tiff", "p") == "tiff"
    assert document_kind(b"MM\0*" + tiff[4:], "application/octet-stream", "p") == "tiff"


@pytest.mark.parametrize(("raw", "declared", "says"), [
    (image_bytes("PNG"), None, "the document is a PNG image: file parts carry PDF or TIFF documents; send images "
                               "as image_url parts"),
    (image_bytes("JPEG"), "application/pdf", "the document is a JPEG image"),
    (pdf_bytes(), "image/png", "send images as image_url parts"),
    (pdf_bytes(), "text/plain", "the data: URL must declare application/pdf or image/tiff"),
    (pdf_bytes(), "image/tiff", "the document is a PDF, but its data: URL declares image/tiff"),
    (tiff_bytes(1), "application/pdf", "the document is a TIFF, but its data: URL declares application/pdf"),
    (b"PK\x03\x04 a zip", None, "neither a PDF nor a TIFF"),
])
def test_documents_of_another_kind_are_refused_clearly(raw: bytes, declared: str | None, says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        document_kind(raw, declared, "p")
    assert refused.value.code == "unsupported_document"
    assert says in refused.value.message


def test_file_data_is_a_data_url_or_bare_base64() -> None:
    assert split_file_data("data:application/pdf;base64,QUJD", "p") == ("QUJD", "application/pdf")
    assert split_file_data("DATA:Application/PDF;name=x.pdf;BASE64,QU\r\nJD", "p") == ("QUJD", "application/pdf")
    assert split_file_data("QUJD", "p") == ("QUJD", None)
    for bad, code in (("data:application/pdf,%25PDF", "invalid_document"), ("", "invalid_file"),
                      (None, "invalid_file"), (["QUJD"], "invalid_file")):
        with pytest.raises(InvalidRequest) as refused:
            split_file_data(bad, "p")
        assert refused.value.code == code


def test_file_parts_are_found_without_decoding_anything() -> None:
    assert has_file_parts({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                     {"type": "file", "file": {}}]}]})
    assert not has_file_parts({"messages": [{"role": "user", "content": "file"}]})
    assert not has_file_parts({"messages": "x"})
    assert not has_file_parts({"prompt": "x"})


def documents(settings: DocumentSettings | None = None, screening: ScreeningSettings | None = None,
              context: int | None = LONG_CONTEXT) -> Documents:
    """The documents step with a real pool that is never started: these requests are refused before rendering."""
    settings = settings or DocumentSettings()
    return Documents(settings, screening or ScreeningSettings(), DEMO, RenderPool(settings), lambda _: context,
                     GatewayMetrics(60), 1024)


def expand(step: Documents, *parts: Any, **fields: Any) -> dict[str, Any]:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, *parts]}],
               **fields}
    asyncio.run(step.expand(payload))
    return payload


@pytest.mark.parametrize(("part", "status", "code", "says"), [
    (file_part(pdf_bytes(), file_id="file-abc"), 400, "file_id_not_supported",
     "file_id is not supported: Airlock keeps no uploaded files; send the document itself in file.file_data"),
    ({"type": "file", "file": {"file_id": "file-abc"}}, 400, "file_id_not_supported", "keeps no uploaded files"),
    ({"type": "file"}, 400, "invalid_file", "file must be an object"),
    ({"type": "file", "file": {"filename": "a.pdf"}}, 400, "invalid_file", "file_data is missing"),
    ({"type": "file", "file": {"file_data": "QUJD"}, "uuid": "x"}, 400, "field_not_allowed", "'uuid'"),
    (file_part(pdf_bytes(), detail="high"), 400, "field_not_allowed", "'detail'"),
    (file_part(pdf_bytes(), text_layer="yes"), 400, "invalid_file", "text_layer must be true or false"),
    ({"type": "file", "file": {"file_data": "QUJD", "filename": 7}}, 400, "invalid_file", "filename must be a string"),
    (file_part(pdf_bytes(), pages="2-1"), 400, "invalid_pages", "runs backwards"),
    (file_part("data:application/pdf;base64,JVBERi0x!!"), 400, "invalid_document",
     "the document is not valid base64: it holds characters other than A-Z"),
    (file_part("JVBERi0xLjQK-_"), 400, "invalid_document", "looks URL-safe"),
    (file_part(data_url(image_bytes("PNG"), "image/png")), 400, "unsupported_document", "image_url parts"),
    (file_part("A" * 6_000_000), 413, "document_too_large", "document too large: 4.5 MB, limit 4.0 MB"),
])
def test_file_parts_are_checked_before_anything_renders(part: dict[str, Any], status: int, code: str,
                                                        says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        expand(documents(DocumentSettings(max_bytes=4_000_000)), part)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert says in refused.value.message
    assert refused.value.param is not None and refused.value.param.startswith("messages[0].content[1]")
    assert status != 413 or isinstance(refused.value, DocumentTooLarge)


def test_turned_off_documents_are_refused_with_a_way_out() -> None:
    with pytest.raises(InvalidRequest) as refused:
        expand(documents(DocumentSettings(enabled=False)), file_part(pdf_bytes()))
    assert refused.value.code == "documents_disabled"
    assert "turned off on this server (documents.enabled); send each page as an image" in refused.value.message
    with pytest.raises(InvalidRequest, match="turned off"):
        asyncio.run(documents(DocumentSettings(enabled=False)).preview(b'{"file_data": "QUJD"}'))


def test_a_page_format_screening_would_refuse_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"documents\.page_format png is not among screening\.image_formats"):
        documents(DocumentSettings(page_format="png"), ScreeningSettings(image_formats=["jpeg"]))
    documents(DocumentSettings(page_format="png", enabled=False), ScreeningSettings(image_formats=["jpeg"]))


def test_pages_beyond_what_the_request_may_send_are_refused_before_rendering() -> None:
    step = documents(DocumentSettings(max_pages=6))
    with pytest.raises(InvalidRequest) as refused:  # 16 images a request (the demo's), 11 taken by images
        expand(step, *[image_part("PNG")] * 11, file_part(pdf_bytes(), pages="1-6"))
    assert refused.value.code == "too_many_pages"
    assert refused.value.message.startswith("6 pages were chosen, but this request may send 5 more pages "
                                            "(documents.max_pages is 6, and pages count as images: at most 16 a "
                                            "request, 11 of them taken by images)")
    with pytest.raises(InvalidRequest, match="7 pages were chosen, more than the 6"):
        expand(step, file_part(pdf_bytes(), pages="1-7"))
    with pytest.raises(InvalidRequest, match="2 pages were chosen, but this request may send 1 more page "):
        # two places left, and the later document keeps one for itself
        expand(step, *[image_part("PNG")] * 14, file_part(pdf_bytes(), pages=[1, 2]), file_part(pdf_bytes()))


def test_a_document_that_cannot_fit_the_context_is_refused_before_rendering() -> None:
    with pytest.raises(InvalidRequest) as refused:
        expand(documents(context=4096), file_part(pdf_bytes(), pages="1-3"), max_tokens=4000)
    assert refused.value.code == "document_too_long"
    assert refused.value.message.startswith("the 3 chosen pages do not fit the model's context beside the rest of "
                                            "the request and the room kept for the answer: one page of it fits")


@pytest.mark.parametrize("engine", [DEMO, EngineLimits(16384 * 1024, 64 * 1024, None),
                                    EngineLimits.from_settings(EngineSettings())])
@pytest.mark.parametrize("room", [300, 2_000, 9_000, 40_000])
def test_pages_at_their_share_of_the_budget_fit_the_room(engine: EngineLimits, room: int) -> None:
    """The rule of server/page_budget.py, as the renderer applies it: n <= N pages share total_pixels (each clamped
    to the per-page limits, aspect kept) and, once resized by the engine's processor, take at most ``room``."""
    name = "invoice.pdf"
    for n_max in (1, 3, 8):
        budget = PageBudget(engine, 1024, max_pages=16, image_limit=8, other_images=0, max_image_pixels=25_000_000,
                            room=room)
        if budget.least_tokens(name, n_max) > room:
            with pytest.raises(InvalidRequest, match=r"do(es)? not fit"):
                budget.limits(name, n_max, [], "p")
            continue
        limits = budget.limits(name, n_max, [], "p")
        assert limits.total_pixels is not None and limits.max_pages == n_max
        for n in range(1, n_max + 1):
            for aspect in (1.0, math.sqrt(2), 1.65, 2.0, 1 / math.sqrt(2)):
                per_page = min(max(limits.total_pixels // n, limits.min_pixels_per_page), limits.max_pixels_per_page)
                width = max(1, math.floor(math.sqrt(per_page / aspect)))
                height = max(1, math.floor(width * aspect))
                spent = PageBudget(engine, 1024, max_pages=16, image_limit=8, other_images=0,
                                   max_image_pixels=25_000_000, room=room)
                labels = sum(len(label(name, number, n)) for number in range(1, n + 1))
                spent.spend(name, [(width, height)] * n, labels, 0, "p")  # raises if they overflow
                assert spent.room is not None and spent.room >= 0


def test_text_layers_that_overflow_the_room_are_refused_once_known() -> None:
    budget = PageBudget(DEMO, 1024, max_pages=16, image_limit=8, other_images=0, max_image_pixels=25_000_000,
                        room=3000)
    with pytest.raises(InvalidRequest) as refused:
        budget.spend("a.pdf", [(860, 1218)], 30, 20_000, "p")
    assert refused.value.code == "document_too_long"
    assert 'text layers of the document\'s pages (about 6,667 tokens)' in refused.value.message
    assert '"text_layer": false' in refused.value.message


def test_file_parts_are_replaced_in_place_by_their_pages() -> None:
    """With real render workers, no engine: each file part becomes, where it stood, label, image and text layer of
    each chosen page in the order chosen; the other parts stay as they were."""
    settings = DocumentSettings()

    async def expanded() -> tuple[dict[str, Any], int]:
        pool = RenderPool(settings)
        step = Documents(settings, ScreeningSettings(), DEMO, pool, lambda _: LONG_CONTEXT, GatewayMetrics(60), 1024)
        first, photo, last = {"type": "text", "text": "Compare"}, image_part("PNG"), {"type": "text", "text": "?"}
        parts = [first, file_part(pdf_bytes(3, text="Quarterly"), "q.pdf", pages=[3, 1]), photo,
                 file_part(data_url(tiff_bytes(2, (640, 480)), "image/tiff"), None, text_layer=True), last]
        payload = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": parts}]}
        try:
            added = await step.expand(payload)
        finally:
            await pool.close()
        content = payload["messages"][1]["content"]
        assert content[0] is first and content[7] is photo and content[-1] is last
        return payload, added

    payload, added = asyncio.run(expanded())
    content = payload["messages"][1]["content"]
    kinds = [(part["type"], part.get("text", "")[:40]) for part in content]
    assert kinds == [
        ("text", "Compare"),
        ("text", "[Document 'q.pdf', page 3 of 3]"), ("image_url", ""), ("text", "Quarterly (page 3)"),
        ("text", "[Document 'q.pdf', page 1 of 3]"), ("image_url", ""), ("text", "Quarterly (page 1)"),
        ("image_url", ""),
        ("text", "[Document 'document 2', page 1 of 2]"), ("image_url", ""),  # a scan has no text layer
        ("text", "[Document 'document 2', page 2 of 2]"), ("image_url", ""),
        ("text", "?"),
    ]
    pages = [part["image_url"]["url"] for part in content[1:7] + content[8:12] if part["type"] == "image_url"]
    for url in pages:
        assert url.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as page:
            assert page.format == "JPEG" and page.width * page.height <= DEMO.max_pixels
    # What the request grew by: request_path adds it to the body's size to choose screening in a thread.
    new_parts = content[1:7] + content[8:12]
    assert added == sum(len(part["image_url"]["url"]) if part["type"] == "image_url" else len(part["text"])
                        for part in new_parts)


def test_multi_page_tiff_image_parts_are_refused_and_single_page_ones_are_not() -> None:
    limits = ImageLimits(frozenset({"tiff", "png"}), 10_000_000, 25_000_000, 200.0)
    url = data_url(tiff_bytes(3, (64, 64)), "image/tiff")
    with pytest.raises(InvalidRequest) as refused:
        check_image_url(url, limits, "messages[0].content[0]")
    assert refused.value.code == "multi_page_image"
    assert "multi-page TIFF" in refused.value.message and '{"type": "file"' in refused.value.message
    assert check_image_url(data_url(tiff_bytes(1, (64, 48)), "image/tiff"), limits, "p")[0] == (64, 48)


# --- through the real gateway, render workers and engine -----------------------------------------------------------

def filled(points: tuple[float, float], pixels: int) -> tuple[int, int]:
    """A page of ``points`` scaled, aspect kept, to fill ``pixels`` (what the renderer is asked for)."""
    scale = math.sqrt(pixels / (points[0] * points[1]))
    return math.floor(points[0] * scale), math.floor(points[1] * scale)


def tokens_of_size(size: tuple[int, int]) -> int:
    """The engine's tokens for an image of ``size``, checked to be the same a pixel either way (the renderer's own
    rounding may differ from ``filled``'s by one)."""
    width, height = size
    counts = {DEMO.resized_pixels(width + dx, height + dy, 1024) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert len(counts) == 1, "choose a page size away from the processor's rounding edges"
    return counts.pop() // 1024


def prompt_tokens(client: openai.OpenAI, *parts: Any, **fields: Any) -> int:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "What is the total?"}, *parts]}],
        **{"max_tokens": 1, **fields},
    )
    assert answer.usage is not None
    return answer.usage.prompt_tokens


def pages_as_images(name: str, numbers: list[int], count: int, size: tuple[int, int]) -> list[dict[str, Any]]:
    """What a document's pages become (without text layers), sent by hand: the label and an image of the size."""
    parts: list[dict[str, Any]] = []
    for number in numbers:
        parts += [{"type": "text", "text": label(name, number, count)}, image_part("PNG", size)]
    return parts


@pytest.mark.engine
def test_a_one_page_pdf_arrives_as_one_image_of_the_engines_budget(client: openai.OpenAI) -> None:
    size = filled(A4_POINTS, DEMO.max_pixels)  # one page: the whole per-page budget, the context has room
    tokens_of_size(size)
    sent = prompt_tokens(client, file_part(pdf_bytes(), "invoice.pdf", text_layer=False))
    assert sent == prompt_tokens(client, *pages_as_images("invoice.pdf", [1], 1, size))
    answer = client.chat.completions.create(
        model=MODEL, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the total due?"},
                                               file_part(pdf_bytes(), "invoice.pdf")]}],
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > sent  # the page's text layer came along


@pytest.mark.engine
def test_chosen_pages_cost_only_those_pages(client: openai.OpenAI) -> None:
    size = filled(A4_POINTS, DEMO.max_pixels)
    sent = prompt_tokens(client, file_part(pdf_bytes(3), "report.pdf", pages="2-3", text_layer=False))
    assert sent == prompt_tokens(client, *pages_as_images("report.pdf", [2, 3], 3, size))


@pytest.mark.engine
def test_a_multi_page_tiff_sends_every_page(client: openai.OpenAI) -> None:
    tiff = tiff_bytes(3)  # 1024 x 1024 at 300 dpi: exactly the demo's per-page budget
    sent = prompt_tokens(client, file_part(data_url(tiff, "image/tiff"), "scan.tiff"))
    assert sent == prompt_tokens(client, *pages_as_images("scan.tiff", [1, 2, 3], 3, (1024, 1024)))


@pytest.mark.engine
def test_pages_shrink_to_fit_what_the_context_leaves(client: openai.OpenAI, stack: Stack) -> None:
    """An answer of max_tokens leaves about 1,200 tokens: three full pages (about 3,000) would make the engine
    refuse; budgeted, they fit. With room for less than a page at the smallest size, nothing is rendered."""
    max_tokens = LONG_CONTEXT - 1200
    sent = prompt_tokens(client, file_part(pdf_bytes(3), "invoice.pdf", pages="1-3", text_layer=False),
                         max_tokens=max_tokens)
    full = 3 * tokens_of_size(filled(A4_POINTS, DEMO.max_pixels))
    assert sent + max_tokens <= LONG_CONTEXT and sent < full
    assert sent >= 0.8 * (LONG_CONTEXT - max_tokens)  # and they use most of the room, not a timid share of it
    rendered_before = documents_rendered(stack)
    with pytest.raises(openai.BadRequestError) as refused:
        prompt_tokens(client, file_part(pdf_bytes(3), "invoice.pdf", pages="1-3"), max_tokens=LONG_CONTEXT - 60)
    assert refused.value.code == "document_too_long"
    assert "no page of it fits" in refused.value.message
    assert documents_rendered(stack) == rendered_before


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition."""
    (value,) = [found.value for family in text_string_to_metric_families(metrics) for found in family.samples
                if found.name == name and found.labels == labels]
    return float(value)


def documents_rendered(stack: Stack) -> float:
    """Documents sent to the render workers for requests, whatever came of them."""
    metrics = httpx.get(f"{stack.base_url}/metrics", headers=stack.auth, timeout=30).text
    return sum(sample(metrics, "airlock_documents_total", purpose="request", outcome=outcome)
               for outcome in DOCUMENT_OUTCOMES)


def chat(*parts: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Read this."}, *parts]}]}


@pytest.fixture(scope="module")
def inflating() -> bytes:
    return inflating_pdf()


REFUSALS: dict[str, tuple[Any, int, str]] = {
    "file_id": (lambda: {"type": "file", "file": {"file_id": "file-abc123"}}, 400, "file_id_not_supported"),
    "bad base64": (lambda: file_part("data:application/pdf;base64,%PDF-1.4 not base64"), 400, "invalid_document"),
    "png as a file": (lambda: file_part(data_url(image_bytes("PNG"), "image/png"), "x.png"), 400,
                      "unsupported_document"),
    "wrong media type": (lambda: file_part(data_url(pdf_bytes(), "image/tiff")), 400, "unsupported_document"),
    "above max_bytes": (lambda: file_part(b"%PDF-1.4\n" + b"0" * 4_100_000), 413, "document_too_large"),
    "above the page limit": (lambda: file_part(pdf_bytes(ABOVE_PAGE_LIMIT)), 400, "too_many_pages"),
    "a page it does not have": (lambda: file_part(pdf_bytes(2), pages="2-3"), 400, "invalid_pages"),
    "encrypted": (lambda: file_part(encrypted_pdf()), 400, "document_encrypted"),
    "truncated": (lambda: file_part(pdf_bytes()[:700]), 400, "invalid_document"),
    "exhausts a worker's memory": (None, 422, "document_unprocessable"),
}


@pytest.mark.engine
@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_documents_are_refused_and_the_gateway_keeps_serving(stack: Stack, inflating: bytes, case: str) -> None:
    make, status, code = REFUSALS[case]
    part = file_part(inflating) if make is None else make()
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(part), headers=stack.auth, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert error["param"].startswith("messages[0].content[1]")
    assert httpx.get(f"{stack.base_url}/healthz", timeout=10).status_code == 200
    after = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(image_part("PNG")), headers=stack.auth,
                       timeout=120)
    assert after.status_code == 200, after.text


@pytest.mark.engine
@pytest.mark.engine
def test_text_the_estimate_undercounts_is_refused_in_the_documents_terms(client: openai.OpenAI) -> None:
    """The page budget counts text at UTF-8 bytes / 3; a text layer of digits, which Qwen's tokenizer splits one by
    one, takes about three times that. The engine refuses the prompt as longer than its context, and the client is
    told so as a document refusal with a way out, not as the engine's bare message."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    for page in range(2):  # two pages of 20,000 digits (the text layer's default cap a page): 40,000 tokens
        pdf.setFont("Courier", 3.5)
        for row in range(200):
            pdf.drawString(10, 830 - row * 4, "".join(str((page + row * 97 + column) % 10) for column in range(100)))
        pdf.showPage()
    pdf.save()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is the total?"}, file_part(buffer.getvalue())]}], max_tokens=16)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "document_too_long", error
    assert "maximum context length" in error["message"] and "text_layer" in error["message"]


def test_the_messages_say_what_to_do(stack: Stack) -> None:
    def refusal(part: dict[str, Any]) -> str:
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(part), headers=stack.auth,
                              timeout=60)
        return str(response.json()["error"]["message"])

    assert "choose pages" in refusal(file_part(pdf_bytes(ABOVE_PAGE_LIMIT)))
    assert "the document has 2 pages" in refusal(file_part(pdf_bytes(2), pages=[3]))
    assert "password-protected" in refusal(file_part(encrypted_pdf()))


def preview(stack: Stack, data: bytes, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", stack.auth)
    return httpx.post(f"{stack.base_url}/v1/airlock/documents/preview",
                      json={"file_data": data_url(data)}, timeout=60, **kwargs)


@pytest.mark.engine
def test_the_preview_shows_thumbnails_of_the_pages(stack: Stack) -> None:
    response = preview(stack, pdf_bytes(3))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert (body["page_count"], body["truncated"]) == (3, False)
    assert [page["number"] for page in body["pages"]] == [1, 2, 3]
    thumbnail_pixels = DocumentSettings().thumbnail_pixels
    for page in body["pages"]:
        assert page["thumbnail"].startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(page["thumbnail"].split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and image.size == (page["width"], page["height"])
            assert 0.9 * thumbnail_pixels <= image.width * image.height <= thumbnail_pixels
    longer = preview(stack, pdf_bytes(DocumentSettings().max_pages + 2, image=False)).json()
    assert longer["page_count"] == DocumentSettings().max_pages + 2 and longer["truncated"] is True
    assert len(longer["pages"]) == DocumentSettings().max_pages


@pytest.mark.engine
def test_the_preview_is_for_signed_in_users_only(stack: Stack, credentials: Any) -> None:
    assert preview(stack, pdf_bytes(), headers={}).status_code == 401
    with httpx.Client(base_url=stack.base_url, timeout=60) as browser:
        signed_in = browser.post("/console/api/sign-in", json={"username": "alice",
                                                               "password": credentials.passwords["alice"]})
        assert signed_in.status_code == 200, signed_in.text
        body = {"file_data": data_url(pdf_bytes())}
        assert browser.post("/v1/airlock/documents/preview", json=body).status_code == 401  # no CSRF token
        ok = browser.post("/v1/airlock/documents/preview", json=body,
                          headers={"x-airlock-csrf": signed_in.json()["csrf"]})
        assert ok.status_code == 200 and ok.json()["page_count"] == 1
    refused = httpx.post(f"{stack.base_url}/v1/airlock/documents/preview", json={"file_data": "QUJD", "x": 1},
                         headers=stack.auth, timeout=30)
    assert refused.status_code == 400
    assert preview(stack, encrypted_pdf()).json()["error"]["code"] == "document_encrypted"


@pytest.mark.engine
def test_the_console_is_told_the_document_limits(stack: Stack) -> None:
    limits = httpx.get(f"{stack.base_url}/console/api/session", timeout=30).json()["limits"]
    settings = DocumentSettings()
    assert limits["documents"] == {"enabled": True, "max_pages": min(settings.max_pages, limits["max_images"]),
                                   "max_bytes": 4_000_000}


@pytest.fixture
def log_mark(stack: Stack) -> Iterator[int]:
    yield stack.log_path.stat().st_size


@pytest.mark.engine
def test_nothing_of_a_document_reaches_the_log_or_the_metrics(stack: Stack, client: openai.OpenAI,
                                                             inflating: bytes, log_mark: int) -> None:
    secret_pdf = pdf_bytes(2, text=f"Salary of {CANARY}")
    name = f"{CANARY}.pdf"
    answer = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Summarise."}, file_part(secret_pdf, name)]}])
    assert answer.choices[0].message.content is not None
    for part in (file_part(secret_pdf, name, pages="5"), file_part(inflating, name),
                 file_part(encrypted_pdf(), name)):
        httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(part), headers=stack.auth, timeout=120)
    preview(stack, secret_pdf)
    metrics = httpx.get(f"{stack.base_url}/metrics", headers=stack.auth, timeout=30).text
    assert CANARY not in metrics
    for outcome in ("rendered", "unprocessable", "refused"):
        assert sample(metrics, "airlock_documents_total", purpose="request", outcome=outcome) >= 1
    assert sample(metrics, "airlock_document_pages_total", purpose="preview") >= 2
    assert sample(metrics, "airlock_document_render_seconds_count", purpose="request") >= 4
    with stack.log_path.open("rb") as log:
        log.seek(log_mark)
        written = log.read()
    assert CANARY.encode() not in written
    assert b"salary" not in written.lower()


def readme_document_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    (example,) = [block for block in blocks if '"type": "file"' in block]
    return example


@pytest.mark.engine
def test_readme_document_example_runs_as_typed(stack: Stack, tmp_path: Path) -> None:
    example = readme_document_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in example
    (tmp_path / "contract.pdf").write_bytes(pdf_bytes(3))
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://127.0.0.1:8000", stack.base_url))
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": stack.api_key}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
