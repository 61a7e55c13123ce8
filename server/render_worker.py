"""A single-use document worker: renders one PDF or multi-page TIFF to page images in memory, answers, and exits.

Started by ``server.render_pool`` as ``python -I -B -m server.render_worker MEMORY_MIB``, with stdin and stdout as
pipes, stderr on /dev/null and an empty environment. It imports its libraries, hardens itself, says it is ready and
waits for one job; only then does it read the document. Nothing here writes a file (RLIMIT_FSIZE is 0, so a write to
any file fails), and the process is gone after one document, so nothing of one user's document reaches another's.

The wire (both ways, big-endian): a 4-byte length and that many bytes of JSON, then any raw bytes the JSON announces.

- worker -> pool, once ready:  ``{"ready": true}``
- pool -> worker, the job:     ``{"job": {...}, "size": N}`` then the document's N bytes
- worker -> pool, the answer:  ``{"page_count", "pages": [{"number", "media_type", "width", "height", "size",
  "text"}], "peak_rss_kib"}`` then each page's ``size`` bytes in order; or ``{"error": CODE, ...numbers}``.

A refusal carries a code and numbers only, never text from the document nor an exception's text: the pool writes
the message. Running out of memory exits with ``EXIT_MEMORY``; running out of CPU time ends in SIGXCPU, then SIGKILL.

PDFium here has no JavaScript or XFA engine: pypdfium2's wheels use pdfium-binaries' builds without V8/XFA (its
README, "JavaScript/XFA builds": those need ``PDFIUM_PLATFORM=auto-v8`` and a source install), and the worker refuses
to start if ``pypdfium2.version.PDFIUM_INFO.flags`` says otherwise.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import resource
import signal
import struct
import sys
from typing import IO, TYPE_CHECKING, Any

from .privacy import harden_process

if TYPE_CHECKING:
    from PIL import Image

# PDFium and Pillow are imported by main() alone, before the limits (imports read files), so the gateway can take
# the constants below without loading either.
_LENGTH = struct.Struct(">I")
# Exit statuses the pool tells apart (other deaths are signals).
EXIT_MEMORY = 3
EXIT_PROTOCOL = 4
# The limits could not be set: the gateway's own hard RLIMIT_AS (systemd's LimitAS=, ulimit -v) is below
# worker_memory_mib, and setrlimit(2) lets no unprivileged process raise a hard limit (EPERM).
EXIT_LIMITS = 5
# The descriptors a worker holds (0 the job, 1 and 2 /dev/null, 3 the answer, 4 its /proc/self/status, read-only)
# and no more: RLIMIT_NOFILE below the next free number, so it cannot open anything at all, not a file (not even an
# empty one), not a socket.
MAX_OPEN_FILES = 5
# A job's JSON header is small (its settings, the page list); the document follows as raw bytes.
MAX_HEADER_BYTES = 1 << 20
# CPU seconds past the soft limit before the kernel's SIGKILL (setrlimit(2): SIGXCPU at the soft limit, then every
# second, SIGKILL at the hard limit), in case a handler ignored SIGXCPU.
CPU_GRACE_S = 2
PR_SET_PDEATHSIG = 1
# The longest side of a page image: libjpeg's JPEG_MAX_DIMENSION (jmorecfg.h), beyond which Pillow cannot write a
# JPEG at all. A page that long is a strip (a 200-inch banner at 300 dpi) the engines refuse for its aspect ratio
# anyway (server/images.py); the cap keeps it a readable image instead of a crash in the encoder.
MAX_SIDE = 65_500
# One 1-inch page with a line of text in a standard font, for load_libraries (PDFium rebuilds the missing xref).
WARM_UP_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 72 72]/Resources<</Font<</F1 4 0 R>>>>/Contents 5 0 R>>endobj\n"
    b"4 0 obj<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>endobj\n"
    b"5 0 obj<</Length 31>>stream\nBT /F1 12 Tf 9 30 Td (Hi) Tj ET\nendstream\nendobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


class Refused(Exception):
    """A document the worker recognises it cannot render: a code and numbers, for the pool to word."""

    def __init__(self, code: str, **numbers: int) -> None:
        super().__init__(code)
        self.code = code
        self.numbers = numbers


def harden(memory_mib: int) -> None:
    """Before any document byte is read. From setrlimit(2): RLIMIT_CORE 0 (no core file) and prctl(2)
    PR_SET_DUMPABLE 0 (no ptrace, no /proc/PID/mem for the same user), as the gateway does (server.privacy);
    RLIMIT_AS caps the address space, so a bomb's allocations fail (MemoryError, or PDFium giving up) instead of
    taking the machine's memory; RLIMIT_FSIZE 0 makes any write to a file fail (SIGXFSZ), so nothing of the
    document can land on disk; RLIMIT_NOFILE at the descriptors it already holds makes every open(2), socket(2)
    and pipe(2) fail with EMFILE (open(2)), so it cannot even create an empty file.
    prctl(2) PR_SET_PDEATHSIG: SIGKILL when the gateway dies, so no worker outlives it."""
    harden_process()
    memory = memory_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def limit_cpu(seconds: int) -> None:
    """setrlimit(2) RLIMIT_CPU counts the process's whole life: the job gets ``seconds`` beyond what start-up used."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(used.ru_utime + used.ru_stime) + seconds
    hard = soft + CPU_GRACE_S
    # A hard limit the gateway inherited (systemd's LimitCPU=) cannot be raised (setrlimit(2), EPERM): stay below it.
    _, inherited = resource.getrlimit(resource.RLIMIT_CPU)
    if inherited != resource.RLIM_INFINITY and inherited < hard:
        hard, soft = inherited, max(1, min(soft, inherited - CPU_GRACE_S))
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def read_frame(stream: IO[bytes], limit: int) -> dict[str, Any] | None:
    first = stream.read(1)
    if not first:
        return None  # the pool closed the pipe: shutting down
    (length,) = _LENGTH.unpack(first + read_exactly(stream, _LENGTH.size - 1))
    if length > limit:
        raise EOFError
    body = read_exactly(stream, length)
    value = json.loads(body)
    if not isinstance(value, dict):
        raise EOFError
    return value


