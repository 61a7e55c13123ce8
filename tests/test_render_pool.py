"""The isolated document renderer (server/render_pool.py, server/render_worker.py) with real worker processes.

Every document here is made by the test: reportlab draws text and images, Pillow writes image-only ("scanned") PDFs
and multi-page TIFFs, pypdf encrypts and assembles hostile objects (a Flate bomb, ten million paths, a tree of
forms that burns CPU). After each failure the same pool still renders a good document.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import signal
import struct
import tempfile
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from pypdf import PdfReader, PdfWriter
from pypdf.generic import ArrayObject, DictionaryObject, NameObject, NumberObject, StreamObject
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

from server.config import DocumentSettings
from server.errors import InvalidRequest, Overloaded, UnprocessableDocument
from server.render_pool import RenderedDocument, RenderJob, RenderPool

BUDGET = 4_194_304  # pixels: the 8B profile's max_pixels
CANARY = "AIRLOCK-CANARY-7f3e9b"


# -- documents -------------------------------------------------------------------------------------------------------

def text_pdf(pages: int = 1, size: tuple[float, float] = A4, image: bool = True) -> bytes:
    """Digital pages: a line of text naming the page (with the canary) and, on each, a photo-like image."""
    out = io.BytesIO()
    drawing = canvas.Canvas(out, pagesize=size)
    for number in range(1, pages + 1):
        drawing.drawString(36, size[1] - 72, f"Contract page {number} {CANARY}")
        if image:
            picture = Image.new("RGB", (300, 200), (200, 30, 30))
            ImageDraw.Draw(picture).text((10, 90), CANARY, fill=(255, 255, 255))
            drawing.drawImage(ImageReader(picture), 36, 100, width=300, height=200)
        drawing.showPage()
    drawing.save()
    return out.getvalue()


def scanned_pdf(pages: int = 1) -> bytes:
    """Image-only pages, as a scanner writes them: Pillow's PDF writer, one A4 page image at 150 dpi each."""
    frames = [Image.new("L", (1240, 1754), 255 - 20 * number) for number in range(pages)]
    out = io.BytesIO()
    frames[0].save(out, "PDF", resolution=150.0, save_all=True, append_images=frames[1:])
    return out.getvalue()


def tiff(sizes: list[tuple[int, int]], dpi: int = 200) -> bytes:
    """A multi-page TIFF, as a fax or a scanner writes it: bilevel G4 frames of the given pixel sizes."""
    frames = [Image.new("1", size, 1) for size in sizes]
    out = io.BytesIO()
    frames[0].save(out, "TIFF", compression="group4", dpi=(dpi, dpi), save_all=True, append_images=frames[1:])
    return out.getvalue()


