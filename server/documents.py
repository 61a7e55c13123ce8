"""Documents (PDF, multi-page TIFF) in chat requests: OpenAI's ``file`` content part, rendered to page images.

A part as OpenAI's Chat Completions API takes it (its PDF guide shows a ``data:`` URL; openai-python's
``chat_completion_content_part_param.File`` says "the base64 encoded file data": both are accepted), with two
Airlock extensions inside ``file``::

    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0..." | "JVBERi0...",
                              "filename": "contract.pdf",
                              "pages": "1-3,7" | [1, 2, 3, 7],       # which pages, in this order (default: all)
                              "text_layer": true}}                   # default: documents.text_layer

is replaced, in place, by each page in order: a text part naming it (``[Document 'contract.pdf', page 3 of 10]``),
its image as an ``image_url`` part (a ``data:`` URL), and, when asked and the page has one, its text layer as a text
part. Screening then checks the request as any other (every page is an image there: format, size, count, cache
salt). ``file_id`` names a file uploaded to OpenAI's Files API: Airlock keeps no files, so it is refused.

The document is checked before anything renders it: its size (``documents.max_bytes``, from the base64's length
before decoding), what its bytes are (a PDF's ``%PDF`` header within its first 1024 bytes, where PDFium looks for it:
``CPDF_Parser``'s ``GetHeaderOffset``; a TIFF's ``II*\\0`` or ``MM\\0*``, TIFF 6.0 section 2), and that a declared
media type agrees. Pages and pixels are budgeted (``page_budget``) so nothing is rendered for a request that will be
refused. Rendering happens in the worker pool (``render_pool``), never in the gateway's process; nothing is written
anywhere, and no message, log line or metric carries anything from the document (its name included).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread
from PIL import Image, UnidentifiedImageError

from .admission import text_length
from .config import ConfigError, DocumentSettings, ScreeningSettings
from .engine_limits import EngineLimits
from .errors import DocumentTooLarge, InvalidRequest, Overloaded, UnprocessableDocument
from .images import FORMATS, Inline, decode_base64
from .metrics import GatewayMetrics
from .page_budget import IMAGE_MARKER_TOKENS, TOKENS_PER_MESSAGE, PageBudget, label, text_tokens, utf8_bytes
from .payload import shown_name
from .render_pool import RenderedDocument, RenderJob, RenderPool

Kind = Literal["pdf", "tiff"]
DOCUMENT = Inline("document", "invalid_document", "document_too_large", DocumentTooLarge)
PART_FIELDS = frozenset({"type", "file"})
FILE_FIELDS = frozenset({"file_data", "filename", "pages", "text_layer", "file_id"})
# IANA's names (RFC 8118, RFC 3302); octet-stream says nothing, as a bare base64 string does not.
MEDIA_TYPES: dict[str, Kind] = {"application/pdf": "pdf", "image/tiff": "tiff"}
UNDECLARED = frozenset({"", "application/octet-stream"})
PDF_HEADER_WINDOW = 1024
TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
MAX_NAME_CHARS = 100
# Base64 longer than this is decoded in a thread (as request_path screens large bodies), not on the event loop.
DECODE_INLINE_CHARS = 256 * 1024
# A page number has at most 18 digits (int64): a longer one is no page, and Python refuses to read one of over 4300
# digits (int's max_str_digits, a ValueError: a 500).
PAGES_SYNTAX = re.compile(r"\s*(\d{1,18})\s*(?:-\s*(\d{1,18})\s*)?")
# The label quotes the name in '...' inside [...], and the chat template marks its turns with <|...|>: a name must
# not end the quote or the label early (forging a label of its own), nor spell a special token.
NAME_LOOKALIKES = str.maketrans({"'": "\u2019", "[": "(", "]": ")", "<": "\u2039", ">": "\u203a"})
NOT_PDF_OR_TIFF = "file parts carry PDF or TIFF documents"
IMAGES_ELSEWHERE = 'send images as image_url parts ({"type": "image_url", "image_url": {"url": "data:..."}})'


@dataclass(frozen=True)
class FilePart:
    """One checked ``file`` part, not yet rendered."""

    content: list[Any]  # the message's parts, which this one is replaced in
    part: dict[str, Any]  # the part itself (found again by identity: earlier parts may have grown)
    where: str
    data: bytes
    kind: Kind
    name: str
    pages: tuple[int, ...] | None
    text_layer: bool


def has_file_parts(payload: dict[str, Any]) -> bool:
    """Whether any message holds a ``file`` part: a walk over the parts' types, nothing decoded."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return False
    return any(isinstance(part, dict) and part.get("type") == "file"
               for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"])


def parse_pages(value: object, param: str, limit: int) -> tuple[int, ...]:
    """1-based page numbers in the order given, from ``"1-3,7"`` or ``[1, 2, 3, 7]``; ``InvalidRequest``
    (``invalid_pages``) for anything else, a page chosen twice, or more than ``limit`` pages (``too_many_pages``,
    counted before a long range is expanded)."""
    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(f'file.pages {why}: give page numbers from 1, as "1-3,7" or [1, 2, 3, 7]',
                              param=param, code="invalid_pages")

    ranges: list[tuple[int, int]] = []
    if isinstance(value, str):
        for piece in value.split(","):
            match = PAGES_SYNTAX.fullmatch(piece)
            if match is None:
                raise refuse("cannot be read")
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first:
                raise refuse("holds a range that runs backwards")
            ranges.append((first, last))
    elif isinstance(value, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        ranges = [(item, item) for item in value]
    else:
        raise refuse("must be a string or a list of integers")
    if not ranges:
        raise refuse("is empty")
    if any(first < 1 for first, _ in ranges):
        raise refuse("holds a page number below 1")
    count = sum(last - first + 1 for first, last in ranges)
    if count > limit:
        raise InvalidRequest(f"{count} pages were chosen, more than the {limit} a request may send",
                             param=param, code="too_many_pages")
    pages = tuple(page for first, last in ranges for page in range(first, last + 1))
    if len(set(pages)) != len(pages):
        raise refuse("chooses a page twice")
    return pages


def document_name(filename: object, number: int) -> str:
    """The name the model is told: the client's file name if printable and at most 100 characters (its quotes,
    brackets and angle brackets as look-alikes: ``NAME_LOOKALIKES``), else "document <number>" (the document's place
    in the request)."""
    if isinstance(filename, str) and filename.strip() and len(filename) <= MAX_NAME_CHARS and filename.isprintable():
        return filename.translate(NAME_LOOKALIKES)
    return f"document {number}"


def split_file_data(file_data: object, param: str) -> tuple[str, str | None]:
    """The base64 of ``file_data`` (line breaks removed) and the media type a ``data:`` URL declares (lower case,
    parameters left out; None for bare base64)."""
    if not isinstance(file_data, str) or not file_data:
        raise InvalidRequest("file.file_data must be a non-empty string: the document as a data: URL or base64",
                             param=param, code="invalid_file")
    declared = None
    if file_data[:5].lower() == "data:":
        header, comma, file_data = file_data.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InvalidRequest("a document data: URL must be base64 (data:application/pdf;base64,...)",
                                 param=param, code="invalid_document")
        declared = header[5:].split(";", 1)[0].strip().lower()
    if "\n" in file_data or "\r" in file_data:  # MIME-style lines, as images allow them
        file_data = file_data.replace("\r", "").replace("\n", "")
    return file_data, declared


def document_kind(raw: bytes, declared: str | None, param: str) -> Kind:
    """What ``raw`` is, from its first bytes; ``InvalidRequest`` (``unsupported_document``) when it is neither a PDF
    nor a TIFF, or a declared media type disagrees. Messages name only types from this module's lists."""
    if declared is not None and declared not in UNDECLARED and declared not in MEDIA_TYPES:
        if declared.startswith("image/"):
            raise InvalidRequest(f"{NOT_PDF_OR_TIFF} (application/pdf, image/tiff); {IMAGES_ELSEWHERE}",
                                 param=param, code="unsupported_document")
        raise InvalidRequest(f"{NOT_PDF_OR_TIFF}: the data: URL must declare application/pdf or image/tiff",
                             param=param, code="unsupported_document")
    kind: Kind | None = None
    if raw[:4] in TIFF_MAGIC:
        kind = "tiff"
    elif raw.find(b"%PDF", 0, PDF_HEADER_WINDOW + 4) >= 0:
        kind = "pdf"
    if kind is None:
        image = _image_format(raw)
        if image is not None:
            raise InvalidRequest(f"the document is a {image} image: {NOT_PDF_OR_TIFF}; {IMAGES_ELSEWHERE}",
                                 param=param, code="unsupported_document")
        raise InvalidRequest(f"the document is neither a PDF nor a TIFF: {NOT_PDF_OR_TIFF}", param=param,
                             code="unsupported_document")
    if declared in MEDIA_TYPES and MEDIA_TYPES[declared] != kind:
        raise InvalidRequest(f"the document is a {kind.upper()}, but its data: URL declares {declared}",
                             param=param, code="unsupported_document")
    return kind


def _image_format(raw: bytes) -> str | None:
    """The name of the image format of ``raw`` if Pillow knows it from its header (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(raw), formats=[name for name in FORMATS.values() if name != "TIFF"]) as image:
            return str(image.format)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


class Documents:
    """The documents step of the request path (``expand``) and the console's preview (``preview``)."""

    def __init__(self, settings: DocumentSettings, screening: ScreeningSettings, engine: EngineLimits,
                 pool: RenderPool, context_of: Callable[[str], int | None], metrics: GatewayMetrics,
                 pixels_per_token: int) -> None:
        if settings.enabled and settings.page_format not in screening.image_formats:
            raise ConfigError(f"documents.page_format {settings.page_format} is not among screening.image_formats, "
                              "which would refuse every rendered page: add it there, or change the page format")
        self._settings = settings
        self._screening = screening
        self._engine = engine
        self._pool = pool
        self._context_of = context_of
        self._metrics = metrics
        self._ppt = pixels_per_token
        self.image_limit = engine.images_per_request(screening.max_images_per_request)

    async def expand(self, payload: dict[str, Any]) -> int:
        """Replace every ``file`` part of ``payload``'s messages by its pages (see the module docstring); the bytes
        the parts grew by (for the next step's choice of screening in a thread). ``InvalidRequest`` and its kinds,
        or ``Overloaded``, before anything is changed."""
        messages: list[Any] = payload["messages"]
        parts = await self._checked_parts(messages)
        budget = PageBudget(self._engine, self._ppt, max_pages=self._settings.max_pages,
                            image_limit=self.image_limit, other_images=_image_parts(messages),
                            max_image_pixels=self._screening.max_image_pixels, room=self._room(payload))
        least = [(part.name, len(part.pages) if part.pages else 1) for part in parts]
        replacements: list[list[dict[str, Any]]] = []
        for index, part in enumerate(parts):
            limits = budget.limits(part.name, len(part.pages) if part.pages else None, least[index + 1:],
                                   part.where)
            document = await self._render(RenderJob(
                part.data, part.kind, part.pages, limits.max_pages, limits.max_pixels_per_page,
                limits.min_pixels_per_page, limits.total_pixels, part.text_layer), "request", part.where)
            pages, labels, texts = self._pages(part, document)
            budget.spend(part.name, [(page.width, page.height) for page in document.pages], labels, texts,
                         part.where)
            replacements.append(pages)
        added = 0
        for part, pages in zip(parts, replacements, strict=True):
            place = next(i for i, candidate in enumerate(part.content) if candidate is part.part)
            part.content[place:place + 1] = pages
            added += sum(len(page["image_url"]["url"]) if page["type"] == "image_url" else len(page["text"])
                         for page in pages)
        return added

    async def preview(self, body: bytes) -> dict[str, Any]:
        """The console's preview: ``{"file_data": ...}`` -> the page count and a thumbnail of each of the first
        ``documents.max_pages`` pages (``truncated`` when there are more)."""
        self._check_enabled("file_data")
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidRequest('the body must be JSON: {"file_data": "data:application/pdf;base64,..."}',
                                 code="invalid_json") from None
        if not isinstance(request, dict) or set(request) != {"file_data"}:
            raise InvalidRequest('the body must be {"file_data": "<the document as a data: URL or base64>"}',
                                 code="invalid_request")
        data, kind = await self._document(request["file_data"], "file_data")
        # With pages=None, a thumbnail job renders the first max_pages pages and counts them all (render_pool).
        thumbnail = self._settings.thumbnail_pixels
        job = RenderJob(data, kind, None, self._settings.max_pages, thumbnail, min(self._engine.min_pixels, thumbnail),
                        None, False, thumbnail=True)
        document = await self._render(job, "preview", "file_data")
        pages = [{"number": page.number, "width": page.width, "height": page.height,
                  "thumbnail": f"data:{page.media_type};base64,{base64.b64encode(page.image).decode()}"}
                 for page in document.pages]
        return {"page_count": document.page_count, "pages": pages, "truncated": document.page_count > len(pages)}

    def _check_enabled(self, where: str) -> None:
        if not self._settings.enabled:
            raise InvalidRequest("documents (file parts) are turned off on this server (documents.enabled); "
                                 f"send each page as an image: {IMAGES_ELSEWHERE}", param=where,
                                 code="documents_disabled")

    async def _checked_parts(self, messages: list[Any]) -> list[FilePart]:
        """Every ``file`` part, its shape checked and its document decoded and identified, in request order."""
        parts: list[FilePart] = []
        for m, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for p, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "file":
                    parts.append(await self._checked(part, content, f"messages[{m}].content[{p}]", len(parts) + 1))
        return parts

    async def _checked(self, part: dict[str, Any], content: list[Any], where: str, number: int) -> FilePart:
        self._check_enabled(where)
        unknown = set(part) - PART_FIELDS
        if unknown:
            raise InvalidRequest(f"{where} has a field this server does not accept: '{shown_name(min(unknown))}'"
                                 " (a file part is {\"type\": \"file\", \"file\": {...}})", param=where,
                                 code="field_not_allowed")
        file = part.get("file")
        if not isinstance(file, dict):
            raise InvalidRequest(f'{where}.file must be an object: {{"file_data": ..., "filename": ...}}',
                                 param=where, code="invalid_file")
        unknown = set(file) - FILE_FIELDS
        if unknown:
            raise InvalidRequest(f"{where}.file has a field this server does not accept: '{shown_name(min(unknown))}' "
                                 "(file_data, filename, pages, text_layer)", param=f"{where}.file",
                                 code="field_not_allowed")
        if "file_id" in file:
            raise InvalidRequest("file_id is not supported: Airlock keeps no uploaded files; send the document "
                                 "itself in file.file_data (a data:application/pdf;base64,... URL, or base64)",
                                 param=f"{where}.file.file_id", code="file_id_not_supported")
        if "file_data" not in file:
            raise InvalidRequest(f"{where}.file.file_data is missing: the document as a data: URL or base64",
                                 param=f"{where}.file", code="invalid_file")
        if "filename" in file and not isinstance(file["filename"], str):
            raise InvalidRequest(f"{where}.file.filename must be a string", param=f"{where}.file.filename",
                                 code="invalid_file")
        text_layer = file.get("text_layer", self._settings.text_layer)
        if not isinstance(text_layer, bool):
            raise InvalidRequest(f"{where}.file.text_layer must be true or false", param=f"{where}.file.text_layer",
                                 code="invalid_file")
        pages = None
        if file.get("pages") is not None:
            pages = parse_pages(file["pages"], f"{where}.file.pages", self._settings.max_pages)
        data, kind = await self._document(file["file_data"], f"{where}.file.file_data")
        return FilePart(content, part, where, data, kind, document_name(file.get("filename"), number), pages,
                        text_layer)

    async def _document(self, file_data: object, param: str) -> tuple[bytes, Kind]:
        """The document's bytes and kind; large ones decoded in a thread."""
        if isinstance(file_data, str) and len(file_data) > DECODE_INLINE_CHARS:
            return await anyio.to_thread.run_sync(self._decoded, file_data, param)
        return self._decoded(file_data, param)

    def _decoded(self, file_data: object, param: str) -> tuple[bytes, Kind]:
        encoded, declared = split_file_data(file_data, param)
        raw = decode_base64(encoded, self._settings.max_bytes, param, DOCUMENT)
        return raw, document_kind(raw, declared, param)

    def _room(self, payload: dict[str, Any]) -> int | None:
        """Tokens of the model's context the pages may take (``page_budget``'s rule); None when it is unknown."""
        context = self._context_of(payload["model"])
        if context is None:
            return None
        messages = payload["messages"]
        answer = payload.get("max_tokens") or payload.get("max_completion_tokens") or \
            self._engine.answer_reserve_tokens
        others = _image_parts(messages) * (self._engine.max_pixels // self._ppt + IMAGE_MARKER_TOKENS)
        return int(context - answer - text_tokens(text_length(messages, utf8_bytes)) - others
                   - TOKENS_PER_MESSAGE * len(messages))

    def _pages(self, part: FilePart, document: RenderedDocument) -> tuple[list[dict[str, Any]], int, int]:
        """The parts that replace ``part`` (label, image and text layer of each page, in order), and the UTF-8 bytes
        of their labels and of their text layers."""
        parts: list[dict[str, Any]] = []
        labels = texts = 0
        for page in document.pages:
            name = label(part.name, page.number, document.page_count)
            parts.append({"type": "text", "text": name})
            labels += utf8_bytes(name)
            url = f"data:{page.media_type};base64,{base64.b64encode(page.image).decode()}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
            if part.text_layer and page.text and page.text.strip():
                parts.append({"type": "text", "text": page.text})
                texts += utf8_bytes(page.text)
        return parts, labels, texts

    async def _render(self, job: RenderJob, purpose: Literal["request", "preview"], where: str) -> RenderedDocument:
        """``pool.render``, measured: time (the wait for a worker included), outcome and pages. A refusal names the
        part (``where``) the document came in."""
        started = time.perf_counter()
        outcome, pages = "cancelled", 0
        try:
            document = await self._pool.render(job)
            outcome, pages = "rendered", len(document.pages)
            return document
        except InvalidRequest as refusal:
            outcome = "unprocessable" if isinstance(refusal, UnprocessableDocument) else "refused"
            refusal.param = refusal.param or where
            raise
        except Overloaded:
            outcome = "busy"
            raise
        except Exception:
            outcome = "failed"
            raise
        finally:
            self._metrics.document_rendered(purpose, outcome, time.perf_counter() - started, pages)


def _image_parts(messages: list[Any]) -> int:
    """``image_url`` parts in the messages (shapes are screening's to check)."""
    return sum(1 for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"] if isinstance(part, dict) and part.get("type") == "image_url")
