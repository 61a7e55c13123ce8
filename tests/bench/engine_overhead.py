"""The gateway in front of a real vLLM replica: the same closed-loop load straight to vLLM's socket and through
the gateway, alternating in one run: time to first token, end-to-end latency and output tokens per second (which
shows whether vLLM still batches as many requests together)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import aiohttp

from .load import Run, chat_request, closed_loop
from .screening_cost import photo_like

TOKENS = 32
PROMPT = "Describe the attached invoice: sender, date, total and anything unusual."


def engine_body(kind: str) -> bytes:
    """``text-stream``, ``text-whole`` or ``image-stream`` (a 448x448 JPEG, a few hundred image tokens)."""
    content: object = PROMPT
    if kind == "image-stream":
        url = "data:image/jpeg;base64," + base64.b64encode(photo_like(448, "JPEG")).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    return chat_request(content, stream=kind.endswith("-stream"), max_tokens=TOKENS, ignore_eos=True)


@dataclass(frozen=True)
class EngineOverhead:
    kind: str
    concurrency: int
    direct: list[Run]
    gateway: list[Run]

    @staticmethod
    def _merged(runs: list[Run]) -> Run:
        return Run([sample for run in runs for sample in run.samples], sum(run.wall_s for run in runs))

    def figures(self) -> dict[str, float | int | str]:
        direct, gateway = self._merged(self.direct), self._merged(self.gateway)
        return {
            "kind": self.kind, "concurrency": self.concurrency, "requests": len(gateway.samples),
            "direct_ttft_p50_ms": direct.ttft(50) * 1e3, "gateway_ttft_p50_ms": gateway.ttft(50) * 1e3,
            "direct_ttft_p99_ms": direct.ttft(99) * 1e3, "gateway_ttft_p99_ms": gateway.ttft(99) * 1e3,
            "direct_e2e_p50_ms": direct.e2e(50) * 1e3, "gateway_e2e_p50_ms": gateway.e2e(50) * 1e3,
            "direct_e2e_p99_ms": direct.e2e(99) * 1e3, "gateway_e2e_p99_ms": gateway.e2e(99) * 1e3,
            "direct_tokens_per_s": direct.tokens_per_s, "gateway_tokens_per_s": gateway.tokens_per_s,
            "throughput_ratio": gateway.tokens_per_s / direct.tokens_per_s,
        }


async def engine_overheads(direct: aiohttp.ClientSession, gateway: aiohttp.ClientSession, headers: dict[str, str],
                           concurrencies: list[int], kinds: list[str], rounds: int,
                           requests_per_client: int) -> list[EngineOverhead]:
    results = []
    for kind in kinds:
        body = engine_body(kind)
        for concurrency in concurrencies:
            count = max(16, concurrency * requests_per_client)
            runs: dict[str, list[Run]] = {"direct": [], "gateway": []}
            for turn in range(rounds):
                for path in (("direct", "gateway") if turn % 2 == 0 else ("gateway", "direct")):
                    client, sent = (direct, {}) if path == "direct" else (gateway, headers)
                    runs[path].append(await closed_loop(client, body, sent, concurrency, count))
            results.append(EngineOverhead(kind, concurrency, runs["direct"], runs["gateway"]))
    return results
