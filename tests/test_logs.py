"""Log lines: JSON for collectors, and tracebacks that keep their frames but lose the exception's message."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from server.engine import engine_environment
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


# What vLLM's processes do, as Airlock starts them: the API server configures logging from the environment first;
# then its tool parsers, chat-template checks, uvicorn and asyncio log failures. ``server`` is made unimportable, as
# in an ``engine.python`` of its own. The refused input is a tool call the model wrote, quoting the request.
VLLM_PROCESS = f"""
import sys
sys.modules["server"] = None
import logging
from argparse import Namespace
from pydantic import BaseModel
from vllm.logger import configure_logging_from_args, init_logger

configure_logging_from_args(Namespace())


class FunctionCall(BaseModel):
    name: str


try:
    FunctionCall(name=[{SECRET!r}])
except Exception as error:
    init_logger("vllm.tool_parsers.hermes_tool_parser").exception("Error in extracting tool call from response.")
    init_logger("vllm.renderers.hf").warning("Chat template rejected the request: %s", error)
    logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=error)
init_logger("vllm.v1.worker.gpu_worker").info("Available KV cache memory: %.2f GiB", 1.5)
"""


def test_vllms_processes_log_tracebacks_and_exception_arguments_without_their_messages() -> None:
    env = engine_environment({**os.environ, "PYTHONPATH": ""})
    run = subprocess.run([sys.executable, "-c", VLLM_PROCESS], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = run.stdout + run.stderr
    assert SECRET not in printed
    lines = run.stdout.splitlines()
    for said in ("ERROR vllm.tool_parsers.hermes_tool_parser (MainProcess, pid ",
                 "WARNING vllm.renderers.hf (MainProcess, pid ", "ERROR uvicorn.error (", "ERROR asyncio ("):
        assert [line for line in lines if said in line], (said, run.stdout)
    assert "Chat template rejected the request: <ValidationError>" in run.stdout
    assert run.stdout.count("pydantic_core._pydantic_core.ValidationError at <string>:") == 3, run.stdout
    assert "INFO vllm.v1.worker.gpu_worker (MainProcess, pid" in run.stdout
    assert "Available KV cache memory: 1.50 GiB" in run.stdout  # what `make gpu-check` reads
