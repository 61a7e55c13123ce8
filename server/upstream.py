"""The engines behind the gateway: their health, the models they serve, and which one takes a request.

Replicas are named by index only ("replica 0"); addresses never reach a log line or an error message.

Engines reached over ``https://`` are verified against ``upstream_tls.ca_file`` (host name included), and are shown
the gateway's client certificate, from one TLS context shared by both clients; a renewed certificate file goes into
that context while the pool runs, for the connections opened afterwards.

Each replica has two clients: httpx for the control plane (health checks, model lists, metrics: a few requests a
second), and ``engine_http`` for the requests themselves, llhttp's parser and a pool of connections with nothing
else on the path (profiled with py-spy under `make bench`: httpx's stack was about 45% of the gateway's CPU, and
aiohttp's client, which came next, 30%).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx

from .config import ConfigError, GatewaySettings, UpstreamTlsSettings
from .engine_http import KEEPALIVE_EXPIRY_S, EngineConnections
from .engine_limits import FALLBACK_IN_FLIGHT, in_flight_limit, kv_cache_tokens
from .fairqueue import Capacity
from .tls import CertificateFiles, CertificateReloader, TlsFileError, client_context

if TYPE_CHECKING:
    from .routing import RoutingStrategy

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
# A busy engine can be slow to answer /health; only this many slow answers in a row take it out of the pool, and
# none while it is still sending answers (bytes within the last PROGRESS_KEEPS_HEALTHY_S). A refused connection
# or an error status takes it out at once.
SLOW_CHECKS_TOLERATED = 2
PROGRESS_KEEPS_HEALTHY_S = 10.0
# An engine's metrics are some hundreds of KB at most; anything longer is not read for its KV cache size.
MAX_ENGINE_METRICS_BYTES = 8 * 1024 * 1024
# OpenSSL's verify codes for a certificate that does not name the host asked for (its message would quote the host).
_NAME_MISMATCH = frozenset({62, 63, 64})
# The alerts (RFC 8446 section 6.2) an engine sends about the client certificate it was shown, as OpenSSL names them.
_CLIENT_CERTIFICATE_REFUSED = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                                         "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
                                         "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
                                         "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_ACCESS_DENIED"})


@dataclass
class Replica:
    """One vLLM server, reached over a unix socket or HTTP."""

    index: int
    client: httpx.AsyncClient
    url: str = ""
    # The data plane's connections (None only in tests of the control plane).
    connections: EngineConnections | None = None
    healthy: bool = False
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    outstanding: int = 0
    # Requests it is given at once (beyond that they wait in the fair queue): admission.max_in_flight_per_replica,
    # or with auto what its KV cache holds, learnt when it joins the pool (0 until then).
    max_in_flight: int = 0
    # Whether max_in_flight comes from the engine's own KV cache size (not the fallback).
    capacity_known: bool = False
    slow_checks: int = 0
    # When bytes of an answer last came from it (time.monotonic()).
    last_progress: float = 0.0
    # The last TLS failure logged for it, so a misconfiguration is said once, not at every check.
    tls_failure: str = ""
    recheck: asyncio.Task[None] | None = None

    def serves(self, model: str) -> bool:
        return model in self.models

    def made_progress(self) -> None:
        self.last_progress = time.monotonic()

    @property
    def answering(self) -> bool:
        return time.monotonic() - self.last_progress < PROGRESS_KEEPS_HEALTHY_S


@dataclass
class EngineTls:
    """The gateway's side of ``https://`` engines: one client context, its certificate kept in step with its files."""

    context: ssl.SSLContext
    reloader: CertificateReloader

    @classmethod
    def from_settings(cls, settings: UpstreamTlsSettings) -> EngineTls:
        certificate = CertificateFiles(settings.cert_file, settings.key_file)
        try:
            context = client_context(settings.ca_file, certificate)
        except TlsFileError as exc:
            raise ConfigError(f"upstream_tls: {exc}") from exc
        return cls(context, CertificateReloader(certificate, [context]))


