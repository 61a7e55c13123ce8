"""The isolated document renderer (server/render_pool.py, server/render_worker.py) with real worker processes.

Every document here is made by the test: reportlab draws text and images, Pillow writes image-only ("scanned") PDFs
and multi-page TIFFs, pypdf encrypts and assembles hostile objects (a Flate bomb, ten million paths, a tree of
forms that burns CPU). After each failure the same pool still renders a good document.
"""

from __future__ import annotations

import asyncio
import contextlib
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


async def still_renders(pool: RenderPool, patience_s: float = 30.0) -> RenderedDocument:
    """A render succeeds. A worker replacing a killed one can take longer to start than a short queue_timeout_s on a
    slow host (seen: more than 1.5 s with the other core busy, CI of 1 December), so a 503 is tried again until
    ``patience_s``; a turn or a worker that never comes back still fails."""
    deadline = asyncio.get_running_loop().time() + patience_s
    while True:
        try:
            document = await pool.render(job(text_pdf(2)))
            break
        except Overloaded:
            if asyncio.get_running_loop().time() > deadline:
                raise
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

def test_a_workers_peak_memory_is_its_own_not_its_parents() -> None:
    """execve(2) keeps the parent's ru_maxrss: a worker started by a process that once held 600 MiB said it peaked
    there. The figure is the worker's own VmHWM."""
    ballast = bytearray(600 << 20)  # written (zeroed), so resident in this process, the workers' parent

    async def scenario(pool: RenderPool) -> None:
        document = await pool.render(job(text_pdf(1)))
        assert 0 < document.peak_rss_kib < 400 << 10, document.peak_rss_kib

    run(scenario)
    del ballast


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


def test_a_worker_holds_none_of_the_gateways_descriptors_under_uvloop() -> None:
    """The gateway runs on uvloop, whose subprocess_exec ignores close_fds: a descriptor the gateway's process holds
    without close-on-exec (one inherited from the shell that started it, say) must still not reach a worker."""
    import uvloop

    reader, writer = os.pipe()
    os.set_inheritable(writer, True)

    async def main() -> None:
        pool = RenderPool(DocumentSettings(workers=1))
        await pool.start()
        try:
            for pid in pool.ready_pids:
                assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2", "3", "4"]
            await still_renders(pool)
        finally:
            await pool.close()

    try:
        uvloop.run(main())
    finally:
        os.close(reader)
        os.close(writer)


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
            assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2", "3", "4"]
            assert os.readlink(f"/proc/{pid}/fd/4") == f"/proc/{pid}/status"
            ready = limits(pid)
            assert ready["Max core file size"] == ("0", "0")
            assert ready["Max file size"] == ("0", "0")
            assert ready["Max address space"] == (str(512 << 20),) * 2
            assert ready["Max open files"] == ("5", "5")
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


# -- found by review: hostile and unusual documents, operators' set-ups ------------------------------------------------

def tiff_frames(frames: list[Image.Image]) -> bytes:
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def test_sixteen_bit_grey_and_transparent_tiff_frames_keep_their_tones() -> None:
    """A 16-bit grey scan at 30000 of 65535 is mid-grey, not white (Pillow's convert("L") clips I;16 at 255); a
    transparent frame is white like a PDF page, not black (RGBA/LA converted without compositing)."""
    async def scenario(pool: RenderPool) -> None:
        data = tiff_frames([Image.new("I;16", (400, 300), 30000), Image.new("RGBA", (400, 300), (0, 0, 0, 0)),
                            Image.new("LA", (400, 300), (0, 0))])
        document = await pool.render(job(data, "tiff"))
        grey, rgba, la = (Image.open(io.BytesIO(page.image)) for page in document.pages)
        assert grey.getpixel((200, 150)) == 30000 // 256
        assert rgba.convert("RGB").getpixel((200, 150)) == (255, 255, 255)
        assert la.convert("RGB").getpixel((200, 150)) == (255, 255, 255)
    run(scenario, page_format="png")


def banner_pdf(width_pt: float, height_pt: float) -> bytes:
    out = io.BytesIO()
    drawing = canvas.Canvas(out, pagesize=(width_pt, height_pt))
    drawing.drawString(2, 2, "banner")
    drawing.showPage()
    drawing.save()
    return out.getvalue()


