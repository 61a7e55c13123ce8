"""What screening one image costs the gateway: parsing the request's JSON and ``Screening.screen`` (base64 decode,
header and structure checks, the body written out again), timed in this process on real image files."""

from __future__ import annotations

import base64
import io
import statistics
import time
from dataclasses import dataclass

from PIL import Image

from server.auth.principal import local_principal
from server.config import PrivacySettings, ScreeningSettings
from server.payload import parse_request
from server.screening import Screening
from server.tenancy import TenantSalts

from .load import chat_request

SIZES = {"small (512x512)": 512, "4 MP (2048x2048)": 2048, "25 MP (5000x5000)": 5000}


def photo_like(side: int, image_format: str) -> bytes:
    """A textured grey image (noise, scaled up smoothly): compresses like a scan, not like a blank page."""
    image = Image.effect_noise((side // 8, side // 8), 64).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return out.getvalue()


def chat_body(image: bytes, image_format: str, *, stream: bool = False, max_tokens: int = 16) -> bytes:
    url = f"data:image/{image_format.lower()};base64,{base64.b64encode(image).decode()}"
    return chat_request([{"type": "image_url", "image_url": {"url": url}},
                         {"type": "text", "text": "What is the total of this invoice?"}],
                        stream=stream, max_tokens=max_tokens)


@dataclass(frozen=True)
class ScreeningCost:
    image: str
    image_format: str
    image_mb: float
    median_ms: float
    max_ms: float


def measure(repeats_for_small: int = 200) -> list[ScreeningCost]:
    # Limits raised so that every size is measured (25 MP PNGs are above the default max_image_bytes).
    settings = ScreeningSettings(max_image_bytes=64 * 1024 * 1024, max_image_pixels=26_000_000)
    screening = Screening(settings, TenantSalts(PrivacySettings()))
    principal = local_principal("bench", {})
    results = []
    for name, side in SIZES.items():
        for image_format in ("JPEG", "PNG"):
            image = photo_like(side, image_format)
            body = chat_body(image, image_format)
            repeats = max(5, repeats_for_small * 512 * 512 // (side * side))
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                screening.screen("chat", parse_request(body, settings.max_json_depth), principal)
                times.append(time.perf_counter() - started)
            results.append(ScreeningCost(name, image_format, len(image) / 1e6, statistics.median(times) * 1e3,
                                         max(times) * 1e3))
    return results