def read_exactly(stream: IO[bytes], size: int) -> bytes:
    """A pipe gives what it has: read until ``size`` bytes (or EOF, an error)."""
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def write_frame(stream: IO[bytes], header: dict[str, Any], *blobs: bytes) -> None:
    body = json.dumps(header).encode()
    stream.write(_LENGTH.pack(len(body)) + body)
    for blob in blobs:
        stream.write(blob)
    stream.flush()


def target_area(job: dict[str, Any], count: int) -> int:
    """Pixels a page gets: the job's maximum, or its share of ``total_pixels``; never below the minimum."""
    if job["thumbnail"]:
        return int(job["thumbnail_pixels"])
    area = int(job["max_pixels_per_page"])
    if job["total_pixels"] is not None:
        area = min(area, int(job["total_pixels"]) // max(count, 1))
    return max(area, int(job["min_pixels_per_page"]))


def page_scale(width_pt: float, height_pt: float, area: int, max_dpi: int) -> float:
    """Pixels per point so the page fills ``area`` with its aspect kept, at most ``max_dpi`` (72 points an inch),
    and no side longer than ``MAX_SIDE``. A strip thinner than one pixel at that scale still gets one pixel row, so
    its long side is held to ``area`` pixels: a side of ``area`` x 1 is the most the area allows."""
    longest = max(width_pt, height_pt)
    return min(math.sqrt(area / (width_pt * height_pt)), max_dpi / 72, MAX_SIDE / longest, area / longest)


def select(job: dict[str, Any], count: int) -> list[int]:
    """The 1-based pages to render, in the order asked. A thumbnail job without a choice previews the first
    ``max_pages`` pages (the console shows how many more there are) instead of refusing the document."""
    limit = int(job["max_pages"])
    chosen = job["pages"]
    if chosen is None:
        if count > limit and not job["thumbnail"]:
            raise Refused("too_many_pages", page_count=count, limit=limit)
        return list(range(1, min(count, limit) + 1))
    pages = [int(p) for p in chosen]
    for number in pages:
        if not 1 <= number <= count:
            raise Refused("invalid_pages", page_count=count, page=number)
    chosen_count = max(len(pages), int(job.get("chosen") or 0))  # the pool sends at most limit + 1 of them
    if chosen_count > limit:
        raise Refused("too_many_pages", page_count=count, limit=limit, chosen=chosen_count)
    return pages


def encode(image: Image.Image, job: dict[str, Any]) -> tuple[bytes, str]:
    """JPEG (thumbnails always; pages at ``jpeg_quality``) or PNG, from an RGB or greyscale image."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    if job["thumbnail"] or job["page_format"] == "jpeg":
        image.save(out, "JPEG", quality=75 if job["thumbnail"] else int(job["jpeg_quality"]))
        return out.getvalue(), "image/jpeg"
    image.save(out, "PNG", compress_level=1)  # fast: the bytes only travel in memory to the engine
    return out.getvalue(), "image/png"


def load_libraries(memory_mib: int) -> None:
    """Everything a job needs, read from disk now, while the worker may still open files: PDFium's shared library,
    Pillow's plugins, and whatever they import lazily (a codec looked up at the first text layer, say), found by
    rendering a tiny PDF and TIFF of our own in every format. Refuses a PDFium built with a script engine."""
    import pypdfium2  # type: ignore[import-untyped]
    from PIL import Image

    flags = pypdfium2.version.PDFIUM_INFO.flags
    if "V8" in flags or "XFA" in flags:
        raise SystemExit(EXIT_PROTOCOL)  # a PDFium that runs scripts is not one to open documents with
    Image.init()
    tiff = io.BytesIO()
    Image.new("L", (8, 8)).save(tiff, "TIFF", save_all=True, append_images=[Image.new("1", (8, 8))])
    job = {"pages": None, "max_pages": 2, "max_pixels_per_page": 64, "min_pixels_per_page": 64, "total_pixels": None,
           "text_layer": True, "thumbnail": False, "thumbnail_pixels": 64, "max_dpi": 72, "jpeg_quality": 90,
           "max_text_chars_per_page": 10}
    for page_format in ("jpeg", "png"):
        render_pdf(WARM_UP_PDF, {**job, "page_format": page_format})
        render_tiff(tiff.getvalue(), {**job, "page_format": page_format}, memory_mib)


def render_pdf(data: bytes, job: dict[str, Any]) -> tuple[int, list[dict[str, Any]], list[bytes]]:
    """PDFium's own error codes tell a password from a broken file (pypdfium2's ``PdfiumError.err_code``, PDFium's
    ``FPDF_ERR_*`` from ``FPDF_GetLastError``, fpdfview.h). Forms are drawn as Chrome shows them (``init_forms``);
    no script runs (no JavaScript engine in this build)."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c  # type: ignore[import-untyped]

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as error:
        if error.err_code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise Refused("document_encrypted") from None
        raise Refused("invalid_document") from None
    pdf.init_forms()
    count = len(pdf)
    numbers = select(job, count)
    area = target_area(job, len(numbers))
    headers: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for number in numbers:
        try:
            page = pdf[number - 1]
            width_pt, height_pt = page.get_size()
        except pdfium.PdfiumError:
            raise Refused("invalid_document") from None
        if not (width_pt >= 1 and height_pt >= 1):
            raise Refused("invalid_document")
        scale = page_scale(width_pt, height_pt, area, int(job["max_dpi"]))
        # PDFium's bitmap is ceil(size x scale): cut to floor so the page stays within its area.
        width, height = max(1, math.floor(width_pt * scale)), max(1, math.floor(height_pt * scale))
        try:
            image = page.render(scale=scale, may_draw_forms=True).to_pil()
        except pdfium.PdfiumError:
            raise Refused("invalid_document") from None
        if image.size != (width, height):
            image = image.crop((0, 0, min(width, image.width), min(height, image.height)))
        text = None
        if job["text_layer"] and not job["thumbnail"] and int(job["max_text_chars_per_page"]) > 0:
            text = page.get_textpage().get_text_bounded(errors="replace")[: int(job["max_text_chars_per_page"])]
            text = text if text.strip() else None
        blob, media_type = encode(image, job)
        headers.append({"number": number, "media_type": media_type, "width": image.width, "height": image.height,
                        "size": len(blob), "text": text})
        blobs.append(blob)
    return count, headers, blobs


