"""Images in requests: ``data:`` URLs only, checked from their header before anything decodes them.

vLLM would fetch an ``http(s)://`` URL itself (there is no switch to stop it) and would decode whatever bytes
arrive; here the format, the byte size, the pixel count and the aspect ratio are known before a single pixel is
decoded, so a decompression bomb costs nothing but the reading of its header.

The aspect ratio is Qwen-VL's own rule: transformers' ``smart_resize`` (``models/qwen2_vl/
image_processing_qwen2_vl.py``, used by Qwen2-VL, Qwen2.5-VL and, through vLLM's ``qwen3_vl.py``, Qwen3-VL)
raises ``ValueError("absolute aspect ratio must be smaller than 200")`` when ``max(h, w) / min(h, w) > 200``, which
vLLM reports as "Failed to apply Qwen3VLProcessor". There is no lower bound on size to check: the same function
scales a small image up to ``min_pixels`` (transformers 5.x; 4.x refused a side shorter than 28 pixels), and the
demo engine answers a 1x1 image.

Base64 is decoded by pybase64 (SIMD; a dependency of vLLM's already): 0.03 ms for the 675 KB of one A4 page scanned
at 200 dpi (``tests.bench.department.scanned_invoice``), where ``binascii.a2b_base64`` took 1.3-1.6 ms, one of the
largest parts of the ~8 ms of gateway CPU such a request cost. With ``validate=True`` it is vLLM's own decoder
(vllm/multimodal/media/image.py), and it accepts what ``binascii.a2b_base64(strict_mode=True)`` did, with the same
bytes, but for surplus '=' after a complete group of four ("QUJD="), which binascii took and vLLM refuses: now
refused here too, as a wrong padding (tests/test_forwarded_body.py compares the two on generated input). Documents'
``file_data`` goes through the same ``decode_base64``, so it is refused there as well: no encoder writes it, and one
rule for both is simpler to state than a leniency that only documents would have.
"""

from __future__ import annotations

import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import pybase64
from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequest

_NOT_ALPHABET = re.compile(rb"[^A-Za-z0-9+/=]")
# Pillow format name -> the name users know.
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}


def load_image_plugins() -> None:
    """Pillow imports its format plugins the first time it opens an image: the first image checked after a start took
    76 ms here (0.2 ms the next), and the gateway's first page in the department benchmark 90 ms of screening, its
    pages' p99 at idle. Called as the gateway is built: all of Pillow's plugins, 0.26 s once (only the allowed
    formats are ever opened: ``_check_header`` names them)."""
    Image.init()


# What a PNG's text chunks (tEXt, zTXt, iTXt) may hold in all, decompressed: Pillow reads them as it opens the image
# and allows 64 MiB by default (``PngImagePlugin.MAX_TEXT_MEMORY``, its documented guard against decompression
# bombs). A valid 0.1 MB PNG of zTXt chunks that inflate to 1 MiB each took 83 ms to check here, all of it zlib. Real
# images carry kilobytes (an XMP packet, a comment, a colour profile's name); 1 MiB bounds the inflating to two
# chunks' worth (the limit is checked after each chunk): 5 to 7 ms here, with other work on the machine.
PNG_TEXT_BYTES = 1024 * 1024


