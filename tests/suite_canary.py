"""The whole suite runs with a canary in every request; at the end no file written during the run may hold it.

Every request a test sends with httpx from its main thread (and so with the openai SDK, which is built on it)
gets the canary in a header, and JSON bodies get it as content: an extra user message in chat requests, a
suffix to a completion prompt. Requests that are already malformed or empty are left alone, so that each test
still sends what it means to send. The check runs in ``pytest_sessionfinish`` (tests/conftest.py), after every
stack has stopped.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

SUITE_CANARY = f"AIRLOCK-SUITE-CANARY-{secrets.token_hex(10)}"
CANARY_HEADER = "x-airlock-suite-canary"


@dataclass
class Carried:
    """How many requests carried the canary: a run where none did would prove nothing."""

    requests: int = 0
    bodies: int = 0


CARRIED = Carried()


def _add_to_body(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    messages, prompt = body.get("messages"), body.get("prompt")
    if isinstance(messages, list) and messages and all(isinstance(message, dict) for message in messages):
        messages.append({"role": "user", "content": f"Reference {SUITE_CANARY}"})
        return True
    if isinstance(prompt, str) and prompt:
        body["prompt"] = f"{prompt} {SUITE_CANARY}"
        return True
    return False


def with_canary(request: httpx.Request) -> httpx.Request:
    if threading.current_thread() is not threading.main_thread():
        # Gateways that tests run in a thread forward with httpx too; what they send is theirs, not the test's.
        return request
    request.headers[CANARY_HEADER] = SUITE_CANARY
    CARRIED.requests += 1
    if request.method != "POST" or "json" not in request.headers.get("content-type", ""):
        return request
    try:
        body = json.loads(request.content)
    except (httpx.RequestNotRead, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        return request
    if not _add_to_body(body):
        return request
    content = json.dumps(body).encode()
    headers = request.headers.copy()
    headers["content-length"] = str(len(content))
    CARRIED.bodies += 1
    return httpx.Request(request.method, request.url, headers=headers, content=content,
                         extensions=request.extensions)


@contextlib.contextmanager
def canary_in_every_request() -> Iterator[Carried]:
    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        return sync_send(self, with_canary(request), **kwargs)

    async def send_async(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        return await async_send(self, with_canary(request), **kwargs)

    httpx.Client.send = send  # type: ignore[method-assign]
    httpx.AsyncClient.send = send_async  # type: ignore[method-assign]
    try:
        yield CARRIED
    finally:
        httpx.Client.send = sync_send  # type: ignore[method-assign]
        httpx.AsyncClient.send = async_send  # type: ignore[method-assign]