def render_tiff(data: bytes, job: dict[str, Any], memory_mib: int) -> tuple[int, list[dict[str, Any]], list[bytes]]:
    """Each frame a page, scaled as a PDF page is: its size in points from its resolution tag (72 dpi when it has
    none), never enlarged past its own pixels unless below the minimum (a scan holds no more detail than it has).
    A frame's declared size is checked against what the worker's memory holds before it is decoded."""
    from PIL import Image

    # A decoded frame (4 bytes a pixel at most) plus its scaled copy must fit in the address space with room to
    # spare: a quarter of it. Pillow's own bomb check (MAX_IMAGE_PIXELS) is set to the same.
    max_frame_pixels = memory_mib * 1024 * 1024 // 16
    Image.MAX_IMAGE_PIXELS = max_frame_pixels
    try:
        tiff = Image.open(io.BytesIO(data), formats=["TIFF"])
        count = int(getattr(tiff, "n_frames", 1))
    except Image.DecompressionBombError:
        raise Refused("frame_too_large", limit=max_frame_pixels) from None
    except (OSError, ValueError, SyntaxError, struct.error):
        raise Refused("invalid_document") from None
    numbers = select(job, count)
    area = target_area(job, len(numbers))
    headers: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for number in numbers:
        try:
            tiff.seek(number - 1)
            source_w, source_h = tiff.size
            if source_w * source_h > max_frame_pixels:
                raise Refused("frame_too_large", limit=max_frame_pixels)
            dpi = tiff.info.get("dpi") or (72, 72)
            dpi_x = float(dpi[0]) if float(dpi[0]) > 0 else 72.0
            dpi_y = float(dpi[1]) if float(dpi[1]) > 0 else 72.0
            frame_area = min(area, max(source_w * source_h, int(job["min_pixels_per_page"])))
            scale = page_scale(source_w * 72 / dpi_x, source_h * 72 / dpi_y, frame_area, int(job["max_dpi"]))
            width = max(1, math.floor(source_w * 72 / dpi_x * scale))
            height = max(1, math.floor(source_h * 72 / dpi_y * scale))
            tiff.load()
            image = flatten(tiff).resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
            if image.mode == "RGBA":
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
        except Refused:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, ZeroDivisionError):
            raise Refused("invalid_document") from None
        blob, media_type = encode(image, job)
        headers.append({"number": number, "media_type": media_type, "width": width, "height": height,
                        "size": len(blob), "text": None})
        blobs.append(blob)
    return count, headers, blobs


