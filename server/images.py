"""Images in requests: ``data:`` URLs only, checked from their header before anything decodes them.

vLLM would fetch an ``http(s)://`` URL itself (there is no switch to stop it) and would decode whatever bytes
arrive; here the format, the byte size and the pixel count are known before a single pixel is decoded, so a
decompression bomb costs nothing but the reading of its header.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequest

# Pillow format name -> the name users know.
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}


@dataclass(frozen=True)
class ImageLimits:
    formats: frozenset[str]  # lower-case names from FORMATS
    max_bytes: int
    max_pixels: int


def check_image_url(url: object, limits: ImageLimits, param: str) -> int:
    """The image's pixel count; ``InvalidRequest`` unless ``url`` is a ``data:`` URL holding an allowed, small
    enough image."""
    if not isinstance(url, str):
        raise InvalidRequest("image_url.url must be a string", param=param, code="invalid_image")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        shown = scheme + ":" if scheme in {"http", "https", "file", "ftp", "s3", "gs"} else "that kind of"
        raise InvalidRequest(
            f"images must be sent inline as data: URLs (base64); {shown} URLs are not fetched by this server",
            param=param, code="image_url_not_allowed",
        )
    header, comma, encoded = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidRequest("an image data: URL must be base64 (data:image/png;base64,...)", param=param,
                             code="invalid_image")
    if len(encoded) * 3 // 4 > limits.max_bytes + 3:  # known before decoding
        raise InvalidRequest(_too_big(len(encoded) * 3 // 4, limits.max_bytes), param=param, code="image_too_large")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("the image is not valid base64", param=param, code="invalid_image") from exc
    if len(raw) > limits.max_bytes:
        raise InvalidRequest(_too_big(len(raw), limits.max_bytes), param=param, code="image_too_large")
    return _check_header(raw, limits, param)


def _check_header(raw: bytes, limits: ImageLimits, param: str) -> int:
    allowed = [FORMATS[name] for name in sorted(limits.formats)]
    with warnings.catch_warnings():
        # Pillow's own bomb guard warns (or raises far above our limit): our pixel limit below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(raw), formats=allowed) as image:  # reads the header only
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise InvalidRequest(
                        f"image too large: {width}x{height} is {width * height / 1e6:.1f} MP, limit "
                        f"{limits.max_pixels / 1e6:.1f} MP", param=param, code="image_too_large",
                    )
                image.verify()  # structure and checksums, without decoding pixels
                return width * height
        except InvalidRequest:
            raise
        except Image.DecompressionBombError as exc:
            raise InvalidRequest(f"image too large: limit {limits.max_pixels / 1e6:.1f} MP", param=param,
                                 code="image_too_large") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            names = ", ".join(sorted(limits.formats)).upper()
            raise InvalidRequest(f"the image is damaged or not in an accepted format ({names})", param=param,
                                 code="invalid_image") from exc


def _too_big(size: int, limit: int) -> str:
    return f"image too large: {size / 1e6:.1f} MB, limit {limit / 1e6:.1f} MB"
