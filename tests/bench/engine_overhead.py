"""The gateway in front of a real vLLM replica: the same closed-loop load straight to vLLM's socket and through
the gateway, alternating in one run: time to first token, end-to-end latency and output tokens per second (which
shows whether vLLM still batches as many requests together)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import aiohttp

from .load import Run, chat_request, side_by_side
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
    direct: Run
    gateway: Run

    def figures(self) -> dict[str, float | int | str]:
        direct, gateway = self.direct, self.gateway
        return {
            "kind": self.kind, "concurrency": self.concurrency, "requests": len(gateway.samples),
            "direct_ttft_p50_ms": direct.ttft(50) * 1e3, "gateway_ttft_p50_ms": gateway.ttft(50) * 1e3,
            "direct_ttft_p99_ms": direct.ttft(99) * 1e3, "gateway_ttft_p99_ms": gateway.ttft(99) * 1e3,
            "direct_e2e_p50_ms": direct.e2e(50) * 1e3, "gateway_e2e_p50_ms": gateway.e2e(50) * 1e3,
            "direct_e2e_p99_ms": direct.e2e(99) * 1e3, "gateway_e2e_p99_ms": gateway.e2e(99) * 1e3,
            "direct_tokens_per_s": direct.tokens_per_s, "gateway_tokens_per_s": gateway.tokens_per_s,
            "throughput_ratio": gateway.tokens_per_s / direct.tokens_per_s,
            "direct_retries": direct.retries, "gateway_retries": gateway.retries,
        }


async def engine_overheads(direct: aiohttp.ClientSession, gateway: aiohttp.ClientSession, headers: dict[str, str],
                           concurrencies: list[int], kinds: list[str], rounds: int,
                           requests_per_client: int) -> list[EngineOverhead]:
    results = []
    for kind in kinds:
        body = engine_body(kind)
        for concurrency in concurrencies:
            count = max(16, concurrency * requests_per_client)
            direct_run, gateway_run = await side_by_side(direct, gateway, headers, body, concurrency, count, rounds)
            results.append(EngineOverhead(kind, concurrency, direct_run, gateway_run))
            retries = f" (retried after a dropped connection: {direct_run.retries} direct, {gateway_run.retries} " \
                      "through the gateway)" if direct_run.retries or gateway_run.retries else ""
            print(f"  {kind} at concurrency {concurrency}: {len(gateway_run.samples)} requests each way{retries}",
                  flush=True)
    return results