def flatten(frame: Image.Image) -> Image.Image:
    """A frame as L, RGB, or RGBA (composited on white after scaling, as PDFium draws a page on white).
    16-bit greyscale (scanners' "16-bit grey") is scaled to 8 bits: Pillow's convert("L") clips every value above
    255 to white (its Convert.c I16_L), which turns a 16-bit scan into a blank page."""
    if frame.mode.startswith("I;16"):
        return frame.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if frame.mode in ("1", "L", "I", "F"):
        return frame.convert("L")
    if "A" in frame.getbands() or frame.has_transparency_data:
        return frame.convert("RGBA")
    return frame.convert("RGB")


def peak_rss_kib(status: IO[bytes]) -> int:
    """VmHWM, in KiB, from the worker's /proc/self/status (proc(5)); 0 if it cannot be read."""
    try:
        status.seek(0)
        for line in status.read().splitlines():
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main() -> int:
    # Whatever the gateway's process held without close-on-exec goes first: uvloop's subprocess_exec ignores
    # close_fds (asyncio's honours it), and a descriptor inherited from whoever started the gateway (a shell, a
    # supervisor's pipe) would otherwise reach the worker.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    memory_mib = int(sys.argv[1])
    load_libraries(memory_mib)
    # The answer goes out on a private copy of stdout (fd 3); fd 1 then points at stderr (/dev/null), so a stray
    # print from any library cannot corrupt the framing.
    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # Opened now, read at the end: once hardened the worker can open nothing. VmHWM (proc(5)) is this process's
    # own peak; getrusage's ru_maxrss is not, as execve(2) keeps the parent's (the gateway's) high-water mark.
    status = open("/proc/self/status", "rb", buffering=0)  # noqa: SIM115 (held open for the whole job)
    try:
        harden(memory_mib)
    except (ValueError, OSError):
        return EXIT_LIMITS
    write_frame(stdout, {"ready": True})
    try:
        header = read_frame(stdin, MAX_HEADER_BYTES)
        if header is None:
            return 0
        job = header["job"]
        data = read_exactly(stdin, int(header["size"]))
    except (EOFError, ValueError, KeyError, TypeError):
        return EXIT_PROTOCOL
    limit_cpu(int(job["cpu_s"]))
    try:
        if job["kind"] == "tiff":
            count, pages, blobs = render_tiff(data, job, memory_mib)
        else:
            count, pages, blobs = render_pdf(data, job)
    except Refused as refusal:
        write_frame(stdout, {"error": refusal.code, **refusal.numbers})
        return 0
    except MemoryError:
        return EXIT_MEMORY
    peak = peak_rss_kib(status)
    write_frame(stdout, {"page_count": count, "pages": pages, "peak_rss_kib": peak}, *blobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
