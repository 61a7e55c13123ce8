"""The canaries an audit sends: a prompt string, an image and a PDF, each recognisable wherever its bytes end up.

The image carries its own canary three ways: in a PNG text chunk (the raw upload), as pixel bytes (an image
decoded and written out uncompressed), and as a slice of its base64 (the request body as sent). The PDF, made in
memory with pypdfium2 at run time, carries a line of text (found wherever its text layer goes: the gateway
forwards it to the engine only), an embedded image whose pixels start with a marker (the decoded image, and the
PDF's own bytes: random pixels do not compress, so zlib stores them as they are), a slice of its base64 and its
file name. Answers and the audit's own credential are looked for too, so a spooled response or a logged key is
found as well.
"""

from __future__ import annotations

import base64
import ctypes
import io
import secrets
from dataclasses import dataclass, field

import pypdfium2 as pdfium  # type: ignore[import-untyped, unused-ignore]
import pypdfium2.raw as pdfium_c  # type: ignore[import-untyped, unused-ignore]
from PIL import Image, PngImagePlugin

# A slice this long of the base64 cannot occur by chance; it starts past the PNG header, which all PNGs share.
BASE64_SLICE = slice(200, 264)
# Answers shorter than this are too likely to occur elsewhere by chance to be worth looking for.
MIN_ANSWER_NEEDLE_BYTES = 12
ANSWER_NEEDLE_BYTES = 32
MIN_PASSWORD_NEEDLE_BYTES = 8
# The canary PDF: one small page (points), so that rendered at documents.max_dpi it stays a few hundred image
# tokens and fits the tests' 2,048-token demo context with the canary image beside it.
PDF_PAGE_POINTS = (240, 120)
PDF_FONT = "Helvetica"  # one of PDF's standard 14 fonts: nothing is embedded, nothing read from the system
PDF_FONT_SIZE = 8.0
PDF_IMAGE_PIXELS = 64


@dataclass
class Canaries:
    """Everything the audit sends that must not be found in a file or a log line, by name."""

    text: str
    image_png: bytes
    document_pdf: bytes = b""
    document_name: str = ""
    needles: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def fresh(cls, credential: str | None = None) -> Canaries:
        token = secrets.token_hex(12)
        text = f"AIRLOCK-AUDIT-CANARY-{token}"
        pixel_marker = f"AIRLOCK-AUDIT-PIXELS-{token}".encode()
        png = _canary_png(f"AIRLOCK-AUDIT-IMAGE-{token}", pixel_marker)
        document_text = f"AIRLOCK-AUDIT-DOCUMENT-{token}"
        document_pixels = f"AIRLOCK-AUDIT-PDF-PIXELS-{token}".encode()
        pdf = canary_pdf(document_text, document_pixels)
        name = f"AIRLOCK-AUDIT-FILE-{token}"
        canaries = cls(text, png, pdf, f"{name}.pdf")
        canaries.needles = {
            "prompt": text.encode(),
            "image": f"AIRLOCK-AUDIT-IMAGE-{token}".encode(),
            "image pixels": pixel_marker,
            "image base64": base64.b64encode(png)[BASE64_SLICE],
            "document text": document_text.encode(),
            "document pixels": document_pixels,
            "document base64": _base64_slice(pdf, pdf.index(document_pixels) + len(document_pixels)),
            "document name": name.encode(),
        }
        if credential:
            canaries.needles.update(credential_needles(credential))
        return canaries

    @property
    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.image_png).decode()

    @property
    def document_part(self) -> dict[str, object]:
        """The PDF as OpenAI's chat ``file`` content part (a data: URL in ``file_data``, as OpenAI's guide shows)."""
        data = "data:application/pdf;base64," + base64.b64encode(self.document_pdf).decode()
        return {"type": "file", "file": {"file_data": data, "filename": self.document_name}}

    def add_answer(self, answer: str) -> None:
        """An answer the stack gave: it must not be kept either."""
        encoded = answer.encode()
        if len(encoded) >= MIN_ANSWER_NEEDLE_BYTES:
            self.needles[f"answer {sum(name.startswith('answer') for name in self.needles) + 1}"] = (
                encoded[:ANSWER_NEEDLE_BYTES])

    def found_in(self, data: bytes) -> list[str]:
        """Names of the canaries whose bytes occur in ``data``."""
        return [name for name, needle in self.needles.items() if needle in data]


def credential_needles(credential: str) -> dict[str, bytes]:
    """The credential as given, and the forms it takes on the wire: Basic's ``user:password`` travels as base64,
    and its password alone is looked for too when it is long enough not to occur by chance."""
    needles = {"credential": credential.encode()}
    if ":" in credential:  # Basic (see probe.auth_headers)
        needles["credential base64"] = base64.b64encode(credential.encode())
        password = credential.split(":", 1)[1].encode()
        if len(password) >= MIN_PASSWORD_NEEDLE_BYTES:
            needles["credential password"] = password
    return needles


def _canary_png(text_marker: str, pixel_marker: bytes) -> bytes:
    """A 64x64 PNG of noise: the pixel marker spelt out as the first RGB bytes, the text marker as a comment."""
    width = 64
    pixels = pixel_marker + secrets.token_bytes(3 * width * width - len(pixel_marker))
    image = Image.frombytes("RGB", (width, width), pixels)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text_marker)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def canary_pdf(text: str, pixel_marker: bytes) -> bytes:
    """A one-page PDF made in memory with pypdfium2's own API (PDFium's fpdf_edit: FPDF_CreateNewDocument,
    FPDFPageObj_CreateTextObj with a standard font, FPDFImageObj_SetBitmap, FPDF_SaveAsCopy into a buffer):
    ``text`` as a line of text, and a 64x64 image of noise whose first RGB bytes spell ``pixel_marker``."""
    pdf = pdfium.PdfDocument.new()
    page = pdf.new_page(*PDF_PAGE_POINTS)
    font = pdfium.PdfFont.load_standard(pdf, PDF_FONT)
    handle = pdfium_c.FPDFPageObj_CreateTextObj(pdf, font, PDF_FONT_SIZE)
    if not handle:
        raise pdfium.PdfiumError("cannot make a text object")
    line = pdfium.PdfTextObj(handle, pdf=pdf)
    wide = ctypes.create_string_buffer((text + "\0").encode("utf-16-le"))
    if not pdfium_c.FPDFText_SetText(line, ctypes.cast(wide, pdfium_c.FPDF_WIDESTRING)):
        raise pdfium.PdfiumError("cannot set the canary text")
    line.set_matrix(pdfium.PdfMatrix().translate(10, PDF_PAGE_POINTS[1] - 20))
    page.insert_obj(line)
    side = PDF_IMAGE_PIXELS
    pixels = pixel_marker + secrets.token_bytes(3 * side * side - len(pixel_marker))
    image = pdfium.PdfImage.new(pdf)
    image.set_bitmap(pdfium.PdfBitmap.from_pil(Image.frombytes("RGB", (side, side), pixels)))
    image.set_matrix(pdfium.PdfMatrix().scale(side, side).translate(10, 10))
    page.insert_obj(image)
    page.gen_content()
    buffer = io.BytesIO()
    pdf.save(buffer)
    pdf.close()
    return buffer.getvalue()


def _base64_slice(data: bytes, start: int) -> bytes:
    """A BASE64_SLICE-long piece of ``data``'s base64, from the first whole 3-byte group at or after ``start``: bytes
    there (the PDF's random pixels) are the canary's own, where its header is every PDFium file's."""
    first = -(-start // 3) * 4
    return base64.b64encode(data)[first:first + BASE64_SLICE.stop - BASE64_SLICE.start]
