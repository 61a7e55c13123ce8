"""Real documents made in memory, for the documents tests: PDFs written by reportlab (and encrypted by pypdf), TIFFs by
Pillow, and a hand-written PDF whose content stream inflates past a worker's memory. Nothing is written to disk."""

from __future__ import annotations

import base64
import io
import zlib

from PIL import Image, ImageDraw
from pypdf import PdfReader, PdfWriter
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas


def pdf_bytes(pages: int = 1, text: str = "Invoice 2024-117, total due 1,234.50 EUR", image: bool = True) -> bytes:
    """An A4 PDF of ``pages`` pages, each with ``text`` (and its number) and, when ``image``, an embedded picture."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    picture = Image.new("RGB", (120, 80), (30, 120, 200))
    ImageDraw.Draw(picture).ellipse((10, 10, 110, 70), fill=(240, 200, 20))
    for number in range(1, pages + 1):
        pdf.setFont("Helvetica", 14)
        pdf.drawString(72, 760, f"{text} (page {number})")
        if image:
            pdf.drawImage(ImageReader(picture), 72, 560, width=240, height=160)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def encrypted_pdf(password: str = "s3cret") -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes())))
    writer.encrypt(password, algorithm="AES-256")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def tiff_bytes(pages: int, size: tuple[int, int] = (1024, 1024)) -> bytes:
    """A multi-page bilevel TIFF compressed as a fax machine does (CCITT group 4), 300 dpi."""
    frames = []
    for number in range(pages):
        frame = Image.new("1", size, 1)
        draw = ImageDraw.Draw(frame)
        width, height = size
        draw.rectangle((width // 20, height // 20 * (number + 1), width * 19 // 20, height // 4 * (number + 1)),
                       outline=0, width=max(1, width // 150))
        draw.text((width // 16, height // 3), f"Scanned page {number + 1}", fill=0)
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:], compression="group4", dpi=(300, 300))
    return buffer.getvalue()


def inflating_pdf(mebibytes: int = 1200) -> bytes:
    """A one-page PDF whose content is one deflated MiB of spaces, listed ``mebibytes`` times in the page's
    /Contents array (PDF 32000-1, 7.7.3.3: the streams are concatenated): PDFium inflates them into one buffer
    before parsing it, so the worker runs out of its address space. Made in milliseconds, about 2 KB."""
    spaces = zlib.compress(b" " * (1 << 20), 9)
    contents = b" ".join([b"4 0 R"] * mebibytes)
    return _pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents [" + contents + b"] >>",
        b"<< /Filter /FlateDecode /Length %d >>\nstream\n" % len(spaces) + spaces + b"\nendstream",
    ])


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF of ``objects`` (object 1 the catalog) with a correct cross-reference table (PDF 32000-1, 7.5)."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def data_url(data: bytes, mime: str = "application/pdf") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def file_part(data: bytes | str, filename: str | None = "invoice.pdf", **extra: object) -> dict[str, object]:
    """OpenAI's file content part, with Airlock's extensions (``pages``, ``text_layer``) in ``extra``."""
    file: dict[str, object] = {"file_data": data if isinstance(data, str) else data_url(data), **extra}
    if filename is not None:
        file["filename"] = filename
    return {"type": "file", "file": file}
