"""Logging set-up: operational events only, as JSON lines for collectors or as text for a terminal.

Log lines carry events (start, configuration, replica up or down, refusals summed up), never request content or
identities. Tracebacks keep their frames (file, line, function) but lose the exception's message: a message can
quote data (a ``KeyError`` names the key it did not find), and data may come from a request.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

from .engine_logging.airlock_engine_logging import TextFormatter, frames

LogFormat = Literal["auto", "json", "text"]
# Loggers of libraries that would say more than Airlock wants said (httpx logs every request line at INFO).
QUIETED = ("httpx", "httpcore")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and an exception's type and frames)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            line.update(event)
        if record.exc_info and record.exc_info[1] is not None:
            line["exception"] = frames(record.exc_info[1])
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.WARNING)
