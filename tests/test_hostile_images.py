"""Checking an image's header costs a bounded amount of work, whatever the image (server/images.py, ``_Reads`` and
``limit_png_text``): valid images built to be slow to check are refused after a bounded number of Pillow's reads, and
real images of every allowed format, from the encoders people use, pass. No timing is asserted: the refusals prove
the bounds (the README's Performance section gives the times)."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image, ImageCms

from server.errors import InvalidRequest
from server.images import ImageLimits, _Reads, check_image_url, limit_png_text

from .document_files import data_url
from .hostile_images import (
    jpeg_with_empty_comments,
    jpeg_with_fill,
    png_with_idat_chunks_of,
    png_with_private_chunks,
    png_with_text_bomb,
)

LIMITS = ImageLimits(frozenset({"png", "jpeg", "webp", "gif", "bmp", "tiff"}), 10_000_000, 25_000_000, 200.0)
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
        "TIFF": "image/tiff"}


@pytest.fixture(scope="module", autouse=True)
def gateway_png_limits() -> None:
    limit_png_text()  # as Screening sets it when the gateway is built


def checked(raw: bytes, mime: str) -> tuple[int, int]:
    return check_image_url(data_url(raw, mime), LIMITS, "messages[0].content[0]").size


def refusal(raw: bytes, mime: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as refused:
        checked(raw, mime)
    assert refused.value.code == "invalid_image"
    return refused.value


@pytest.mark.parametrize("raw", [jpeg_with_fill(200_000), jpeg_with_fill(2_000), jpeg_with_empty_comments(50_000)],
                         ids=["200 KB of fill", "2 KB of fill", "50,000 empty comments"])
def test_a_jpeg_in_too_many_pieces_is_refused(raw: bytes) -> None:
    assert Image.open(io.BytesIO(raw)).size == (64, 48)  # valid: Pillow itself opens it, given the time
    assert "too many small pieces" in refusal(raw, "image/jpeg").message


def test_a_png_in_too_many_chunks_is_refused() -> None:
    raw = png_with_private_chunks(20_000)
    assert Image.open(io.BytesIO(raw)).size == (64, 48)
    assert "too many small pieces" in refusal(raw, "image/png").message


def test_a_png_whose_text_inflates_past_a_mebibyte_is_refused_and_one_with_some_text_is_not() -> None:
    refusal(png_with_text_bomb(2), "image/png")
    assert checked(png_with_text_bomb(1, inflated=64 * 1024), "image/png") == (64, 48)


def test_the_read_budget_grows_with_the_image() -> None:
    """256 reads for any header, then one per 256 bytes: a 1 MB image may be read in 4,162 pieces, no more."""
    assert _Reads(b"").reads_left == 256
    assert _Reads(bytes(1_000_000)).reads_left == 256 + 1_000_000 // 256
    # Refused at the first read past it: 1 KB of fill in a 1.6 KB JPEG needs ~1,000 reads, its budget is 262.
    assert "too many small pieces" in refusal(jpeg_with_fill(1_000), "image/jpeg").message
    assert checked(jpeg_with_fill(200), "image/jpeg") == (64, 48)


def noise(size: tuple[int, int] = (700, 500)) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def real_images() -> list[tuple[str, bytes, str]]:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x9286] = "Canon", "EOS R6", b"x" * 30_000  # make, model, user comment
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pillow_png = saved(noise(), "PNG")
    return [
        ("camera JPEG with EXIF and a colour profile", saved(noise(), "JPEG", quality=95, exif=exif.tobytes(),
                                                            icc_profile=srgb), "JPEG"),
        ("progressive JPEG", saved(noise(), "JPEG", progressive=True), "JPEG"),
        ("PNG from Pillow", pillow_png, "PNG"),
        ("PNG in libpng's 8 KiB IDAT chunks", png_with_idat_chunks_of(8192, pillow_png), "PNG"),
        ("PNG in 1 KiB IDAT chunks", png_with_idat_chunks_of(1024, pillow_png), "PNG"),
        ("GIF with a comment", saved(noise().convert("P"), "GIF", comment=b"scanned at the front desk" * 80), "GIF"),
        ("WebP", saved(noise(), "WEBP"), "WEBP"),
        ("BMP", saved(noise(), "BMP"), "BMP"),
        ("TIFF, LZW", saved(noise(), "TIFF", compression="tiff_lzw"), "TIFF"),
    ]


@pytest.mark.parametrize(("name", "raw", "fmt"), real_images(), ids=[name for name, _, _ in real_images()])
def test_real_images_of_every_allowed_format_pass(name: str, raw: bytes, fmt: str) -> None:
    assert checked(raw, MIME[fmt]) == (700, 500), name


@pytest.mark.parametrize(("fmt", "named"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_a_valid_image_in_a_format_not_accepted_is_named_as_such(fmt: str, named: str) -> None:
    raw = io.BytesIO()
    Image.new("RGB", (32, 24), "white").save(raw, fmt)
    only_defaults = ImageLimits(frozenset({"png", "jpeg", "webp"}), 10_000_000, 25_000_000, 200.0)
    with pytest.raises(InvalidRequest) as refused:
        check_image_url(data_url(raw.getvalue(), MIME[fmt]), only_defaults, "messages[0].content[0]")
    assert refused.value.code == "invalid_image"
    assert refused.value.message == f"{named} images are not accepted by this server (accepted: JPEG, PNG, WEBP)"
    # A damaged image of an accepted format is still called damaged, and text that begins as a BMP does is no BMP.
    for damaged in (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"BMW owner's manual, chapter 1: the engine"):
        with pytest.raises(InvalidRequest) as refused:
            check_image_url(data_url(damaged, "image/png"), only_defaults, "m")
        assert "damaged or not in an accepted format" in refused.value.message
