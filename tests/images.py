"""Small real images, encoded the way an OpenAI client sends them (data: URLs)."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw


def image_bytes(fmt: str, size: tuple[int, int] = (96, 64), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).rectangle((8, 8, size[0] // 2, size[1] // 2), fill=(20, 20, 220))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def data_url(fmt: str, size: tuple[int, int] = (96, 64)) -> str:
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(image_bytes(fmt, size)).decode()}"


def image_part(fmt: str, size: tuple[int, int] = (96, 64)) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": data_url(fmt, size)}}
