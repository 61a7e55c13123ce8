"""The gateway in front of a real vLLM replica: the same closed-loop load straight to vLLM's socket, through the
gateway and (when given) through nginx, in alternating rounds in one run: time to first token, end-to-end latency
and output tokens per second (which shows whether vLLM still batches as many requests together), and what each
proxy adds over going straight to vLLM."""

from __future__ import annotations

import base64
import statistics
from dataclasses import dataclass, field

import aiohttp

from .load import Run, alternating, chat_request, interleaved, merged
from .screening_cost import photo_like

TOKENS = 32
PROMPT = "Describe the attached invoice: sender, date, total and anything unusual."
# image-stream-16: issue 20's load (streaming image chat, 16 tokens), the one its nginx targets are set on.
KINDS = ["text-stream", "text-whole", "image-stream", "image-stream-16"]
# At concurrency 1 the paths take turns request by request (``load.interleaved``), this many requests on each path
# a round: one request's TTFT here spreads from about 20 to 80 ms, and the target (within 1 ms of nginx) needs
# medians that 16 such samples do not pin down.
INTERLEAVED_REQUESTS = 64


def engine_body(kind: str) -> bytes:
    """``text-stream``, ``text-whole``, ``image-stream`` (a 448x448 JPEG, a few hundred image tokens; 32 tokens
    answered) or ``image-stream-16`` (the same, 16 tokens answered)."""
    content: object = PROMPT
    if kind.startswith("image-stream"):
        url = "data:image/jpeg;base64," + base64.b64encode(photo_like(448, "JPEG")).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    tokens = 16 if kind.endswith("-16") else TOKENS
    return chat_request(content, stream="-stream" in kind, max_tokens=tokens, ignore_eos=True)


def _added_by_round(runs: list[Run], direct_rounds: list[Run]) -> list[float]:
    """TTFT p50 over direct's in the same round, ms: each round's runs were minutes, not a whole run, apart."""
    return [(run.ttft(50) - direct.ttft(50)) * 1e3 for run, direct in zip(runs, direct_rounds, strict=True)]


@dataclass(frozen=True)
class EngineOverhead:
    kind: str
    concurrency: int
    direct_rounds: list[Run]
    gateway_rounds: list[Run]
    nginx_rounds: list[Run] = field(default_factory=list)  # empty: nginx not measured

    @property
    def direct(self) -> Run:
        return merged(self.direct_rounds)

    @property
    def gateway(self) -> Run:
        return merged(self.gateway_rounds)

    @property
    def round_ratios(self) -> list[float]:
        """Throughput through the gateway over direct, for each round (one run of each, minutes apart at most)."""
        return [gateway.tokens_per_s / direct.tokens_per_s
                for direct, gateway in zip(self.direct_rounds, self.gateway_rounds, strict=True)]

    def figures(self) -> dict[str, float | int | str]:
        direct, gateway = self.direct, self.gateway
        figures: dict[str, float | int | str] = {
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
        proxies = {"gateway": self.gateway_rounds, **({"nginx": self.nginx_rounds} if self.nginx_rounds else {})}
        for name, rounds in proxies.items():
            run = merged(rounds)
            by_round = _added_by_round(rounds, self.direct_rounds)
            figures |= {
                f"{name}_added_ttft_p50_ms": (run.ttft(50) - direct.ttft(50)) * 1e3,
                f"{name}_added_ttft_p99_ms": (run.ttft(99) - direct.ttft(99)) * 1e3,
                f"{name}_added_e2e_p50_ms": (run.e2e(50) - direct.e2e(50)) * 1e3,
                f"{name}_added_e2e_p99_ms": (run.e2e(99) - direct.e2e(99)) * 1e3,
                # The targets are on this one: a median of rounds, as the throughput ratio above.
                f"{name}_added_ttft_p50_median_ms": statistics.median(by_round),
                f"{name}_added_ttft_p50_by_round": " ".join(f"{added:+.1f}" for added in by_round),
            }
            if name == "nginx":
                figures |= {"nginx_ttft_p50_ms": run.ttft(50) * 1e3, "nginx_ttft_p99_ms": run.ttft(99) * 1e3,
                            "nginx_e2e_p50_ms": run.e2e(50) * 1e3, "nginx_e2e_p99_ms": run.e2e(99) * 1e3,
                            "nginx_tokens_per_s": run.tokens_per_s, "nginx_retries": run.retries}
        return figures


async def engine_overheads(direct: aiohttp.ClientSession, gateway: aiohttp.ClientSession, headers: dict[str, str],
                           concurrencies: list[int], kinds: list[str], rounds: int, requests_per_client: int,
                           nginx: aiohttp.ClientSession | None = None) -> list[EngineOverhead]:
    """Each kind at each concurrency, over each path in alternating rounds; ``headers`` (the API key) go to the
    gateway and to nginx, never straight to vLLM."""
    paths = {"direct": (direct, {"content-type": "application/json"}), "gateway": (gateway, headers)}
    if nginx is not None:
        paths["nginx"] = (nginx, headers)
    results = []
    for kind in kinds:
        body = engine_body(kind)
        for concurrency in concurrencies:
            if concurrency == 1:
                runs = await interleaved(paths, body, INTERLEAVED_REQUESTS, rounds)
            else:
                runs = await alternating(paths, body, concurrency, max(16, concurrency * requests_per_client), rounds)
            overhead = EngineOverhead(kind, concurrency, runs["direct"], runs["gateway"], runs.get("nginx", []))
            results.append(overhead)
            retried = {name: merged(path_runs).retries for name, path_runs in runs.items()}
            retries = "; retried after a dropped connection: " + ", ".join(
                f"{times} {name}" for name, times in retried.items()) if any(retried.values()) else ""
            per_round = ", ".join("/".join(f"{runs[name][turn].tokens_per_s:.0f}" for name in paths)
                                  for turn in range(rounds))
            print(f"  {kind} at concurrency {concurrency}: {len(overhead.gateway.samples)} requests on each path "
                  f"(all rounds); tokens/s {'/'.join(paths)} by round: {per_round}{retries}", flush=True)
    return results
