"""The body forwarded to an engine: the screened request as compact JSON in UTF-8, byte for byte
``json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()``, written without walking its images.

Why: ``json.dumps`` looks at every character of every string, and the UTF-8 encoding of its result does it again
(slowly, once a prompt holds one non-ASCII character such as "ü"). For one A4 page scanned at 200 dpi (675 KB of
base64; ``tests.bench.department``) that was 1.4 + 0.4 ms of the gateway's CPU, in the one process that relays every
stream. An image's URL, once ``images.check_image_url`` has passed it, is a short header, a comma and base64, whose
alphabet (A-Z, a-z, 0-9, +, /, =) JSON never escapes: so each such URL is set aside (a placeholder holding a random
token no client can know, checked to occur exactly once, else everything is dumped as before), the rest is dumped,
and each URL is written back as its JSON-escaped header followed by the base64's bytes as ``check_image_url`` made
them (its one copy of the base64: every further copy of a buffer that large is a fresh mapping to fault in, see
``runtime``).

Measured with the pybase64 decoding in ``images`` (the real gateway in front of the paced stand-in engine, the
department's request with and without its scanned page, 25 requests/s, CPU time of the gateway process from the
kernel, alternating with the previous code, 30 Nov 2026): the gateway's CPU for an image request beyond a text one
went from 7.2-11.0 ms to 3.0-4.1 ms, its minor page faults from ~1,500 to ~430 a request.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ForwardedBody:
    """Writes forwarded bodies; its placeholders' token is made once, at random, and never leaves the process."""

    def __init__(self) -> None:
        self._token = secrets.token_hex(16)

    def encode(self, payload: dict[str, Any],
               images: Sequence[tuple[dict[str, Any], bytes | memoryview]] = ()) -> bytes:
        """``payload`` as compact JSON (UTF-8); ``payload`` is left as it was. ``images``: the ``image_url`` objects
        in ``payload`` whose ``url`` and base64 ``images.check_image_url`` returned (``CheckedImage``: a data URL,
        and what follows its first comma as ASCII bytes), each with that base64."""
        if not images:
            return _dumps(payload).encode()
        urls = [image["url"] for image, _ in images]
        marks = [f'"airlock-image-{self._token}-{number}"' for number in range(len(images))]
        try:
            for (image, _), mark in zip(images, marks, strict=True):
                image["url"] = mark[1:-1]
            text = _dumps(payload)
        finally:
            for (image, _), url in zip(images, urls, strict=True):
                image["url"] = url
        if any(text.count(mark) != 1 for mark in marks):  # an object listed twice, or a leaked token: never guess
            return _dumps(payload).encode()
        if any(len(url) - url.index(",") - 1 != len(encoded) for url, (_, encoded) in zip(urls, images, strict=True)):
            return _dumps(payload).encode()  # base64 that is not the URL's own (a caller's mistake): never write it
        pieces: list[bytes | memoryview] = []
        done = 0
        for at, mark, url, encoded in sorted((text.index(mark), mark, url, encoded) for mark, url, (_, encoded)
                                             in zip(marks, urls, images, strict=True)):
            head = url[:url.index(",") + 1]
            pieces += text[done:at].encode(), _dumps(head)[:-1].encode(), encoded, b'"'
            done = at + len(mark)
        pieces.append(text[done:].encode())
        return b"".join(pieces)