def limit_png_text() -> None:
    """Pillow's limit on a PNG's decompressed text, per chunk and in all, set to ``PNG_TEXT_BYTES``: more is refused
    as a damaged image (Pillow raises ``ValueError``). Imported here: importing a plugin registers it, which
    ``load_image_plugins`` does for all of them as the gateway is built, not at this module's import."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = PNG_TEXT_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES


@dataclass(frozen=True)
class ImageLimits:
    formats: frozenset[str]  # lower-case names from FORMATS
    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float


class CheckedImage(NamedTuple):
    """An image that passed: its width and height, the URL to forward, and that URL's base64 (what follows its first
    comma) as ASCII bytes, for ``forwarded_body`` to write as it is."""

    size: tuple[int, int]
    url: str
    base64: bytes | memoryview


def check_image_url(url: object, limits: ImageLimits, param: str) -> CheckedImage:
    """The image's width and height and the URL to forward (``url`` itself, or with its ``;base64`` marker in lower case
    and without line breaks in its base64, which vLLM refuses); ``InvalidRequest`` unless ``url`` is a ``data:`` URL
    holding an allowed, small enough image. The base64 (hundreds of kilobytes) is copied once, to ASCII bytes, and
    sliced without copying: each copy of a buffer that large is also a fresh mapping to fault in (``runtime``)."""
    if not isinstance(url, str):
        raise InvalidRequest("image_url.url must be a string", param=param, code="invalid_image")
    colon = url.find(":")  # not split(): that would copy the hundreds of kilobytes after the colon
    scheme = url[:colon].lower() if colon >= 0 else ""
    if scheme != "data":
        shown = scheme + ":" if scheme in {"http", "https", "file", "ftp", "s3", "gs"} else "that kind of"
        raise InvalidRequest(
            f"images must be sent inline as data: URLs (base64); {shown} URLs are not fetched by this server",
            param=param, code="image_url_not_allowed",
        )
    comma = url.find(",")
    header = url[:comma]
    if comma < 0 or not header.lower().endswith(";base64"):
        raise InvalidRequest("an image data: URL must be base64 (data:image/png;base64,...)", param=param,
                             code="invalid_image")
    if not header.endswith(";base64"):
        # RFC 2397's markers ignore case, but vLLM reads only ";base64" (NotImplementedError, a 500, otherwise).
        header = header[:-len(";base64")] + ";base64"
        url = header + url[comma:]
    if url.find("\n", comma) >= 0 or url.find("\r", comma) >= 0:
        # Base64 wrapped in lines (MIME style: 76 characters and CR LF, the default of several encoders): the line
        # breaks go, nothing else does (anything else outside the alphabet is refused below).
        url = header + url[comma:].replace("\r", "").replace("\n", "")
    if url.isascii():
        encoded: bytes | memoryview = memoryview(url.encode("ascii"))[comma + 1:]
        raw = decode_ascii_base64(encoded, limits.max_bytes, param, IMAGE)
    else:  # a header in other characters (the base64 in them is refused)
        raw = decode_base64(url[comma + 1:], limits.max_bytes, param, IMAGE)
        encoded = url[comma + 1:].encode("ascii")
    return CheckedImage(_check_header(raw, limits, param), url, encoded)


@dataclass(frozen=True)
class Inline:
    """What travels base64-encoded in a request (an image, a document), as its refusals name it."""

    noun: str  # "image", "document": the messages say "the image is not valid base64", "image too large"
    invalid_code: str  # the code of a refusal for bytes that are not base64
    too_large_code: str  # ... and for more bytes than the limit
    too_large: type[InvalidRequest] = InvalidRequest  # ... and its class (a document's is a 413)


IMAGE = Inline("image", "invalid_image", "image_too_large")


def decode_base64(encoded: str, max_bytes: int, param: str, kind: Inline) -> bytes:
    """The bytes of ``encoded`` (standard base64, without line breaks), or ``InvalidRequest`` saying why it is not
    base64 or is larger than ``max_bytes``: refused from its length before anything is decoded, and again exactly
    once decoded."""
    try:
        data = encoded.encode("ascii")  # the one copy a2b_base64 would make of a str anyway
    except UnicodeEncodeError as exc:
        raise InvalidRequest(_not_base64(kind, "it holds characters other than A-Z, a-z, 0-9, + and /"), param=param,
                             code=kind.invalid_code) from exc
    return decode_ascii_base64(data, max_bytes, param, kind)


def decode_ascii_base64(data: bytes | memoryview, max_bytes: int, param: str, kind: Inline) -> bytes:
    """``decode_base64`` of base64 already in ASCII bytes."""
    if len(data) * 3 // 4 > max_bytes + 3:  # known before decoding
        raise kind.too_large(_too_big(kind, len(data) * 3 // 4, max_bytes), param=param, code=kind.too_large_code)
    try:
        raw = pybase64.b64decode(data, validate=True)  # as vLLM decodes it
    except binascii.Error as exc:
        data = bytes(data)  # a refusal: `in` below needs bytes
        if _NOT_ALPHABET.search(data):
            if b"-" in data or b"_" in data:
                why = "it looks URL-safe ('-' and '_'); use the standard alphabet (+ and /)"
            else:
                why = "it holds characters other than A-Z, a-z, 0-9, + and / (line breaks are allowed)"
        else:
            why = "its length or '=' padding is wrong (was it cut short?)"
        raise InvalidRequest(_not_base64(kind, why), param=param, code=kind.invalid_code) from exc
    if len(raw) > max_bytes:
        raise kind.too_large(_too_big(kind, len(raw), max_bytes), param=param, code=kind.too_large_code)
    return raw


class _TooFragmented(Exception):
    """Pillow read the image in more pieces than ``_Reads`` allows."""


class _Reads(io.BytesIO):
    """An image's bytes for Pillow, in at most ``READS_FREE + len / BYTES_PER_READ`` reads.

    Pillow's header parsers are Python, and a piece costs about a microsecond: a JPEG's fill bytes (ITU T.81, B.1.1.2:
    any number of 0xFF before a marker) are read one at a time, an empty marker or a PNG chunk in two or three reads.
    A valid JPEG of 1 MB made of fill bytes took 440 ms to check, 214 ms at 248 KB, each on the event loop's thread
    (``request_path.SCREEN_INLINE_BYTES``) or a worker's, found by a review. Real images take far fewer reads: 9 to
    45 for JPEG, GIF, WebP, BMP and TIFF from Pillow and a scanner, one per 21 KB for Pillow's PNG and one per 2.7 KB
    for libpng's (8 KiB IDAT chunks, which ``verify`` reads to the end), one per 345 bytes with 1 KiB IDAT chunks.
    So at 256 bytes a read (and 256 reads for any header) no real image is refused, and a crafted one costs the check
    at most about 5 ms a MB.
    """

    READS_FREE = 256
    BYTES_PER_READ = 256

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self.reads_left = self.READS_FREE + len(raw) // self.BYTES_PER_READ

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads_left -= 1
        if self.reads_left < 0:
            raise _TooFragmented
        return super().read(size)


def _check_header(raw: bytes, limits: ImageLimits, param: str) -> tuple[int, int]:
    allowed = [FORMATS[name] for name in sorted(limits.formats)]
    with warnings.catch_warnings():
        # Pillow's own bomb guard warns (or raises far above our limit): our pixel limit below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(_Reads(raw), formats=allowed) as image:  # reads the header only
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise InvalidRequest(
                        f"image too large: {width}x{height} is {width * height / 1e6:.1f} MP, limit "
                        f"{limits.max_pixels / 1e6:.1f} MP", param=param, code="image_too_large",
                    )
                if max(width, height) > limits.max_aspect_ratio * max(min(width, height), 1):
                    raise InvalidRequest(
                        f"image aspect ratio too extreme: {width}x{height} is more than {limits.max_aspect_ratio:g}:1,"
                        " the model's limit; pad or crop it", param=param, code="image_aspect_ratio",
                    )
                if image.format == "TIFF" and getattr(image, "is_animated", False):
                    # vLLM opens an image part with Pillow and loads its first frame only (vllm/multimodal/media/
                    # image.py, ImageMediaIO.load_bytes): the other pages would be dropped without a word. Pillow
                    # sets the flag from the first directory's "next" pointer, without reading further.
                    raise InvalidRequest(
                        "the image is a multi-page TIFF, of which the model would see only the first page: send it "
                        'as a file part ({"type": "file", "file": {"file_data": ...}}), or one image per page',
                        param=param, code="multi_page_image",
                    )
                image.verify()  # structure and checksums, without decoding pixels
                return width, height
        except InvalidRequest:
            raise
        except _TooFragmented as exc:
            raise InvalidRequest(
                "the image is stored in too many small pieces to check (padding, empty markers or chunks): save it "
                "again with an ordinary encoder", param=param, code="invalid_image") from exc
        except Image.DecompressionBombError as exc:
            raise InvalidRequest(f"image too large: limit {limits.max_pixels / 1e6:.1f} MP", param=param,
                                 code="image_too_large") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            names = ", ".join(sorted(limits.formats)).upper()
            sniffed = sniffed_format(raw)
            if sniffed is not None and sniffed not in limits.formats:
                raise InvalidRequest(f"{FORMATS[sniffed]} images are not accepted by this server (accepted: {names})",
                                     param=param, code="invalid_image") from exc
            raise InvalidRequest(f"the image is damaged or not in an accepted format ({names})", param=param,
                                 code="invalid_image") from exc


# The first bytes of each format in ``FORMATS`` (their specifications' signatures; WebP is a RIFF file of type WEBP,
# and a BMP's two letters are followed by its header: see ``sniffed_format``).
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
              (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
# The sizes of a BMP's info header (BITMAPCOREHEADER to BITMAPV5HEADER, as Pillow's BmpImagePlugin reads them).
BMP_INFO_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})


def sniffed_format(raw: bytes) -> str | None:
    """The format ``raw`` says it is by its first bytes (a ``FORMATS`` key), to name a refused one in its message;
    nothing is parsed. "BM" alone is also how text can begin: a BMP has its info header's size at byte 14 too."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    if raw[:2] == b"BM":
        return "bmp" if int.from_bytes(raw[14:18], "little") in BMP_INFO_HEADER_SIZES else None
    return next((name for signature, name in SIGNATURES if raw.startswith(signature)), None)


def _not_base64(kind: Inline, why: str) -> str:
    return f"the {kind.noun} is not valid base64: {why}"


def _too_big(kind: Inline, size: int, limit: int) -> str:
    return f"{kind.noun} too large: {size / 1e6:.1f} MB, limit {limit / 1e6:.1f} MB"
