"""The log format of Airlock's processes, vLLM's included: tracebacks keep their frames (file, line, function) but
lose the exception's message, because a message can quote data (a ``KeyError`` names the key it did not find; a
pydantic ``ValidationError`` quotes the input it refused, e.g. a tool call the model wrote), and data may come from
a request. Standard library only: vLLM's processes import it by this module's name (see ``__init__``)."""

from __future__ import annotations

import logging
import traceback

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# vLLM runs an API server and engine-core processes: which one said it.
ENGINE_FORMAT = "%(asctime)s %(levelname)s %(name)s (%(processName)s, pid %(process)d): %(message)s"


def frames(exc: BaseException) -> str:
    """A traceback without the exception's message: type and frames only."""
    where = "; ".join(f"{frame.filename}:{frame.lineno} in {frame.name}"
                      for frame in traceback.extract_tb(exc.__traceback__))
    return f"{type(exc).__module__}.{type(exc).__qualname__} at {where}" if where else type(exc).__qualname__


class TextFormatter(logging.Formatter):
    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatException(self, ei: object) -> str:
        exc = ei[1] if isinstance(ei, tuple) else None
        return frames(exc) if isinstance(exc, BaseException) else ""


class EngineFormatter(TextFormatter):
    """For vLLM's processes, which also pass exceptions as arguments (``logger.error("...: %s", e)``, e.g. its
    chat-template and tool-parser errors): such an argument is shown by its type only."""

    def __init__(self) -> None:
        super().__init__(ENGINE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.args, tuple) and any(isinstance(arg, BaseException) for arg in record.args):
            record.args = tuple(f"<{type(arg).__qualname__}>" if isinstance(arg, BaseException) else arg
                                for arg in record.args)
        return super().format(record)
