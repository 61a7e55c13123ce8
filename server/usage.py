"""Token counts of an answer, for the metrics, read from what the engine reports (``usage``).

A whole answer carries ``usage``. A streamed one does only when asked (``stream_options.include_usage``): the
gateway asks for it on every stream, and when the client had not, removes that last usage-only event before it
reaches the client, so the client sees exactly the stream it asked for. Only the counts are kept.
"""

from __future__ import annotations

import json
from typing import Any

EVENT_END = b"\n\n"
USAGE_MARK = b'"usage"'
# An unfinished event longer than this is passed on as it is (an engine that does not end events with a blank line
# must not have its stream held back).
MAX_PARTIAL_BYTES = 64 * 1024


def ask_for_usage(payload: dict[str, Any]) -> bool:
    """Make a streamed request end with a usage event; True when the client did not ask for it (remove it then)."""
    if payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    if options.get("continuous_usage_stats"):
        return False  # usage on every chunk would have to be removed from every chunk: leave this stream alone
    payload["stream_options"] = {**options, "include_usage": True}
    return True


def _counts(answer: Any) -> tuple[int, int] | None:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def whole_answer_usage(content: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a non-streamed answer, if it says."""
    if USAGE_MARK not in content:
        return None
    try:
        return _counts(json.loads(content))
    except ValueError:
        return None


class StreamUsage:
    """Watches a server-sent event stream as it is relayed; passes on whole events only, so that the usage event
    can be recognised (and removed) even when it arrives split over two reads."""

    def __init__(self, remove_usage_event: bool) -> None:
        self._remove = remove_usage_event
        self._partial = b""
        self.counts: tuple[int, int] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """What to send on for ``chunk``: every complete event so far (possibly nothing yet)."""
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(EVENT_END)
        if cut < 0:
            if len(data) > MAX_PARTIAL_BYTES:
                self._partial = b""
                return data
            self._partial = data
            return b""
        cut += len(EVENT_END)
        complete, self._partial = data[:cut], data[cut:]
        if USAGE_MARK in complete:
            complete = self._take_usage(complete)
        return complete

    def rest(self) -> bytes:
        """Whatever was left after the last complete event (an engine that ended mid-event)."""
        rest, self._partial = self._partial, b""
        return rest

    def _take_usage(self, complete: bytes) -> bytes:
        kept = []
        for event in complete.split(EVENT_END)[:-1]:
            if USAGE_MARK in event and event.startswith(b"data: "):
                try:
                    answer = json.loads(event[len(b"data: "):])
                except ValueError:
                    answer = None
                counts = _counts(answer)
                if counts is not None:
                    self.counts = counts
                    if self._remove and answer.get("choices") == []:
                        continue
            kept.append(event + EVENT_END)
        return b"".join(kept)
