"""The audit's requests: ordinary OpenAI API calls carrying the canaries, plus one the gateway must refuse.

The chat questions carry the canary PDF as a ``file`` part beside the image, streamed and not, unless the stack's
settings turn documents off: the gateway renders it in its worker processes, which the trace follows like any
other process of the stack."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..tls import client_context
from .canary import Canaries
from .report import ProbeSummary

MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 300


class ProbeError(Exception):
    """The stack did not take the audit's requests: without them the audit proves nothing."""


@dataclass(frozen=True)
class Gateway:
    """Where the audit's requests go, and how a TLS gateway is trusted: its certificate is verified against
    ``ca_file`` (default: the system's CAs) under ``server_name`` when that differs from the URL's host (the audit
    reaches a stack it started at 127.0.0.1, whose certificate names the service)."""

    url: str
    ca_file: Path | None = None
    server_name: str | None = None

    def client(self, **options: Any) -> httpx.Client:
        verify = client_context(self.ca_file) if self.url.startswith("https://") else True
        hooks = {"request": [self._name_the_server]} if self.server_name else {}
        return httpx.Client(base_url=self.url, verify=verify, event_hooks=hooks, **options)

    def _name_the_server(self, request: httpx.Request) -> None:
        request.extensions["sni_hostname"] = self.server_name


def auth_headers(credential: str | None) -> dict[str, str]:
    """``user:password`` signs in with Basic; anything else is sent as a bearer token (an API key or OIDC token)."""
    if not credential:
        return {}
    if ":" in credential:
        return {"authorization": "Basic " + base64.b64encode(credential.encode()).decode()}
    return {"authorization": f"Bearer {credential}"}


def run_probe(gateway: Gateway, credential: str | None, canaries: Canaries, rounds: int,
              documents: bool = True) -> ProbeSummary:
    """``documents``: send the canary PDF too (the stack's documents.enabled; on when its settings are not known)."""
    summary = ProbeSummary(documents=documents)
    with gateway.client(headers=auth_headers(credential), timeout=REQUEST_TIMEOUT_S) as client:
        models = client.get("/v1/models")
        if models.status_code != 200:
            raise ProbeError(f"GET /v1/models answered {models.status_code}"
                             + (" (set AIRLOCK_AUDIT_KEY to a credential)" if models.status_code == 401 else ""))
        listed = models.json().get("data") or []
        if not listed:
            raise ProbeError("the stack lists no model")
        summary.model = listed[0]["id"]
        for _ in range(rounds):
            _ask(client, summary, canaries, stream=False)
            _ask(client, summary, canaries, stream=True)
            _complete(client, summary, canaries)
            _refused(client, summary, canaries)
    if summary.answered != summary.sent - summary.refused:
        raise ProbeError(f"only {summary.answered} of {summary.sent - summary.refused} requests were answered"
                         + (f" (the stack said: {summary.error})" if summary.error else ""))
    return summary


def _messages(canaries: Canaries, documents: bool) -> list[dict[str, object]]:
    content: list[dict[str, object]] = [
        {"type": "text", "text": f"Describe this scan. Reference {canaries.text}."},
        {"type": "image_url", "image_url": {"url": canaries.data_url}},
    ]
    if documents:
        content.append(canaries.document_part)
    return [{"role": "user", "content": content}]


def _ask(client: httpx.Client, summary: ProbeSummary, canaries: Canaries, *, stream: bool) -> None:
    payload = {"model": summary.model, "max_tokens": MAX_TOKENS, "stream": stream,
               "messages": _messages(canaries, summary.documents)}
    summary.sent += 1
    if not stream:
        response = client.post("/v1/chat/completions", json=payload)
        if response.status_code == 200:
            summary.answered += 1
            canaries.add_answer(response.json()["choices"][0]["message"].get("content") or "")
        else:
            summary.error = _error_of(response)
        return
    answer = []
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            response.read()
            summary.error = _error_of(response)
            return
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[len("data: "):])["choices"]
                answer += [choice["delta"].get("content") or "" for choice in delta]
    summary.answered += 1
    canaries.add_answer("".join(answer))


def _error_of(response: httpx.Response) -> str:
    """The status and the OpenAI error's code and message: Airlock's messages name limits, never content."""
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error.get('code')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        return str(response.status_code)


def _complete(client: httpx.Client, summary: ProbeSummary, canaries: Canaries) -> None:
    summary.sent += 1
    response = client.post("/v1/completions", json={
        "model": summary.model, "max_tokens": MAX_TOKENS, "prompt": f"Summarise contract {canaries.text}:",
    })
    if response.status_code == 200:
        summary.answered += 1
        canaries.add_answer(response.json()["choices"][0]["text"])


def _refused(client: httpx.Client, summary: ProbeSummary, canaries: Canaries) -> None:
    """A remote image URL naming the canary: refused, and the refusal path must not keep it either."""
    summary.sent += 1
    response = client.post("/v1/chat/completions", json={"model": summary.model, "max_tokens": MAX_TOKENS, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": canaries.text},
            {"type": "image_url", "image_url": {"url": f"https://files.invalid/{canaries.text}.png"}},
        ]},
    ]})
    if response.status_code == 400:
        summary.refused += 1
