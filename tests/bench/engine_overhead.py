"""The gateway in front of a real vLLM replica: the same closed-loop load straight to vLLM's socket and through
the gateway, alternating in one run: time to first token, end-to-end latency and output tokens per second (which
shows whether vLLM still batches as many requests together)."""

from __future__ import annotations

import base64
import statistics
from dataclasses import dataclass

import aiohttp

from .load import Run, chat_request, merged, side_by_side
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
    direct_rounds: list[Run]
    gateway_rounds: list[Run]

    @property
    def direct(self) -> Run:
        return merged(self.direct_rounds)

    @property
    def gateway(self) -> Run:
        return merged(self.gateway_rounds)

    @property
    def round_ratios(self) -> list[float]:
        """Throughput through the gateway over direct, for each round (two runs back to back)."""
        return [gateway.tokens_per_s / direct.tokens_per_s
                for direct, gateway in zip(self.direct_rounds, self.gateway_rounds, strict=True)]

    def figures(self) -> dict[str, float | int | str]:
        direct, gateway = self.direct, self.gateway
        return {
            "kind": self.kind, "concurrency": self.concurrency, "requests": len(gateway.samples),
            "direct_ttft_p50_ms": direct.ttft(50) * 1e3, "gateway_ttft_p50_ms": gateway.ttft(50) * 1e3,
            "direct_ttft_p99_ms": direct.ttft(99) * 1e3, "gateway_ttft_p99_ms": gateway.ttft(99) * 1e3,
            "direct_e2e_p50_ms": direct.e2e(50) * 1e3, "gateway_e2e_p50_ms": gateway.e2e(50) * 1e3,
            "direct_e2e_p99_ms": direct.e2e(99) * 1e3, "gateway_e2e_p99_ms": gateway.e2e(99) * 1e3,
            "direct_tokens_per_s": direct.tokens_per_s, "gateway_tokens_per_s": gateway.tokens_per_s,
            # The median of the rounds' ratios: on this machine one run in a few is several times faster than
            # the rest, on either path, which would decide a ratio of the totals on its own.
            "throughput_ratio": statistics.median(self.round_ratios),
            "round_ratios": " ".join(f"{ratio:.2f}" for ratio in self.round_ratios),
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
            overhead = EngineOverhead(kind, concurrency, *await side_by_side(direct, gateway, headers, body,
                                                                             concurrency, count, rounds))
            results.append(overhead)
            direct_run, gateway_run = overhead.direct, overhead.gateway
            retries = f"; retried after a dropped connection: {direct_run.retries} direct, {gateway_run.retries} " \
                      "through the gateway" if direct_run.retries or gateway_run.retries else ""
            per_round = ", ".join(f"{d.tokens_per_s:.0f}/{g.tokens_per_s:.0f}"
                                  for d, g in zip(overhead.direct_rounds, overhead.gateway_rounds, strict=True))
            print(f"  {kind} at concurrency {concurrency}: {len(gateway_run.samples)} requests each way; tokens/s "
                  f"direct/airlock by round: {per_round}{retries}", flush=True)
    return results
