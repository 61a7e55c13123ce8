"""Log lines: JSON for collectors, and tracebacks that keep their frames but lose the exception's message."""

from __future__ import annotations

import json
import logging
import sys

from server.logs import JsonFormatter, TextFormatter

SECRET = "a prompt about the merger"


def failing_record() -> logging.LogRecord:
    try:
        {"known": 1}[SECRET]
    except KeyError:
        exc_info = sys.exc_info()
    return logging.LogRecord("server.test", logging.ERROR, __file__, 1, "request failed", None, exc_info)


def test_json_lines_hold_the_event_and_no_exception_message() -> None:
    line = JsonFormatter().format(failing_record())
    event = json.loads(line)
    assert event["level"] == "error" and event["logger"] == "server.test" and event["message"] == "request failed"
    assert event["exception"].startswith("builtins.KeyError at ") and "failing_record" in event["exception"]
    assert SECRET not in line


def test_structured_fields_join_the_line() -> None:
    record = logging.LogRecord("server.metrics", logging.INFO, __file__, 1, "refused", None, None)
    record.event = {"event": "requests_refused", "counts": {"auth": 2}}
    event = json.loads(JsonFormatter().format(record))
    assert event["event"] == "requests_refused" and event["counts"] == {"auth": 2}


def test_text_tracebacks_lose_the_message_too() -> None:
    text = TextFormatter().format(failing_record())
    assert "request failed" in text and "KeyError" in text and "failing_record" in text
    assert SECRET not in text