def test_a_page_longer_than_a_jpeg_can_be_is_capped() -> None:
    """A 200-inch strip at max_dpi 1200 would be 77,760 pixels long: JPEG stops at 65,500 (libjpeg), where the
    worker crashed in the encoder. It is rendered within that length (the aspect-ratio screen then judges it)."""
    async def scenario(pool: RenderPool) -> None:
        page = (await pool.render(job(banner_pdf(14400, 10)))).pages[0]
        assert page.media_type == "image/jpeg" and Image.open(io.BytesIO(page.image)).size == (page.width,
                                                                                                page.height)
        assert 65_000 < page.width <= 65_500 and page.width * page.height <= BUDGET
        strip = tiff_frames([Image.new("L", (70_000, 8), 128)])
        page = (await pool.render(job(strip, "tiff"))).pages[0]
        assert page.width <= 65_500 and page.height >= 1
    run(scenario, max_dpi=1200)


def test_close_during_a_render_is_a_shutdown_not_a_bad_document(caplog: pytest.LogCaptureFixture) -> None:
    """close() kills the worker under a render: the caller hears the renderer is shutting down (503, retry), not
    that the document needs more memory, and no worker failure is logged."""
    async def main() -> None:
        pool = RenderPool(DocumentSettings())
        await pool.start()
        rendering = asyncio.create_task(pool.render(job(cpu_burner())))
        await busy_worker(pool)
        await pool.close()
        with pytest.raises(Overloaded) as raised:
            await rendering
        assert raised.value.code == "documents_closed"
        with pytest.raises(Overloaded):
            await pool.render(job(text_pdf(1)))
    with caplog.at_level(logging.WARNING, logger="airlock"):
        asyncio.run(main())
    assert caplog.records == []


def test_a_waiting_worker_that_died_is_not_given_a_document(caplog: pytest.LogCaptureFixture) -> None:
    """A ready worker killed while idle (the kernel's out-of-memory killer picks big processes) is replaced; the
    next good document renders instead of failing as if it had crashed the worker."""
    async def scenario(pool: RenderPool) -> None:
        (pid,) = pool.ready_pids
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while pool._ready._queue[0].process.returncode is None:  # type: ignore[attr-defined]
                await asyncio.sleep(0.02)
        await still_renders(pool)
    with caplog.at_level(logging.WARNING, logger="airlock"):
        run(scenario, workers=1)
    assert [record.getMessage() for record in caplog.records] == [
        "a waiting document worker had exited (status -9) and is replaced"]