def tiff_declaring(width: int, height: int) -> bytes:
    """A small TIFF whose header claims a huge frame: its ImageWidth/ImageLength tags rewritten (TIFF 6.0, IFD
    entries of 12 bytes: tag, type, count, value)."""
    out = io.BytesIO()
    Image.new("L", (16, 16)).save(out, "TIFF")
    data = bytearray(out.getvalue())
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for index in range(entries):
        at = ifd + 2 + 12 * index
        tag, _type = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):
            struct.pack_into("<HHII", data, at, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def encrypted_pdf() -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf())))
    writer.encrypt(user_password="open sesame", owner_password="owner", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _stream(data: bytes, **entries: Any) -> StreamObject:
    stream = StreamObject()
    stream.set_data(data)
    for key, value in entries.items():
        stream[NameObject("/" + key)] = value
    return stream


def _one_page(content: StreamObject, xobjects: dict[str, StreamObject] | None = None) -> bytes:
    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    resources = DictionaryObject()
    if xobjects:
        resources[NameObject("/XObject")] = DictionaryObject(
            {NameObject("/" + name): writer._add_object(obj) for name, obj in xobjects.items()})
    page[NameObject("/Resources")] = resources
    page[NameObject("/Contents")] = writer._add_object(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def flate_bomb() -> bytes:
    """A content stream of 1 MiB that inflates to 1 GiB of spaces: one 16 MiB block compressed once, ended with a
    full flush (RFC 1950/1951: the next block refers to nothing before it), repeated 64 times, then the empty
    final block and the Adler-32 of the whole."""
    block = b" " * (1 << 24)
    compressor = zlib.compressobj(9)
    piece = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(64):
        adler = zlib.adler32(block, adler)
    data = piece[:2] + piece[2:] * 64 + b"\x03\x00" + struct.pack(">I", adler)
    stream = _stream(b"")
    stream._data = data
    stream[NameObject("/Filter")] = NameObject("/FlateDecode")
    stream[NameObject("/Length")] = NumberObject(len(data))
    return _one_page(stream)


def memory_eater() -> bytes:
    """A 250 KB page of ten million tiny filled rectangles: each becomes a PDFium page object, more memory than a
    worker has."""
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(b"1 1 1 1 re f\n" * 100_000) for _ in range(100)]
    chunks.append(compressor.flush())
    stream = _stream(b"")
    stream._data = b"".join(chunks)
    stream[NameObject("/Filter")] = NameObject("/FlateDecode")
    stream[NameObject("/Length")] = NumberObject(len(stream._data))
    return _one_page(stream)


def cpu_burner() -> bytes:
    """Form XObjects five deep, each drawing the one below ten times: 100,000 full-page strokes from 3 KB (about
    25 CPU seconds here, well within the memory limit)."""
    box = ArrayObject([NumberObject(0), NumberObject(0), NumberObject(612), NumberObject(792)])
    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    below = writer._add_object(_stream(b"0 0 m 612 792 l S", Type=NameObject("/XObject"),
                                       Subtype=NameObject("/Form"), BBox=box))
    for _ in range(5):
        resources = DictionaryObject({NameObject("/XObject"): DictionaryObject({NameObject("/X"): below})})
        below = writer._add_object(_stream(b"/X Do " * 10, Type=NameObject("/XObject"), Subtype=NameObject("/Form"),
                                           BBox=box, Resources=resources))
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/XObject"): DictionaryObject({NameObject("/X"): below})})
    page[NameObject("/Contents")] = writer._add_object(_stream(b"/X Do"))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# -- helpers ---------------------------------------------------------------------------------------------------------

def job(data: bytes, kind: str = "pdf", **changes: Any) -> RenderJob:
    fields: dict[str, Any] = {"data": data, "kind": kind, "pages": None, "max_pages": 16,
                              "max_pixels_per_page": BUDGET, "min_pixels_per_page": 56 * 56, "total_pixels": None,
                              "text_layer": True}
    fields.update(changes)
    return RenderJob(**fields)


def run(scenario: Callable[[RenderPool], Awaitable[None]], **settings: Any) -> None:
    """A fresh pool (workers started as the gateway starts them), the scenario, then a good document still renders."""
    async def main() -> None:
        pool = RenderPool(DocumentSettings(**settings))
        await pool.start()
        try:
            await scenario(pool)
            await still_renders(pool)
        finally:
            await pool.close()
    asyncio.run(main())


async def still_renders(pool: RenderPool) -> RenderedDocument:
    document = await pool.render(job(text_pdf(2)))
    assert document.page_count == 2 and [page.number for page in document.pages] == [1, 2]
    magic = {"image/jpeg": b"\xff\xd8\xff", "image/png": b"\x89PNG"}
    assert all(page.image.startswith(magic[page.media_type]) for page in document.pages)
    return document


def fills(width: int, height: int, area: int) -> bool:
    """Within the area, and short of it by no more than rounding each side down costs."""
    return area - (width + height + 1) <= width * height <= area


def limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits (proc(5)): name -> (soft, hard)."""
    table = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        parts = line[26:].split()
        table[line[:26].strip()] = (parts[0], parts[1])
    return table


async def busy_worker(pool: RenderPool) -> int:
    """The pid of the worker rendering now, once it has its job (its CPU limit is set just before the render)."""
    async with asyncio.timeout(30):
        while True:
            for pid in pool.busy_pids:
                if limits(pid)["Max cpu time"][0] != "unlimited":
                    return pid
            await asyncio.sleep(0.02)


# -- documents that render ------------------------------------------------------------------------------------------

def test_one_page_fills_the_budget_with_its_text_layer() -> None:
    async def scenario(pool: RenderPool) -> None:
        document = await pool.render(job(text_pdf(1)))
        assert document.page_count == 1 and len(document.pages) == 1
        page = document.pages[0]
        assert page.number == 1 and page.media_type == "image/jpeg"
        assert Image.open(io.BytesIO(page.image)).size == (page.width, page.height)
        assert fills(page.width, page.height, BUDGET)
        assert abs(page.width / page.height - A4[0] / A4[1]) < 0.002
        assert page.text is not None and f"Contract page 1 {CANARY}" in page.text
        assert 0 < document.peak_rss_kib < 1024 * 1024
        # The red photo is where the page puts it, drawn at the page's scale.
        scale = page.width / A4[0]
        photo = Image.open(io.BytesIO(page.image)).convert("RGB").getpixel(
            (int(100 * scale), page.height - int(110 * scale)))
        assert photo[0] > 150 and photo[1] < 90

        # Without a text layer, none; PNG when the settings say so.
        document = await pool.render(job(text_pdf(1), text_layer=False))
        assert document.pages[0].text is None
    run(scenario)


def test_png_pages_max_dpi_and_small_pages() -> None:
    async def scenario(pool: RenderPool) -> None:
        # A budget far above what 150 dpi gives: the page stops at max_dpi (pixels = points x dpi / 72).
        page = (await pool.render(job(text_pdf(1), max_pixels_per_page=50_000_000))).pages[0]
        assert page.media_type == "image/png" and page.image[:8] == b"\x89PNG\r\n\x1a\n"
        assert (page.width, page.height) == (math.floor(A4[0] * 150 / 72), math.floor(A4[1] * 150 / 72))
        # Two business cards (252 x 144 pt) sharing a tiny total get the minimum each, as long as max_dpi allows.
        card = (252.0, 144.0)
        document = await pool.render(job(text_pdf(2, size=card, image=False), total_pixels=20_000,
                                         min_pixels_per_page=50_000))
        assert all(fills(page.width, page.height, 50_000) for page in document.pages)
        page = (await pool.render(job(text_pdf(1, size=card, image=False), min_pixels_per_page=4_000_000))).pages[0]
        assert (page.width, page.height) == (math.floor(card[0] * 150 / 72), math.floor(card[1] * 150 / 72))
    run(scenario, page_format="png", max_dpi=150)


def test_many_pages_a_selection_and_a_shared_budget() -> None:
    async def scenario(pool: RenderPool) -> None:
        document = await pool.render(job(text_pdf(12, image=False), pages=(3, 1, 12)))
        assert document.page_count == 12
        assert [page.number for page in document.pages] == [3, 1, 12]
        assert [page.text and page.text.split()[2] for page in document.pages] == ["3", "1", "12"]
        # Ten pages share a 32,768-token context's worth of pixels (32 x 32 pixels a token).
        shared = 32_768 * 32 * 32
        document = await pool.render(job(text_pdf(10, image=False), total_pixels=shared))
        assert len(document.pages) == 10
        assert all(fills(page.width, page.height, shared // 10) for page in document.pages)
        assert sum(page.width * page.height for page in document.pages) <= shared
        # An image-only scan renders the same way (no text layer there).
        document = await pool.render(job(scanned_pdf(3)))
        assert document.page_count == 3 and all(page.text is None for page in document.pages)
        assert all(fills(page.width, page.height, BUDGET) for page in document.pages)
        # Thumbnails: JPEG, thumbnail_pixels each, no text; without a choice, the first max_pages pages.
        document = await pool.render(job(text_pdf(5, image=False), thumbnail=True, max_pages=3))
        assert document.page_count == 5 and [page.number for page in document.pages] == [1, 2, 3]
        assert all(page.text is None and page.media_type == "image/jpeg" for page in document.pages)
        assert all(fills(page.width, page.height, 160 * 226) for page in document.pages)
    run(scenario)


def test_multi_page_tiff() -> None:
    async def scenario(pool: RenderPool) -> None:
        # A4 and US Letter scanned at 300 dpi fill the budget; a frame with fewer pixels than the budget is never
        # enlarged past them (unless below the minimum).
        data = tiff([(2480, 3508), (2550, 3300), (600, 900)], dpi=300)
        document = await pool.render(job(data, "tiff"))
        assert document.page_count == 3 and [page.number for page in document.pages] == [1, 2, 3]
        first, second, third = document.pages
        assert first.text is None and Image.open(io.BytesIO(first.image)).size == (first.width, first.height)
        assert fills(first.width, first.height, BUDGET) and fills(second.width, second.height, BUDGET)
        assert abs(first.width / first.height - 2480 / 3508) < 0.002
        assert (third.width, third.height) == (600, 900)
        document = await pool.render(job(data, "tiff", pages=(3, 2), max_pixels_per_page=2_000_000))
        assert [page.number for page in document.pages] == [3, 2]
        assert (document.pages[0].width, document.pages[0].height) == (600, 900)
        assert fills(document.pages[1].width, document.pages[1].height, 2_000_000)
        # A small fax frame at 72 dpi is enlarged to the minimum (max_dpi allows 300 / 72 times its size).
        document = await pool.render(job(tiff([(300, 400)], dpi=72), "tiff", min_pixels_per_page=1_000_000))
        assert fills(document.pages[0].width, document.pages[0].height, 1_000_000)
    run(scenario)


# -- documents refused -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "request_job", "error", "code", "said"), [
    ("above the page limit", lambda: job(text_pdf(20, image=False)), InvalidRequest, "too_many_pages",
     ["20 pages", "at most 16", "choose pages"]),
    ("too many chosen", lambda: job(text_pdf(20, image=False), pages=tuple(range(1, 18))), InvalidRequest,
     "too_many_pages", ["17 pages were chosen", "at most 16"]),
    ("a page it lacks", lambda: job(text_pdf(3, image=False), pages=(2, 5)), InvalidRequest, "invalid_pages",
     ["page 5", "3 pages"]),
    ("encrypted", lambda: job(encrypted_pdf()), InvalidRequest, "document_encrypted", ["password"]),
    ("truncated", lambda: job(text_pdf(3)[:300]), InvalidRequest, "invalid_document", ["damaged"]),
    ("not a PDF", lambda: job(b"Dear colleague, " * 100), InvalidRequest, "invalid_document", ["damaged"]),
    ("a PDF sent as TIFF", lambda: job(text_pdf(1), "tiff"), InvalidRequest, "invalid_document", ["damaged"]),
    ("a TIFF page too large to decode", lambda: job(tiff_declaring(60_000, 60_000), "tiff"), UnprocessableDocument,
     "document_unprocessable", ["67108864 pixels", "worker_memory_mib = 1024"]),
    ("a decompression bomb", lambda: job(flate_bomb()), UnprocessableDocument, "document_unprocessable",
     ["worker_memory_mib = 1024"]),
    ("memory exhausted", lambda: job(memory_eater()), UnprocessableDocument, "document_unprocessable",
     ["worker_memory_mib = 1024"]),
])
def test_refused(name: str, request_job: Callable[[], RenderJob], error: type[Exception], code: str,
                 said: list[str], caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(pool: RenderPool) -> None:
        with pytest.raises(error) as raised:
            await pool.render(request_job())
        assert type(raised.value) is error
        assert raised.value.code == code  # type: ignore[attr-defined]
        for words in said:
            assert words in raised.value.message, raised.value.message  # type: ignore[attr-defined]
        assert CANARY not in raised.value.message  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="airlock"):
        run(scenario)
    # One line for a worker that failed (or a TIFF page refused for the worker's memory), none for a refusal.
    assert len(caplog.records) == (1 if error is UnprocessableDocument else 0)
    assert all(CANARY not in record.getMessage() for record in caplog.records)


def test_cpu_time_limit(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(pool: RenderPool) -> None:
        with pytest.raises(UnprocessableDocument) as raised:
            await pool.render(job(cpu_burner()))
        assert "worker_cpu_s = 1" in raised.value.message
    with caplog.at_level(logging.WARNING, logger="airlock"):
        run(scenario, worker_cpu_s=1)
    assert [record.getMessage() for record in caplog.records] == ["a document worker ran out of CPU time (SIGXCPU)"]


def test_wall_time_limit(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(pool: RenderPool) -> None:
        with pytest.raises(UnprocessableDocument) as raised:
            await pool.render(job(cpu_burner()))
        assert "render_timeout_s = 1.5" in raised.value.message
    with caplog.at_level(logging.WARNING, logger="airlock"):
        run(scenario, render_timeout_s=1.5)
    assert [record.getMessage() for record in caplog.records] == [
        "a document worker passed documents.render_timeout_s and was killed"]


def test_worker_killed_mid_render_and_its_limits(caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A real signal from outside (as a crash in the parser would be); meanwhile the running worker's limits are
    read from /proc, and its environment lacks the gateway's secret."""
    monkeypatch.setenv("AIRLOCK_TEST_SECRET", "gateway-only-secret")

    async def scenario(pool: RenderPool) -> None:
        for pid in pool.ready_pids:
            assert b"gateway-only-secret" not in Path(f"/proc/{pid}/environ").read_bytes()
            assert Path(f"/proc/{pid}/environ").read_bytes() == b""
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2", "3"]
            ready = limits(pid)
            assert ready["Max core file size"] == ("0", "0")
            assert ready["Max file size"] == ("0", "0")
            assert ready["Max address space"] == (str(512 << 20),) * 2
            assert ready["Max open files"] == ("4", "4")
            assert ready["Max cpu time"] == ("unlimited", "unlimited")  # set with the job

        rendering = asyncio.create_task(pool.render(job(cpu_burner())))
        pid = await busy_worker(pool)
        soft, hard = limits(pid)["Max cpu time"]
        assert 20 <= int(soft) <= 22 and int(hard) == int(soft) + 2  # start-up's CPU seconds + worker_cpu_s
        os.kill(pid, signal.SIGSEGV)
        with pytest.raises(UnprocessableDocument) as raised:
            await rendering
        assert "worker_memory_mib = 512" in raised.value.message
    with caplog.at_level(logging.WARNING, logger="airlock"):
        run(scenario, worker_memory_mib=512, worker_cpu_s=20)
    assert [record.getMessage() for record in caplog.records] == [
        "a document worker was killed by signal 11 (SIGSEGV)"]


def test_overloaded_when_no_worker_is_free() -> None:
    async def scenario(pool: RenderPool) -> None:
        burning = asyncio.create_task(pool.render(job(cpu_burner())))
        await busy_worker(pool)
        with pytest.raises(Overloaded) as raised:
            await pool.render(job(text_pdf(1)))
        assert raised.value.code == "documents_busy" and raised.value.headers["retry-after"] == "5"
        with pytest.raises(UnprocessableDocument):
            await burning
    run(scenario, workers=1, queue_timeout_s=0.5, render_timeout_s=3)


def test_nothing_written_and_nothing_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Places a worker could write to, before and after renders (good and broken) of documents carrying the canary:
    nothing new in the working directory; in the temporary directory, /dev/shm and / (which other processes on the
    machine share), no new entry named after the canary or holding it."""
    cwd = Path.cwd()
    shared = [Path(tempfile.gettempdir()), Path("/dev/shm"), Path("/")]

    def listing(path: Path) -> set[Path]:
        return set(path.iterdir()) if path.is_dir() else set()

    before = {path: listing(path) for path in [cwd, *shared]}

    async def scenario(pool: RenderPool) -> None:
        await pool.render(job(text_pdf(2)))
        await pool.render(job(tiff([(300, 400)]), "tiff"))
        with pytest.raises(InvalidRequest):
            await pool.render(job(text_pdf(2)[:400]))
        with pytest.raises(UnprocessableDocument):
            await pool.render(job(memory_eater()))
    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert listing(cwd) == before[cwd]
    for directory in shared:
        for path in listing(directory) - before[directory]:
            assert CANARY not in path.name
            if path.is_file():
                assert CANARY.encode() not in path.read_bytes()
    assert caplog.records  # the memory failure's line
    assert all(CANARY not in record.getMessage() for record in caplog.records)


def test_a_pool_whose_workers_cannot_start_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken install fails at the gateway's start, not at the first document."""
    monkeypatch.setattr("sys.executable", "/bin/false")
    pool = RenderPool(DocumentSettings())
    with pytest.raises(RuntimeError, match="could not start: a document worker did not start"):
        asyncio.run(pool.start())
