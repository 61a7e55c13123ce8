"""The gateway's own metrics, anonymized: what operators see says how the service is doing, never who used it.

Labels are only ever the model (a name the engines serve, or ``unknown``), the route, the status code, the stream
flag, a replica index, and reasons and stages from fixed lists in this code. No user, key, address, tenant or byte of
content reaches a label or a value; the one figure about users is how many distinct ones were active lately.

Each request carries a ``RequestRecord`` that the request path fills in as it goes (model, queue wait, when it
was forwarded, the first byte from the engine, tokens); ``GatewayMetrics.finish`` observes it once, at its end,
whatever that end was (``finally`` in the middleware), so accounting survives disconnects.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .errors import AirlockError

if TYPE_CHECKING:
    from .admission import Admission
    from .tls import CertificateReloader
    from .upstream import ReplicaPool

log = logging.getLogger(__name__)

# From a cached prefix on a small model (milliseconds) to a long answer of a Thinking model (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                   600.0)
# The gateway's own share: tens of microseconds to a slow screening of a large image.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TOKENS_PER_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
# Distinct users remembered for the active-users figure; beyond this the oldest are forgotten first.
MAX_TRACKED_USERS = 100_000
NO_MODEL = "none"
UNKNOWN_MODEL = "unknown"

# Label sets whose series ``_Children`` keeps at hand per metric: far more than the models, routes, stream flags and
# status codes a gateway meets (the registry keeps every one of them anyway); past it the table starts again.
CHILDREN_KEPT = 1024

# Render time of one document, the wait for a free worker included: a page takes tens of milliseconds, a worker's
# start under a second, a document at most documents.render_timeout_s.
RENDER_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# What a document went to the renderer for, and how that ended (server/documents.py).
DOCUMENT_PURPOSES = ("request", "preview")
DOCUMENT_OUTCOMES = ("rendered", "refused", "unprocessable", "busy", "failed", "cancelled")

# How an engine failed a request (proxy.py names them).
UPSTREAM_ERRORS = ("connect_failed", "dropped", "timeout", "transport", "error_status", "error_event",
                   "broken_answer", "broken_stream")


@dataclass
class RequestRecord:
    """What one API request did. Holds no identity and no content: only times, a model name, counts.

    The request path tells it what happened through its events, in this order: ``identified`` (the model, once
    parsed), ``admitted`` (out of the fair queue), ``forwarded`` (sent to an engine; again on a retry),
    ``first_byte`` (the engine's answer began), ``relayed`` (one streamed chunk passed on), ``counted`` (the tokens
    the engine reported). ``GatewayMetrics.finish`` reads it once, at the end.
    """

    route: str
    arrived: float
    model: str = NO_MODEL
    stream: bool = False
    queue_wait: float | None = None
    # When the request left for an engine, and when the engine's first byte of answer came back.
    forwarded_at: float | None = None
    first_byte_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Time the gateway spent passing chunks on (from a chunk's arrival to its hand-over to the server), and how many.
    relay_s: float = 0.0
    chunks: int = 0

    def identified(self, model: str, stream: bool) -> None:
        """``model``: a served model's name or ``UNKNOWN_MODEL`` (never what a client typed)."""
        self.model, self.stream = model, stream

    def admitted(self, queued_at: float) -> None:
        self.queue_wait = time.perf_counter() - queued_at

    def forwarded(self) -> None:
        self.forwarded_at = time.perf_counter()

    def first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()

    def relayed(self, arrived_at: float) -> None:
        """A chunk that came from the engine at ``arrived_at`` has been handed to the server."""
        self.relay_s += time.perf_counter() - arrived_at
        self.chunks += 1

    def counted(self, counts: tuple[int, int] | None) -> None:
        """The engine's (prompt, completion) token counts, when it reported them."""
        if counts is not None:
            self.prompt_tokens, self.completion_tokens = counts


_Metric = TypeVar("_Metric", Counter, Histogram)


