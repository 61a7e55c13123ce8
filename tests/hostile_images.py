"""Valid images built to be slow to check: many small pieces before the pixels, or text that inflates. Every one
follows its format's rules (a decoder opens it); only the amount of work per byte is hostile."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def jpeg_with_fill(count: int) -> bytes:
    """``count`` fill bytes after the start-of-image marker: ITU T.81 (B.1.1.2) allows any number of 0xFF before a
    marker, and Pillow reads them one at a time."""
    raw = jpeg()
    return raw[:2] + b"\xff" * count + raw[2:]


def jpeg_with_empty_comments(count: int) -> bytes:
    """``count`` empty COM segments (0xFFFE, length 2) after the start-of-image marker."""
    raw = jpeg()
    return raw[:2] + b"\xff\xfe\x00\x02" * count + raw[2:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 over type and data (PNG, 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 40, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def png_with_chunks_before_pixels(chunks: list[bytes]) -> bytes:
    """A PNG with ``chunks`` between its header chunk (IHDR, always first: 8 + 25 bytes in) and the rest."""
    raw = png()
    return raw[:33] + b"".join(chunks) + raw[33:]


def png_with_private_chunks(count: int) -> bytes:
    """``count`` empty ancillary private chunks ("prIv": lower case first letter, ancillary; PNG, 5.4)."""
    return png_with_chunks_before_pixels([png_chunk(b"prIv", b"")] * count)


def png_with_text_bomb(count: int, inflated: int = 1024 * 1024) -> bytes:
    """``count`` zTXt chunks, each of about 1 KB that inflates to ``inflated`` bytes of text."""
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * inflated, 9))
    return png_with_chunks_before_pixels([text] * count)


def png_with_idat_chunks_of(size: int, image: bytes) -> bytes:
    """``image`` (a PNG) with its pixel data cut into IDAT chunks of ``size`` bytes, as other encoders write them
    (libpng: 8 KiB by default)."""
    position, head, pixels, tail = 8, [image[:8]], b"", []
    while position < len(image):
        (length,) = struct.unpack(">I", image[position:position + 4])
        kind, data = image[position + 4:position + 8], image[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IDAT":
            pixels += data
        else:
            (tail if pixels else head).append(png_chunk(kind, data))
    idat = [png_chunk(b"IDAT", pixels[start:start + size]) for start in range(0, len(pixels), size)]
    return b"".join(head + idat + tail)