def has_cap_sys_resource() -> bool:
    """capabilities(7): CAP_SYS_RESOURCE (bit 24) lets a process raise a hard limit."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    return bool(effective >> 24 & 1)


@pytest.mark.skipif(has_cap_sys_resource(), reason="a process with CAP_SYS_RESOURCE may raise its hard RLIMIT_AS")
def test_a_gateway_address_space_limit_below_the_workers_fails_clearly() -> None:
    """A gateway under systemd's LimitAS= (or ulimit -v) lower than worker_memory_mib: a worker cannot raise its
    hard limit (setrlimit(2)), and the pool says so at start instead of "exit status 1"."""
    import subprocess
    import sys

    gateway = ("import asyncio, resource; from server.config import DocumentSettings; "
               "from server.render_pool import RenderPool; "
               "resource.setrlimit(resource.RLIMIT_AS, (900 << 20, 900 << 20)); "
               "asyncio.run(RenderPool(DocumentSettings(worker_memory_mib=1024, workers=1)).start())")
    result = subprocess.run([sys.executable, "-c", gateway], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1
    assert "could not limit its memory to documents.worker_memory_mib = 1024" in result.stderr
    assert "LimitAS=" in result.stderr


def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF of the given objects (numbered from 1, the first the catalog) with a correct cross-reference table
    (ISO 32000-1, 7.5): for shapes no PDF writer makes."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def page_pdf(media_box: bytes, extra: bytes = b"", content: bytes = b"0 0 m 9 9 l S", count: int = 1) -> bytes:
    """``count`` pages with this MediaBox sharing one content stream (object 3)."""
    kids = b" ".join(b"%d 0 R" % (number + 4) for number in range(count))
    return raw_pdf([b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[%s]/Count %d>>" % (kids, count),
                    b"<</Length %d>>stream\n%s\nendstream" % (len(content), content),
                    *[b"<</Type/Page/Parent 2 0 R/MediaBox[%s]/Contents 3 0 R%s>>" % (media_box, extra)] * count])


def test_a_strip_thinner_than_a_pixel_stays_within_its_area() -> None:
    """A 14,400 x 1 pt page (a legal MediaBox) or a 40,000 x 1 pixel TIFF frame as a thumbnail: the short side cannot
    go below one pixel, so the long side alone must respect the area. It was not held: the worker sent a
    8,485 x 1 page for 5,000 pixels (the pool let it through: its check takes the largest area of any job) and a
    38,031 x 1 TIFF thumbnail for 36,160 (the pool took that for nonsense: "the renderer failed")."""
    async def scenario(pool: RenderPool) -> None:
        strip = tiff_frames([Image.new("L", (40_000, 1), 0)])
        for document, area in [(await pool.render(job(page_pdf(b"0 0 14400 1"), thumbnail=True)), 160 * 226),
                               (await pool.render(job(page_pdf(b"0 0 14400 1"), max_pixels_per_page=5_000)), 5_000),
                               (await pool.render(job(strip, "tiff", thumbnail=True)), 160 * 226)]:
            page = document.pages[0]
            assert page.height == 1 and page.width * page.height <= area
            assert Image.open(io.BytesIO(page.image)).size == (page.width, page.height)
    run(scenario)


def test_a_long_choice_of_pages_is_too_many_pages() -> None:
    """Pages chosen one by one in a list of 600,000 numbers (every page of a long document, or a client's loop):
    too_many_pages with the count, as for 17; it was a failed worker (the job's header outgrew the worker's 1 MiB
    frame)."""
    async def scenario(pool: RenderPool) -> None:
        with pytest.raises(InvalidRequest) as raised:
            await pool.render(job(text_pdf(20, image=False), pages=tuple(range(1, 21)) * 30_000))
        assert raised.value.code == "too_many_pages"
        assert "600000 pages were chosen from a document of 20" in raised.value.message
        with pytest.raises(InvalidRequest) as raised:
            await pool.render(job(text_pdf(3, image=False), pages=tuple(range(1, 600_001))))
        assert raised.value.code == "invalid_pages" and "page 4 was chosen" in raised.value.message
    run(scenario)


def test_close_tells_a_waiting_request_at_once() -> None:
    """A request waiting for a worker when close() comes hears that the renderer is shutting down, not, after
    queue_timeout_s, that it is busy (no worker was ever going to come)."""
    async def main() -> None:
        pool = RenderPool(DocumentSettings(workers=1, queue_timeout_s=3))
        await pool.start()
        rendering = asyncio.create_task(pool.render(job(cpu_burner())))
        await busy_worker(pool)
        waiting = asyncio.create_task(pool.render(job(text_pdf(1))))
        await asyncio.sleep(0.1)
        await pool.close()
        for task in (rendering, waiting):
            with pytest.raises(Overloaded) as raised:
                await task
            assert raised.value.code == "documents_closed"
        assert pool.ready_pids == [] and pool.busy_pids == []
    asyncio.run(main())


def children() -> set[int]:
    """This process's child processes, zombies too (proc(5): the fourth field of /proc/PID/stat is the parent)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(entry))
    return found


def test_floods_failed_starts_and_cancellations_leave_the_pool_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight documents at once while no worker can start (a broken install mid-flight): the two ready workers take
    two, the rest wait queue_timeout_s and get 503, and one retrying start per missing worker runs (no storm). Once
    starts work again the pool is back to two ready workers. Then renders of every outcome, a request cancelled
    mid-render (the client left: its worker is killed, its turn freed) and one cancelled while waiting: the gateway
    holds the same descriptors as before and no child but the ready workers."""
    async def main() -> None:
        # Children this process had before (in the whole suite, the session's engine stack): not the pool's.
        others = children()
        pool = RenderPool(DocumentSettings(workers=2, queue_timeout_s=1.5))
        await pool.start()
        descriptors = len(os.listdir("/proc/self/fd"))  # two ready workers: their pipes (numbers vary)
        monkeypatch.setattr("sys.executable", "/bin/false")
        results = await asyncio.gather(*(pool.render(job(text_pdf(1))) for _ in range(8)), return_exceptions=True)
        assert sum(isinstance(result, RenderedDocument) for result in results) == 2
        assert all(isinstance(result, Overloaded) and result.code == "documents_busy"
                   for result in results if not isinstance(result, RenderedDocument))
        assert len(pool._spawning) == 2 and pool.ready_pids == []
        monkeypatch.undo()
        async with asyncio.timeout(30):
            while pool._spawning:
                await asyncio.sleep(0.05)
        assert len(pool.ready_pids) == 2

        for data in [text_pdf(1), b"junk", text_pdf(1)[:500], memory_eater()]:
            with contextlib.suppress(InvalidRequest):
                await pool.render(job(data))
        rendering = asyncio.create_task(pool.render(job(cpu_burner())))
        pid = await busy_worker(pool)
        other = asyncio.create_task(pool.render(job(cpu_burner())))
        await busy_worker(pool)
        waiting = asyncio.create_task(pool.render(job(text_pdf(1))))
        await asyncio.sleep(0.1)
        for task in (rendering, waiting):
            task.cancel()
        await asyncio.gather(rendering, waiting, return_exceptions=True)
        assert not Path(f"/proc/{pid}").exists()  # killed and reaped
        await still_renders(pool)  # the cancelled request's turn came back
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        async with asyncio.timeout(30):
            while pool._spawning:
                await asyncio.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) == descriptors
        assert children() - others == set(pool.ready_pids) and len(pool.ready_pids) == 2 and pool.busy_pids == []
        await pool.close()
        assert children() - others == set()
    asyncio.run(main())


def test_hostile_shapes_get_their_answer() -> None:
    """Documents shaped to abuse the renderer: each gets its answer, quickly, and the pool still serves."""
    async def scenario(pool: RenderPool) -> None:
        long_pdf = page_pdf(b"0 0 9 9", count=100_000)
        with pytest.raises(InvalidRequest) as raised:
            await pool.render(job(long_pdf))
        assert raised.value.code == "too_many_pages" and "100000 pages" in raised.value.message
        previews = await pool.render(job(long_pdf, thumbnail=True))
        assert previews.page_count == 100_000 and len(previews.pages) == 16
        assert [page.number for page in (await pool.render(job(long_pdf, pages=(100_000,)))).pages] == [100_000]
        # A form drawing itself (a cycle), and 10,000-deep forms: PDFium stops the recursion.
        cycle = raw_pdf([
            b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Resources<</XObject<</X 5 0 R>>>>/Contents 4 0 R>>",
            b"<</Length 5>>stream\n/X Do\nendstream",
            b"<</Type/XObject/Subtype/Form/BBox[0 0 612 792]/Resources<</XObject<</X 5 0 R>>>>/Length 5>>stream\n"
            b"/X Do\nendstream"])
        assert len((await pool.render(job(cycle))).pages) == 1
        # /Rotate 90: the page is drawn turned clockwise (ISO 32000-1, 7.7.3.3), its box landscape to portrait.
        turned = await pool.render(job(page_pdf(b"0 0 600 300", b"/Rotate 90", b"0 200 100 100 re f"),
                                       max_pixels_per_page=400_000))
        page = turned.pages[0]
        picture = Image.open(io.BytesIO(page.image)).convert("L")
        assert page.width < page.height and picture.getpixel((page.width - 5, 5)) < 50 < picture.getpixel((5, 5))
        # A page a hundredth of a point wide is not a page.
        with pytest.raises(InvalidRequest) as raised:
            await pool.render(job(page_pdf(b"0 0 0.01 0.01")))
        assert raised.value.code == "invalid_document"
        # A page holding 100,000 characters of text: its text layer is cut at max_text_chars_per_page.
        text = b"BT /F1 1 Tf 1 TL 0 700 Td " + (b"(" + b"A" * 1000 + b") Tj T* ") * 100 + b"ET"
        wordy = raw_pdf([
            b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Resources<</Font<</F1 5 0 R>>>>/Contents 4 0 R>>",
            b"<</Length %d>>stream\n%s\nendstream" % (len(text), text),
            b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>"])
        page = (await pool.render(job(wordy))).pages[0]
        assert page.text is not None and len(page.text) == 20_000
        # A TIFF of 10,000 frames (one IFD chain sharing a strip), and pictures sent as TIFF.
        frames = 10_000
        strip_at = 8 + frames * (2 + 8 * 12 + 4)
        many = bytearray(b"II*\x00" + struct.pack("<I", 8))
        for index in range(frames):
            many += struct.pack("<H", 8) + b"".join(struct.pack("<HHII", *entry) for entry in [
                (256, 3, 1, 8), (257, 3, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                (273, 4, 1, strip_at), (278, 3, 1, 8), (279, 4, 1, 64)])
            many += struct.pack("<I", len(many) + 4 if index + 1 < frames else 0)
        many += bytes(range(0, 256, 4))
        with pytest.raises(InvalidRequest) as raised:
            await pool.render(job(bytes(many), "tiff"))
        assert raised.value.code == "too_many_pages" and "10000 pages" in raised.value.message
        assert (await pool.render(job(bytes(many), "tiff", pages=(10_000,)))).page_count == 10_000
        for picture_format in ("PNG", "JPEG"):
            out = io.BytesIO()
            Image.new("RGB", (64, 64)).save(out, picture_format)
            with pytest.raises(InvalidRequest) as raised:
                await pool.render(job(out.getvalue(), "tiff"))
            assert raised.value.code == "invalid_document"
    run(scenario)