def make_client(url: str, settings: GatewaySettings, tls: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    """An HTTP client for one engine; ``unix:/path`` means a unix socket, ``https://`` is verified with ``tls``."""
    timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
    limits = httpx.Limits(
        max_connections=settings.max_upstream_connections,
        # Over TLS, every check makes a new connection and so a new handshake: a connection kept alive stays
        # authenticated, and checks passing on it would keep a replica in the pool after its certificate, or the
        # gateway's, was replaced by one the other side refuses (every request then failed; seen by a newcomer).
        max_keepalive_connections=0 if url.startswith("https://") else min(settings.max_upstream_connections, 256),
        # Shorter than the engine's own keep-alive (uvicorn's 5 s), so a connection it is closing is not reused.
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    if url.startswith("unix:"):
        transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:"), limits=limits, retries=0)
        base_url = "http://engine"
    else:
        verify: ssl.SSLContext | bool = tls if tls is not None and url.startswith("https://") else True
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=0, verify=verify)
        base_url = url.rstrip("/")
    # trust_env=False: proxy variables in the environment must never send prompts elsewhere.
    return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=timeout, trust_env=False)


def make_connections(url: str, settings: GatewaySettings, tls: ssl.SSLContext | None = None) -> EngineConnections:
    """The data plane's connections to one engine; ``https://`` is verified with ``tls``."""
    # connect_timeout_s: the connection itself; read_timeout_s: the longest silence of the engine, and the longest
    # wait for a free connection. Nothing of the environment (proxy variables) is read: prompts never go elsewhere.
    return EngineConnections(url, connect_timeout_s=settings.connect_timeout_s,
                             read_timeout_s=settings.read_timeout_s,
                             max_connections=settings.max_upstream_connections, tls=tls)