class _Children(Generic[_Metric]):
    """One metric's labelled series, by their label values, found with one dictionary lookup.

    ``metric.labels(...)`` checks its arguments, converts each to ``str`` and takes a lock on every call: with about
    seven calls per request, a measurable part of the gateway's own CPU per request (py-spy under
    ``tests/bench/gateway_cpu``). A series is still made by ``labels`` (so it appears, at zero, at its first use and not
    before), and is the registry's own object: what ``/metrics`` shows does not change. Series are never removed
    from these metrics, so a kept one never goes stale. Values must be strings, as ``labels`` would make them.
    """

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            if len(self._children) >= CHILDREN_KEPT:
                self._children.clear()
            child = self._children[values] = self._metric.labels(*values)
        return child


class ActiveUsers:
    """Distinct users seen within a window, kept as keyed digests (the key is random per process and never leaves
    memory), so that even this table names nobody."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._key = secrets.token_bytes(32)
        self._last_seen: OrderedDict[bytes, float] = OrderedDict()

    def saw(self, user_key: str) -> None:
        # BLAKE2's own keyed mode (RFC 7693 section 2.5: a MAC, no HMAC construction needed): the same keyed digest
        # at about a third of HMAC-SHA256's cost through OpenSSL, on every request.
        digest = hashlib.blake2b(user_key.encode(), key=self._key, digest_size=32).digest()
        self._last_seen[digest] = time.monotonic()
        self._last_seen.move_to_end(digest)
        if len(self._last_seen) > MAX_TRACKED_USERS:
            self._last_seen.popitem(last=False)

    def count(self) -> int:
        horizon = time.monotonic() - self._window_s
        while self._last_seen:
            digest, seen = next(iter(self._last_seen.items()))
            if seen >= horizon:
                break
            del self._last_seen[digest]
        return len(self._last_seen)


class _StateCollector(Collector):
    """Figures read at scrape time from the objects that own them: replicas, queues, active users."""

    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return self._read()


class GatewayMetrics:
    """Every series the gateway exports, in a registry of its own (several gateways can live in one process)."""

    def __init__(self, active_users_window_s: float) -> None:
        # No *_created series: they double the exposition and no dashboard or alert reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.active_users = ActiveUsers(active_users_window_s)
        self._window_s = active_users_window_s
        self._pool: ReplicaPool | None = None
        self._admission: Admission | None = None
        self._listener_certificate: CertificateReloader | None = None
        self._refused_since_log: collections.Counter[str] = collections.Counter()
        r = self.registry
        self.requests = Counter("airlock_requests", "API requests answered, by model, route and status code.",
                                ["model", "route", "status"], registry=r)
        self.duration = Histogram(
            "airlock_request_duration_seconds",
            "From a request's arrival to the end of its answer, for requests forwarded to an engine.",
            ["model", "route", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "airlock_time_to_first_token_seconds",
            "From a request's arrival to the first byte of the engine's answer (the whole answer when not streamed).",
            ["model", "route", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_s = Histogram(
            "airlock_output_tokens_per_second",
            "Tokens generated per second for one request, from forwarding to the answer's end.",
            ["model"], buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.output_tokens = Counter("airlock_output_tokens", "Tokens generated, as the engines reported them.",
                                     ["model"], registry=r)
        self.prompt_tokens = Counter("airlock_prompt_tokens", "Prompt tokens, as the engines reported them.",
                                     ["model"], registry=r)
        self.queue_wait = Histogram(
            "airlock_queue_wait_seconds", "Time requests waited in the fair queue for an engine slot.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "airlock_gateway_overhead_seconds",
            "The gateway's own time: before_forward (arrival to forwarding, queue wait excluded) and per_chunk "
            "(mean time to pass one streamed chunk on, per request).",
            ["stage"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.upstream_errors = Counter("airlock_upstream_errors", "Engine failures seen by the gateway, by reason.",
                                       ["reason"], registry=r)
        self.retries = Counter("airlock_upstream_retries", "Requests tried again on another replica.", registry=r)
        self.rejections = Counter("airlock_rejected_requests", "Requests the gateway refused, by reason and code.",
                                  ["reason", "code"], registry=r)
        self.documents = Counter(
            "airlock_documents",
            "Documents sent to the render workers, by purpose (request, preview) and outcome (rendered; refused: "
            "damaged, encrypted or too many pages; unprocessable: a worker out of memory or time; busy: no worker "
            "free in time; failed; cancelled).", ["purpose", "outcome"], registry=r)
        self.document_pages = Counter("airlock_document_pages", "Pages rendered from documents, by purpose.",
                                      ["purpose"], registry=r)
        self.render_seconds = Histogram(
            "airlock_document_render_seconds",
            "Time to render one document, waiting for a free worker included, by purpose.",
            ["purpose"], buckets=RENDER_BUCKETS, registry=r)
        for purpose in DOCUMENT_PURPOSES:  # every series exists from the start, at zero
            self.document_pages.labels(purpose)
            self.render_seconds.labels(purpose)
            for outcome in DOCUMENT_OUTCOMES:
                self.documents.labels(purpose, outcome)
        # A plain count, read at each scrape: cheaper per request than a Gauge's locked inc() and dec().
        self.requests_in_flight = 0
        # API requests (not probes or scrapes) started and finished since the start, never exported: the heap
        # trimmer's sign of activity (runtime.HeapTrimmer).
        self.requests_started = self.requests_finished = 0
        Gauge("airlock_requests_in_flight", "API requests under way in the gateway (queued too).",
              registry=r).set_function(lambda: self.requests_in_flight)
        for reason in UPSTREAM_ERRORS:
            self.upstream_errors.labels(reason)
        ProcessCollector(namespace="airlock", registry=r)
        r.register(_StateCollector(self._state))
        # What ``finish`` observes for every request, by label values (see ``_Children``).
        self._requests = _Children(self.requests)
        self._duration = _Children(self.duration)
        self._ttft = _Children(self.ttft)
        self._queue_wait = _Children(self.queue_wait)
        self._prompt_tokens = _Children(self.prompt_tokens)
        self._output_tokens = _Children(self.output_tokens)
        self._tokens_per_s = _Children(self.tokens_per_s)
        self._overhead = _Children(self.overhead)

    def watch(self, pool: ReplicaPool, admission: Admission,
              listener_certificate: CertificateReloader | None = None) -> None:
        """Export the replicas' health and load, the queues' lengths and the certificates' expiry (the listener's,
        the client certificate in ``pool``), read at each scrape."""
        self._pool, self._admission, self._listener_certificate = pool, admission, listener_certificate

    def _certificates(self) -> Iterator[tuple[str, CertificateReloader]]:
        """The certificates the gateway presents, by role (a fixed list: never a file or host name)."""
        if self._listener_certificate is not None:
            yield "gateway", self._listener_certificate
        if self._pool is not None and self._pool.tls is not None:
            yield "upstream_client", self._pool.tls.reloader
        shared = self._admission.shared_limits if self._admission is not None else None
        if shared is not None and shared.reloader is not None:
            yield "shared_limits_client", shared.reloader

    def _state(self) -> Iterator[Metric]:
        users = GaugeMetricFamily("airlock_active_users",
                                  f"Distinct users with a request in the last {self._window_s:g} s (a count only).")
        users.add_metric([], self.active_users.count())
        yield users
        if self._pool is not None:
            healthy = GaugeMetricFamily("airlock_replica_healthy", "1 while a replica is in the pool.",
                                        labels=["replica"])
            outstanding = GaugeMetricFamily("airlock_replica_outstanding", "Requests in flight on a replica.",
                                            labels=["replica"])
            limit = GaugeMetricFamily("airlock_replica_max_in_flight",
                                      "Requests a replica is given at once (fixed, or learnt from its KV cache when it "
                                      "joined; 0 until then).", labels=["replica"])
            for replica in self._pool.replicas:
                healthy.add_metric([str(replica.index)], 1.0 if replica.healthy else 0.0)
                outstanding.add_metric([str(replica.index)], replica.outstanding)
                limit.add_metric([str(replica.index)], replica.max_in_flight)
            yield healthy
            yield outstanding
            yield limit
            ready = GaugeMetricFamily("airlock_ready", "1 while every model has a healthy replica (as /readyz).")
            ready.add_metric([], 1.0 if self._pool.ready else 0.0)
            yield ready
        expiry = GaugeMetricFamily(
            "airlock_tls_certificate_expiry_timestamp_seconds",
            "When a certificate the gateway presents expires (its notAfter, unix seconds): gateway (its listener), "
            "upstream_client (to the engines), shared_limits_client (to the limits server). The one in use: a renewal "
            "shows once it is loaded.",
            labels=["certificate"])
        for role, reloader in self._certificates():
            if reloader.not_after is not None:
                expiry.add_metric([role], reloader.not_after.timestamp())
        if expiry.samples:
            yield expiry
        if self._admission is not None:
            queued = GaugeMetricFamily("airlock_queued_requests", "Requests waiting in a model's fair queue.",
                                       labels=["model"])
            for model, queue in self._admission.queues():
                queued.add_metric([model], queue.queued)
            yield queued
            shared = self._admission.shared_limits
            if shared is not None:
                connected = GaugeMetricFamily(
                    "airlock_shared_limits_connected",
                    "1 while the limits server counts users' own limits for every gateway (admission.shared_limits); "
                    "0 while this gateway cannot reach it and counts its own requests.")
                connected.add_metric([], 1.0 if shared.connected else 0.0)
                yield connected

    def document_rendered(self, purpose: str, outcome: str, seconds: float, pages: int) -> None:
        """One document back from the render workers (``purpose`` and ``outcome`` from the lists above)."""
        self.documents.labels(purpose, outcome).inc()
        self.render_seconds.labels(purpose).observe(seconds)
        if pages:
            self.document_pages.labels(purpose).inc(pages)

    def rejected(self, error: AirlockError) -> None:
        reason = error.reason
        if reason is not None:
            self.rejections.labels(reason, error.code).inc()
            self._refused_since_log[reason] += 1

    async def log_refusals(self, interval_s: float) -> None:
        """Every ``interval_s``, one log line with how many requests were refused, by reason (counts only)."""
        while True:
            await asyncio.sleep(interval_s)
            if not self._refused_since_log:
                continue
            counts, self._refused_since_log = dict(self._refused_since_log), collections.Counter()
            summary = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
            log.info("requests refused in the last %g s: %s", interval_s, summary,
                     extra={"event": {"event": "requests_refused", "window_s": interval_s, "counts": counts}})

    def finish(self, record: RequestRecord, status: int) -> None:
        """Observe a request at its end (its answer sent, or the client gone)."""
        end = time.perf_counter()
        model, route = record.model, record.route
        self._requests(model, route, str(status)).inc()
        if record.forwarded_at is None:
            return
        stream = "true" if record.stream else "false"
        self._duration(model, route, stream).observe(end - record.arrived)
        waited = record.queue_wait or 0.0
        self._overhead("before_forward").observe(max(0.0, record.forwarded_at - record.arrived - waited))
        if record.queue_wait is not None:
            self._queue_wait(model).observe(record.queue_wait)
        if record.first_byte_at is not None:
            self._ttft(model, route, stream).observe(record.first_byte_at - record.arrived)
        if record.chunks:
            self._overhead("per_chunk").observe(record.relay_s / record.chunks)
        if record.prompt_tokens:
            self._prompt_tokens(model).inc(record.prompt_tokens)
        if record.completion_tokens:
            self._output_tokens(model).inc(record.completion_tokens)
            if end > record.forwarded_at:
                self._tokens_per_s(model).observe(record.completion_tokens / (end - record.forwarded_at))
