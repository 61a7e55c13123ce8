"""The canaries an audit sends: a prompt string and an image, each recognisable wherever its bytes end up.

The image carries its own canary three ways: in a PNG text chunk (the raw upload), as pixel bytes (an image
decoded and written out uncompressed), and as a slice of its base64 (the request body as sent). Answers and
the audit's own credential are looked for too, so a spooled response or a logged key is found as well.
"""

from __future__ import annotations

import base64
import io
import secrets
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

# A slice this long of the base64 cannot occur by chance; it starts past the PNG header, which all PNGs share.
BASE64_SLICE = slice(200, 264)
# Answers shorter than this are too likely to occur elsewhere by chance to be worth looking for.
MIN_ANSWER_NEEDLE_BYTES = 12
ANSWER_NEEDLE_BYTES = 32
MIN_PASSWORD_NEEDLE_BYTES = 8


@dataclass
class Canaries:
    """Everything the audit sends that must not be found in a file or a log line, by name."""

    text: str
    image_png: bytes
    needles: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def fresh(cls, credential: str | None = None) -> Canaries:
        token = secrets.token_hex(12)
        text = f"AIRLOCK-AUDIT-CANARY-{token}"
        pixel_marker = f"AIRLOCK-AUDIT-PIXELS-{token}".encode()
        png = _canary_png(f"AIRLOCK-AUDIT-IMAGE-{token}", pixel_marker)
        canaries = cls(text, png)
        canaries.needles = {
            "prompt": text.encode(),
            "image": f"AIRLOCK-AUDIT-IMAGE-{token}".encode(),
            "image pixels": pixel_marker,
            "image base64": base64.b64encode(png)[BASE64_SLICE],
        }
        if credential:
            canaries.needles.update(credential_needles(credential))
        return canaries

    @property
    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.image_png).decode()

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