def tls_failure(exc: BaseException) -> str | None:
    """What went wrong with an https:// engine's TLS, in words that name settings, never an address (None: nothing
    TLS did, such as a refused connection)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        if cause.verify_code in _NAME_MISMATCH:
            return "the engine's certificate does not name the host in its URL (upstreams[].url)"
        return (f"the engine's certificate was not accepted ({cause.verify_message}): is it signed by "
                "upstream_tls.ca_file, and still valid?")
    reason = getattr(cause, "reason", None)  # OpenSSL's name for what went wrong, when it gave one
    if reason in _CLIENT_CERTIFICATE_REFUSED:
        return (f"the engine refused the gateway's client certificate ({reason}): is upstream_tls.cert_file "
                "signed by its engine.tls.client_ca_file, and still valid?")
    if cause is not None and not isinstance(cause, ssl.SSLEOFError):
        return f"TLS handshake failed ({cause.reason or type(cause).__name__})"
    # Engines end the handshake without a word for a client certificate they do not accept: with TLS 1.2 the
    # handshake meets the end of the connection, with TLS 1.3 the request that follows it does.
    if cause is not None or isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return ("the engine closed the connection during or right after the TLS handshake: does it accept "
                "upstream_tls.cert_file (signed by its engine.tls.client_ca_file)?")
    return None


class Lease:
    """A request in flight on a replica, for as long as the ``with`` block runs (a class, not a generator: this is
    on every request's path)."""

    __slots__ = ("replica",)

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def __enter__(self) -> Replica:
        self.replica.outstanding += 1
        return self.replica

    def __exit__(self, *_: object) -> None:
        self.replica.outstanding -= 1


class ReplicaPool:
    """Keeps an up-to-date view of the engines by polling them, and picks one per request.

    ``max_in_flight_per_replica``: requests each replica is given at once, or ``"auto"``: what its KV cache holds
    at ``expected_tokens_per_request`` each, at most ``max_num_seqs`` (see ``engine_limits``). With
    ``gateway_replicas`` gateways in front of the same engines, this one takes its share of either (at least 1).
    """

    def __init__(
        self,
        urls: Sequence[str],
        settings: GatewaySettings,
        strategy: RoutingStrategy,
        max_in_flight_per_replica: int | Literal["auto"],
        tls: UpstreamTlsSettings | None = None,
        *,
        expected_tokens_per_request: int = 4096,
        max_num_seqs: int | None = None,
        gateway_replicas: int = 1,
    ) -> None:
        self.tls = EngineTls.from_settings(tls) if tls is not None else None
        context = self.tls.context if self.tls is not None else None
        self._gateways = gateway_replicas
        fixed = 0 if max_in_flight_per_replica == "auto" else self._share(max_in_flight_per_replica)
        self.replicas = [Replica(index, make_client(url, settings, context), url,
                                 make_connections(url, settings, context), max_in_flight=fixed)
                         for index, url in enumerate(urls)]
        self._settings = settings
        self._interval = settings.health_interval_s
        self._strategy = strategy
        self._learn_in_flight = max_in_flight_per_replica == "auto"
        self._expected_tokens = expected_tokens_per_request
        self._max_num_seqs = max_num_seqs
        self._task: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None
        # Called when a replica joins or leaves the pool (the fair queues' capacity changes).
        self.on_change: list[Callable[[], None]] = []

    async def start(self) -> None:
        if self.tls is not None:
            # The client certificate is renewed in place for as long as the pool serves.
            self._reloading = asyncio.create_task(self.tls.reloader.run(), name="airlock-upstream-tls")
        await self.check_all()
        self._task = asyncio.create_task(self._poll(), name="airlock-health")

    async def close(self) -> None:
        for task in (self._task, self._reloading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for replica in self.replicas:
            if replica.recheck is not None:
                replica.recheck.cancel()
        await asyncio.gather(*(replica.client.aclose() for replica in self.replicas))
        await asyncio.gather(*(replica.connections.close() for replica in self.replicas if replica.connections))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_all()
            except Exception as exc:  # a kind of failure not foreseen must not end the checks (the type only: no URL)
                log.error("the engines' health checks failed (%s); trying again in %g s", type(exc).__name__,
                          self._interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(replica) for replica in self.replicas))

    async def _check(self, replica: Replica) -> None:
        reason = ""
        try:
            health = await self._probe(replica, "/health")
            healthy = health.status_code == 200
            reason = f"health status {health.status_code}"
            # Learnt when a replica (re)joins: an engine restarted in its place may serve another model.
            if healthy and (not replica.models or not replica.healthy):
                listing = await self._probe(replica, "/v1/models")
                listing.raise_for_status()
                replica.models = {card["id"]: card for card in listing.json()["data"]}
                if self._learn_in_flight:
                    await self._learn_capacity(replica)
            elif healthy and self._learn_in_flight and not replica.capacity_known:
                # Its KV cache size could not be read as it joined (a slow answer): asked again until it can.
                await self._learn_capacity(replica)
        except httpx.TimeoutException:
            replica.slow_checks += 1
            healthy = replica.healthy and (replica.slow_checks < SLOW_CHECKS_TOLERATED or replica.answering)
            reason = f"{replica.slow_checks} health checks in a row timed out"
        # OSError: an ssl.SSLError read after a TLS 1.3 handshake (an alert about the client certificate) reaches here
        # as it is, not as an httpx error; uncaught, it ended the health checks for good.
        except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
            healthy = False
            reason = f"health check failed ({type(exc).__name__})"
            failure = tls_failure(exc) if replica.url.startswith("https://") else None
            if failure is not None:
                self._report_tls_failure(replica, failure)
        else:
            replica.slow_checks = 0
        self._set_health(replica, healthy, reason)

    async def _learn_capacity(self, replica: Replica) -> None:
        """Size the replica's in-flight limit from its KV cache, read once as it joins the pool (an engine restarted
        in its place may have another); an engine that does not say gets the fallback, with one warning."""
        tokens = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = await self._probe(replica, "/metrics")
            if answer.status_code == 200 and len(answer.content) <= MAX_ENGINE_METRICS_BYTES:
                tokens = kv_cache_tokens(answer.text)
        if tokens is None:
            whole = min(FALLBACK_IN_FLIGHT, self._max_num_seqs or FALLBACK_IN_FLIGHT)
            if self._share(whole) != replica.max_in_flight:
                log.warning("replica %d does not report its KV cache size (vllm:cache_config_info); it is given %d "
                            "requests at once (set admission.max_in_flight_per_replica to choose)", replica.index,
                            whole)
        else:
            whole = in_flight_limit(tokens, self._expected_tokens, self._max_num_seqs)
            if self._share(whole) != replica.max_in_flight:
                log.info("replica %d holds %d requests of %d tokens (KV cache %d tokens)", replica.index, whole,
                         self._expected_tokens, tokens)
        limit = self._share(whole)
        if self._gateways > 1 and limit != replica.max_in_flight:
            log.info("replica %d: this gateway, one of %d (admission.gateway_replicas), sends it %d of those at once",
                     replica.index, self._gateways, limit)
            if whole < self._gateways:
                log.warning("replica %d holds %d requests at once, fewer than the %d gateways sharing it: each still "
                            "sends it 1, and vLLM queues the rest first come, first served", replica.index, whole,
                            self._gateways)
        replica.max_in_flight = limit
        replica.capacity_known = tokens is not None

    def _share(self, limit: int) -> int:
        """This gateway's part of a replica's ``limit``, when ``gateway_replicas`` gateways share the engines."""
        return max(1, limit // self._gateways)

    @staticmethod
    async def _probe(replica: Replica, path: str) -> httpx.Response:
        """GET ``path``, once more if the connection died without an answer: a kept-alive connection the engine
        closed at that moment says nothing about its health, and must not take it out of the pool."""
        try:
            return await replica.client.get(path, timeout=HEALTH_TIMEOUT_S)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await replica.client.get(path, timeout=HEALTH_TIMEOUT_S)

    @staticmethod
    def _report_tls_failure(replica: Replica, failure: str) -> None:
        """A TLS failure is a misconfiguration more often than an outage: say what it is, once (even for a replica
        that was never healthy, whose state does not change)."""
        if failure != replica.tls_failure:
            replica.tls_failure = failure
            log.warning("replica %d cannot be reached over TLS: %s", replica.index, failure)

    def _set_health(self, replica: Replica, healthy: bool, reason: str) -> None:
        """``reason``: why it left the pool, for the log (status codes and exception type names only)."""
        if healthy != replica.healthy:
            if healthy:
                log.info("replica %d is healthy, serving %s", replica.index, ", ".join(sorted(replica.models)))
            else:
                log.warning("replica %d is unhealthy: %s", replica.index, reason)
            replica.healthy = healthy
            for listener in self.on_change:
                listener()

    def mark_failed(self, replica: Replica) -> None:
        """Passive detection: a replica that refused a connection leaves the rotation at once, until a health check
        succeeds (one is started now)."""
        self._set_health(replica, False, "a request could not connect")
        self.check_soon(replica)

    def check_soon(self, replica: Replica) -> None:
        """Passive detection of a replica that answered with a server error: check its health now, not at the next
        round (one check at a time per replica)."""
        if replica.recheck is None or replica.recheck.done():
            replica.recheck = asyncio.create_task(self._check(replica), name=f"airlock-recheck-{replica.index}")

    def _candidates(self, model: str, exclude: Replica | None = None) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r.serves(model) and r is not exclude]

    def pick(self, model: str, tenant: str, exclude: Replica | None = None) -> Replica | None:
        """A replica for the request: among healthy ones serving ``model``, those below the per-replica cap (a
        request being retried may go over it)."""
        candidates = self._candidates(model, exclude)
        roomy = [replica for replica in candidates if replica.outstanding < replica.max_in_flight]
        return self._strategy.choose(roomy or candidates, tenant) if candidates else None

    @staticmethod
    def lease(replica: Replica) -> Lease:
        """Count a request in flight on ``replica`` while a ``with`` block runs (routing reads the count); the pool
        is the only place that changes it."""
        return Lease(replica)

    def capacity(self, model: str) -> Capacity:
        """Requests ``model``'s healthy replicas may have in flight at once, and how many replicas they are."""
        candidates = self._candidates(model)
        return Capacity(sum(replica.max_in_flight for replica in candidates), len(candidates))

    def context_of(self, model: str) -> int | None:
        """The longest context a replica serving ``model`` has (its /v1/models card's max_model_len), if one says."""
        lengths = [replica.models[model].get("max_model_len") for replica in self.replicas if replica.serves(model)]
        known = [length for length in lengths if isinstance(length, int) and length > 0]
        return max(known) if known else None

    def can_serve(self, model: str) -> bool:
        """Whether a healthy replica serves ``model`` (without taking a routing turn)."""
        return bool(self._candidates(model))

    def knows(self, model: str) -> bool:
        """True when some replica, healthy or not, has ever served ``model``."""
        return any(replica.serves(model) for replica in self.replicas)

    @property
    def ready(self) -> bool:
        """Every model any replica has served has a healthy replica now (and at least one replica is healthy)."""
        models = {model for replica in self.replicas for model in replica.models}
        return any(replica.healthy for replica in self.replicas) and all(self.can_serve(m) for m in models)

    @property
    def served_models(self) -> frozenset[str]:
        """Every model a replica serves, as its last /v1/models said (healthy or not). It changes only when a
        replica joins the pool, so the ``on_change`` listeners see every change."""
        return frozenset(model for replica in self.replicas for model in replica.models)

    @property
    def any_healthy(self) -> bool:
        return any(replica.healthy for replica in self.replicas)

    def model_cards(self) -> list[dict[str, Any]]:
        """OpenAI model cards for the models healthy replicas serve (no engine paths or internals)."""
        cards: dict[str, dict[str, Any]] = {}
        for replica in self.replicas:
            if not replica.healthy:
                continue
            for model_id, card in replica.models.items():
                cards.setdefault(
                    model_id,
                    {
                        "id": model_id,
                        "object": "model",
                        "created": card.get("created", 0),
                        "owned_by": "airlock",
                        "max_model_len": card.get("max_model_len"),
                    },
                )
        return [cards[name] for name in sorted(cards)]
