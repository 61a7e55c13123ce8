"""Benchmark: user B's time to first token while user A floods the server, through Airlock's fair queue and
straight to vLLM, alternating in one run on the same engine.

The engine runs at most MAX_NUM_SEQS sequences at once (as a GPU replica would, by memory); A keeps FLOOD
non-streamed requests open (a batch job); B asks interactive, streamed questions. Straight to vLLM, B's request
waits behind A's in vLLM's first-come queue. Through Airlock (per replica cap = MAX_NUM_SEQS), it waits for at
most one of A's. Run: ``make bench-fairness``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from .stacks import NO_USER_LIMITS, airlock, api_keys

MODEL = "airlock-demo-qwen3-vl"
MAX_NUM_SEQS = 8
FLOOD = 64
A_TOKENS = 2048
B_TOKENS = 8
B_REQUESTS = 3
WARM_UP_S = 5.0


def chat(tokens: int) -> dict[str, object]:
    return {"model": MODEL, "max_tokens": tokens, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Summarise the scanned report."}]}


async def first_token_s(client: httpx.AsyncClient, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=chat(B_TOKENS), headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            # vLLM's first chunk only announces the role (empty content), before any token exists.
            if line.startswith("data: {") and any(
                choice.get("delta", {}).get("content") for choice in json.loads(line[6:]).get("choices", [])
            ):
                return time.perf_counter() - started
    raise RuntimeError("no token came")


async def a_request(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """A batch job: not streamed (streaming 64 answers would keep vLLM's API server busy with chunks)."""
    await client.post("/v1/chat/completions", json={**chat(A_TOKENS), "stream": False}, headers=headers)


async def engine_gauges(engine: httpx.AsyncClient) -> dict[str, float]:
    text = (await engine.get("/metrics")).text
    return {name: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith(f"vllm:num_requests_{name}{{"))
            for name in ("running", "waiting")}


async def scenario(client: httpx.AsyncClient, engine: httpx.AsyncClient, a: dict[str, str],
                   b: dict[str, str]) -> tuple[list[float], list[dict[str, float]]]:
    """A floods; after a warm-up, B asks B_REQUESTS times, one after the other."""
    flood = [asyncio.create_task(a_request(client, a)) for _ in range(FLOOD)]
    await asyncio.sleep(WARM_UP_S)  # A's requests reach the engine (the gauges printed say how many did)
    waits, gauges = [], []
    for _ in range(B_REQUESTS):
        gauges.append(await engine_gauges(engine))
        waits.append(await first_token_s(client, b))
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    await asyncio.sleep(2.0)  # the engine drops the departed requests
    return waits, gauges


@contextmanager
def airlock_stack(work: Path) -> Iterator[tuple[str, Path, dict[str, str], dict[str, str]]]:
    keys = api_keys(work / "api-keys.json", ["user-a", "user-b"])
    port = 18600
    with airlock("up", work, port, {
        "auth": {"api_keys_file": str(work / "api-keys.json")},
        "admission": {"max_in_flight_per_replica": MAX_NUM_SEQS, **NO_USER_LIMITS},
        "engine": {"model": "demo", "socket_dir": str(work / "sockets"), "cpu_kvcache_gb": 1, "max_model_len": 4096,
                   "extra_args": ["--max-num-seqs", str(MAX_NUM_SEQS)]},
    }):
        yield f"http://127.0.0.1:{port}", work / "sockets" / "replica-0.sock", keys["user-a"], keys["user-b"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (direct, airlock), alternating")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"direct to vLLM": [], "through Airlock": []}
    seen: dict[str, list[dict[str, float]]] = {"direct to vLLM": [], "through Airlock": []}
    with tempfile.TemporaryDirectory(prefix="airlock-bench-") as work, airlock_stack(Path(work)) as stack:
        base, socket, a, b = stack

        async def run() -> None:
            def engine_client() -> httpx.AsyncClient:
                return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket)),
                                         base_url="http://engine", timeout=600,
                                         limits=httpx.Limits(max_connections=FLOOD + 8))

            direct, gauges = engine_client(), engine_client()
            gateway = httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=FLOOD + 8))
            async with direct, gauges, gateway:
                for _ in range(args.rounds):
                    for path, client, keys in (("direct to vLLM", direct, ({}, {})),
                                               ("through Airlock", gateway, (a, b))):
                        waits, gauge = await scenario(client, gauges, *keys)
                        results[path] += waits
                        seen[path] += gauge

        asyncio.run(run())
    print(f"\nUser B's time to first token while user A keeps {FLOOD} requests of {A_TOKENS} tokens open "
          f"(engine: --max-num-seqs {MAX_NUM_SEQS}; Airlock: max_in_flight_per_replica {MAX_NUM_SEQS})\n")
    print(f"{'path':<18}{'n':>4}{'median s':>11}{'max s':>9}{'vLLM running':>14}{'vLLM waiting':>14}")
    for path, waits in results.items():
        running = statistics.mean(gauge["running"] for gauge in seen[path])
        waiting = statistics.mean(gauge["waiting"] for gauge in seen[path])
        print(f"{path:<18}{len(waits):>4}{statistics.median(waits):>11.2f}{max(waits):>9.2f}"
              f"{running:>14.1f}{waiting:>14.1f}")
    print("(vLLM running/waiting: the engine's own gauges when B asked, averaged)")
    if args.json:
        args.json.write_text(json.dumps({"flood": FLOOD, "max_num_seqs": MAX_NUM_SEQS, "ttft_s": results,
                                         "engine_gauges": seen}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
