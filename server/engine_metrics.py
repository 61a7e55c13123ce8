"""The engine launcher's own ``/metrics`` (``engine.metrics_port``): its replicas' ``vllm:*`` series, once.

Where more than one gateway runs (the Helm chart runs two), gateways that re-exported every engine's series would
multiply them by the number of gateways. There the gateways leave them out (``metrics.engine_series: false``) and the
launcher next to each engine serves them, through the gateway's own ``MetricsEndpoint`` (the same ``vllm:*`` filter,
the same ``replica`` label, the same ``airlock_engine_scrape_ok``). The listener is plain HTTP and serves nothing but
``GET /metrics``: Prometheus gets no certificate that could also send completions to the engine's mTLS port.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from .config import ConfigError, Settings
from .engine import ReplicaLaunch
from .metrics_endpoint import MetricsEndpoint
from .tls import CertificateFiles, CertificateReloader, TlsFileError, own_server_client_context, server_context


@dataclass(frozen=True)
class LocalEngine:
    """One replica of this launcher, with its cluster-wide replica label."""

    index: int
    client: httpx.AsyncClient


@dataclass(frozen=True)
class EngineMetrics:
    """What the launcher's metrics listener needs: the endpoint, its clients (closed at the end) and the reloader
    that keeps the engine certificate it presents in step with renewals (None without engine.tls)."""

    endpoint: MetricsEndpoint
    engines: Sequence[LocalEngine]
    reloader: CertificateReloader | None

    async def aclose(self) -> None:
        for engine in self.engines:
            await engine.client.aclose()


def engine_metrics(settings: Settings, launches: Sequence[ReplicaLaunch]) -> EngineMetrics:
    """Clients for this launcher's replicas, labelled ``engine.metrics_replica_offset`` + their index. With
    engine.tls the engine's own certificate is presented (the engines accept only certificates of
    engine.tls.client_ca_file: in the chart the engine CA issues both); raises ConfigError naming a file that
    cannot be used, or an engine certificate its own engines would refuse as a client (two CAs, as in the README's
    two-host set-up: every scrape would then say only airlock_engine_scrape_ok 0)."""
    engine = settings.engine
    context: ssl.SSLContext | None = None
    reloader = None
    if engine.tls is not None:
        certificate = CertificateFiles(engine.tls.cert_file, engine.tls.key_file)
        try:
            context = own_server_client_context(certificate)
            refused = _refused_as_client(certificate, engine.tls.client_ca_file, context)
        except TlsFileError as exc:
            raise ConfigError(f"engine.tls (for engine.metrics_port): {exc}") from exc
        if refused is not None:
            raise ConfigError(
                f"engine.metrics_port: the engines would refuse the certificate it presents to them "
                f"(engine.tls.cert_file {engine.tls.cert_file}: {refused}); they take only client certificates "
                f"issued by engine.tls.client_ca_file. Issue the engines' certificate from that CA with client "
                f"authentication (as the Helm chart does), or leave engine.metrics_port unset and let the gateway "
                f"export the engines' series (metrics.engine_series: true)")
        reloader = CertificateReloader(certificate, [context])
    engines = [LocalEngine(engine.metrics_replica_offset + launch.index, _client(launch.url, context))
               for launch in launches]
    endpoint = MetricsEndpoint(None, engines, settings.metrics.engine_timeout_s)
    return EngineMetrics(endpoint, engines, reloader)


def _client(url: str, context: ssl.SSLContext | None) -> httpx.AsyncClient:
    # trust_env=False: no proxy from the environment between the launcher and its own engine.
    if url.startswith("unix:"):
        transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:"), retries=0)
        return httpx.AsyncClient(transport=transport, base_url="http://engine", trust_env=False)
    verify: ssl.SSLContext | bool = context if context is not None else True
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(verify=verify, retries=0), base_url=url,
                             trust_env=False)


def _refused_as_client(certificate: CertificateFiles, client_ca_file: Path, client: ssl.SSLContext) -> str | None:
    """Why an engine configured with ``certificate`` and ``client_ca_file`` would refuse ``certificate`` as a
    client, or None. A TLS handshake in memory between the two contexts, so that OpenSSL itself decides (chain,
    validity, client-authentication purpose) as it will on the engine's port; nothing goes on the network."""
    server = server_context(certificate, client_ca_file)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    client_side = client.wrap_bio(to_client, to_server, server_side=False)
    done = {"server": False, "client": False}
    for _ in range(10):  # a TLS 1.3 handshake with client certificates takes three flights
        for name, side in (("client", client_side), ("server", server_side)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc.reason or "refused"
        if all(done.values()):
            # TLS 1.3: the client finishes before the server has checked its certificate; the server's own
            # handshake (done above) is the verdict.
            return None
    return "no TLS handshake"
