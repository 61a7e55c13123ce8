"""``/metrics``: the gateway's own series, then the engines' ``vllm:*`` series, each labelled with its replica index.

Engines are read over the same connections the gateway forwards on (their unix sockets, with ``airlock up``), so one
scrape target covers the whole stack and the engines stay unreachable from outside. Only ``vllm:*`` families are
passed on: the engines' process and Python series would clash with the gateway's, and say nothing about serving.
An engine that does not answer within the timeout is left out of that scrape (``airlock_engine_scrape_ok`` 0).

Where several gateways run (the Helm chart), each would export every engine's series again and every sum over them
would count each engine once per gateway: there the gateways leave them out (``metrics.engine_series: false``) and
each engine launcher serves its own replicas' series with the same code (``engine_metrics_listener``, without the
gateway's series), so every engine's series and its ``airlock_engine_scrape_ok`` come from exactly one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Protocol

import anyio.to_thread
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .config import is_loopback_host
from .errors import NO_STORE
from .foreign_origins import LocalNamesOnly

ENGINE_PREFIX = "vllm:"
# An engine's exposition is some hundreds of KB at most; anything longer is not read.
MAX_ENGINE_METRICS_BYTES = 8 * 1024 * 1024


class _EngineFamilies(Collector):
    """The engines' families, merged by name with a ``replica`` label, as parsed for one scrape."""

    def __init__(self, texts: Sequence[tuple[int, str | None]]) -> None:
        self._texts = texts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        scraped = GaugeMetricFamily("airlock_engine_scrape_ok", "1 when a replica's own metrics were read in time.",
                                    labels=["replica"])
        for index, text in self._texts:
            scraped.add_metric([str(index)], 0.0 if text is None else 1.0)
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                if not family.name.startswith(ENGINE_PREFIX):
                    continue
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "replica": str(index)}, sample.value,
                                    sample.timestamp)
        yield scraped
        yield from merged.values()


class EngineSource(Protocol):
    """An engine to read ``/metrics`` from: its replica label and a client for it (the gateway's pool replicas)."""

    @property
    def index(self) -> int: ...

    @property
    def client(self) -> httpx.AsyncClient: ...


def _render(texts: Sequence[tuple[int, str | None]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineFamilies(texts))
    return generate_latest(registry)


class MetricsEndpoint:
    """Builds the text of one scrape: ``own`` registry's series (the gateway's; None for an engine launcher), then
    the ``engines``' (none: their series are left out, and so is ``airlock_engine_scrape_ok``)."""

    def __init__(self, own: CollectorRegistry | None, engines: Sequence[EngineSource],
                 engine_timeout_s: float) -> None:
        self._own = own
        self._engines = engines
        self._timeout = engine_timeout_s

    async def _engine_text(self, replica: EngineSource) -> tuple[int, str | None]:
        """The replica's exposition, or None: no answer, not 200, longer than MAX_ENGINE_METRICS_BYTES (reading
        stops there), or not all of it within the timeout. httpx's timeout bounds each read, not the answer: an
        engine that sends a little at a time would hold the scrape, so the whole read has the one deadline."""
        body = bytearray()
        try:
            async with asyncio.timeout(self._timeout), \
                    replica.client.stream("GET", "/metrics", timeout=self._timeout) as answer:
                if answer.status_code != 200:
                    return replica.index, None
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ENGINE_METRICS_BYTES:
                        return replica.index, None
        except (httpx.HTTPError, TimeoutError):
            return replica.index, None
        # The exposition format is UTF-8 (Prometheus text format 0.0.4); anything else is not an exposition.
        try:
            return replica.index, body.decode("utf-8")
        except UnicodeDecodeError:
            return replica.index, None

    async def render(self) -> bytes:
        own = generate_latest(self._own) if self._own is not None else b""
        if not self._engines:
            return own
        texts = await asyncio.gather(*(self._engine_text(replica) for replica in self._engines))
        try:
            # Parsing some hundred KB of text takes milliseconds: off the event loop that relays streams.
            engines = await anyio.to_thread.run_sync(_render, texts)
        except ValueError:
            engines = await anyio.to_thread.run_sync(_render, [(index, None) for index, _ in texts])
        return own + engines


def metrics_app(endpoint: MetricsEndpoint, host: str) -> ASGIApp:
    """A separate metrics listener on ``host``: ``GET /metrics`` and nothing else. It asks nobody who is calling, so
    on loopback it answers only to this computer's names (``foreign_origins.LocalNamesOnly``: DNS rebinding)."""

    async def scrape(_: Request) -> Response:
        return Response(await endpoint.render(), media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)

    app = Starlette(routes=[Route("/metrics", scrape)])
    return LocalNamesOnly(app, host) if is_loopback_host(host) else app
