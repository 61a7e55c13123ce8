"""Each engine's ``vllm:*`` series exported once: a gateway with ``metrics.engine_series: false`` leaves them out
(several gateways would each export them again), and the engine launcher's own listener (``engine.metrics_port``)
serves them, read from the real engine, labelled with the replica index the gateway gives it."""

from __future__ import annotations

import asyncio
import http.server
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from server.config import ConfigError, Settings
from server.engine import ReplicaLaunch
from server.engine_metrics import engine_metrics
from server.metrics_endpoint import MAX_ENGINE_METRICS_BYTES, MetricsEndpoint
from server.runner import engine_metrics_listener
from server.tls import CertificateFiles, server_context

from .conftest import AIRLOCK, ROOT, Credentials, Stack, airlock_env, stop, wait_ready, write_config
from .servers import free_port
from .test_engine_tls import make_pki


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, []).extend((sample.labels, sample.value) for sample in family.samples)
    return found


@pytest.mark.engine
def test_a_gateway_without_engine_series_exports_no_vllm_series(stack: Stack, credentials: Credentials,
                                                                  tmp_path: Path) -> None:
    """The real gateway in front of the session's real engine, as the chart runs it."""
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path / "gateway.yaml", {
        "gateway": {"port": port},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "upstreams": [{"url": f"unix:{stack.engine_socket}"}],
        "metrics": {"listener": "separate", "port": metrics_port, "engine_series": False},
    })
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env=airlock_env())
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", gateway, log_path, 60)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    finally:
        stop(gateway)
    found = families(text)
    assert "airlock_requests" in found and "airlock_replica_healthy" in found  # its own series are there
    assert not [name for name in found if name.startswith("vllm:")]
    # It read no engine's metrics, so it says nothing about reading them: the engine's listener does.
    assert "airlock_engine_scrape_ok" not in found


async def scrape_engine_listener(settings: Settings, launches: list[ReplicaLaunch]) -> str:
    port = settings.engine.metrics_port
    async with engine_metrics_listener(settings, launches), httpx.AsyncClient(timeout=30) as client:
        answer = await client.get(f"http://127.0.0.1:{port}/metrics")
        refused = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert refused.status_code in (404, 405)  # metrics and nothing else: no way to the engine's API
    return answer.text


@pytest.mark.engine
def test_the_engine_launchers_listener_serves_its_engines_vllm_series_with_the_replica_label(
    stack: Stack, tmp_path: Path,
) -> None:
    """The listener `airlock engine` runs with engine.metrics_port, over the session's real engine (the chart's
    engine pod 3 runs one replica, labelled 3 as the gateway labels it), and one replica that does not exist."""
    settings = Settings.model_validate({"engine": {
        "metrics_port": free_port(), "metrics_replica_offset": 3, "socket_dir": str(stack.socket_dir),
    }, "metrics": {"engine_timeout_s": 5}})
    launches = [ReplicaLaunch(0, [], {}, f"unix:{stack.engine_socket}"),
                ReplicaLaunch(1, [], {}, f"unix:{tmp_path / 'no-such-engine.sock'}")]
    found = families(asyncio.run(scrape_engine_listener(settings, launches)))
    engine = {name: samples for name, samples in found.items() if name.startswith("vllm:")}
    assert "vllm:num_requests_running" in engine and "vllm:generation_tokens" in engine
    assert {labels["replica"] for samples in engine.values() for labels, _ in samples} == {"3"}
    scraped = {labels["replica"]: value for labels, value in found["airlock_engine_scrape_ok"]}
    assert scraped == {"3": 1.0, "4": 0.0}
    # Only vllm:* and the scrape gauge: the engine's process series, and no gateway series.
    assert set(found) - set(engine) == {"airlock_engine_scrape_ok"}


# --- an engine that misbehaves ------------------------------------------------------------------------------------
# A real vLLM cannot be made to send an endless /metrics or trickle it: a small HTTP server on a real socket does
# (the one fake here). The scrape must stop reading at the size limit, and give up after engine_timeout_s in all.

@asynccontextmanager
async def misbehaving_engine(chunk: bytes, pause_s: float, sent: list[int]) -> AsyncIterator[str]:
    """An HTTP/1.1 server whose /metrics answer never ends: ``chunk`` after ``chunk``, ``pause_s`` apart."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        try:
            while True:
                writer.write(chunk)
                await writer.drain()
                sent.append(len(chunk))
                await asyncio.sleep(pause_s)
        except (ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


class _Replica:
    def __init__(self, url: str) -> None:
        self.index = 0
        self.client = httpx.AsyncClient(base_url=url, trust_env=False)


async def scrape_misbehaving(chunk: bytes, pause_s: float, timeout_s: float) -> tuple[str, float, int]:
    sent: list[int] = []
    async with misbehaving_engine(chunk, pause_s, sent) as url:
        replica = _Replica(url)
        started = time.monotonic()
        # A scrape still reading after 30 s has failed (the old code read on for ever).
        text = (await asyncio.wait_for(MetricsEndpoint(None, [replica], timeout_s).render(), 30)).decode()
        took = time.monotonic() - started
        await replica.client.aclose()
    return text, took, sum(sent)


def test_an_endless_engine_answer_is_read_no_further_than_the_limit() -> None:
    line = b"vllm:num_requests_running 1\n" * (64 * 1024 // 28)
    text, _, sent = asyncio.run(scrape_misbehaving(line, 0, 60))
    scraped = {labels["replica"]: value for labels, value in families(text)["airlock_engine_scrape_ok"]}
    assert scraped == {"0": 0.0} and "vllm:" not in text.replace("airlock_engine_scrape_ok", "")
    # Read up to the limit (plus what the socket buffers held), not the whole answer into memory first.
    assert sent < MAX_ENGINE_METRICS_BYTES + 8 * 1024 * 1024


def test_an_engine_trickling_its_answer_is_given_up_after_the_timeout_in_all() -> None:
    """httpx's timeout is per read: an answer that sends a little every 0.2 s would hold each scrape forever."""
    text, took, _ = asyncio.run(scrape_misbehaving(b"vllm:num_requests_running 1\n", 0.2, 1.0))
    assert families(text)["airlock_engine_scrape_ok"] == [({"replica": "0"}, 0.0)]
    assert took < 3


# --- with engine.tls: the engine's own certificate as the client ---------------------------------------------------

class _TlsEngineMetrics(http.server.BaseHTTPRequestHandler):
    """/metrics for a client whose certificate the server's client CA verified (the handshake refuses others)."""

    def do_GET(self) -> None:
        assert isinstance(self.connection, ssl.SSLSocket) and self.connection.getpeercert()
        body = b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 2.0\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def chart_pki(tmp_path: Path) -> Iterator[tuple[Settings, int]]:
    """The chart's engine PKI: one engine CA issues the engine's certificate (server and client authentication) and
    is its client CA; a TLS server configured as the engine is (server.tls.server_context: the engine's certificate,
    client certificates required from that CA) answers /metrics. A stand-in for vLLM on the same OpenSSL: a real
    TLS engine with this PKI would cost another engine start."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1", common_name="airlock-engine-0")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "engine.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "engine.key"))
    (tmp_path / "engine.key").chmod(0o600)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TlsEngineMetrics)
    context = server_context(CertificateFiles(tmp_path / "engine.pem", tmp_path / "engine.key"), tmp_path / "ca.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings.model_validate({"engine": {"metrics_port": free_port(), "bind": "tcp", "tls": {
        "cert_file": str(tmp_path / "engine.pem"), "key_file": str(tmp_path / "engine.key"),
        "client_ca_file": str(tmp_path / "ca.pem")}}})
    try:
        yield settings, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_listener_reads_a_tls_engine_presenting_the_engines_own_certificate(
    chart_pki: tuple[Settings, int],
) -> None:
    settings, port = chart_pki

    async def scrape() -> str:
        served = engine_metrics(settings, [ReplicaLaunch(0, [], {}, f"https://127.0.0.1:{port}")])
        try:
            return (await served.endpoint.render()).decode()
        finally:
            await served.aclose()

    found = families(asyncio.run(scrape()))
    assert found["airlock_engine_scrape_ok"] == [({"replica": "0"}, 1.0)]
    assert found["vllm:num_requests_running"] == [({"model_name": "m", "replica": "0"}, 2.0)]


def test_an_engine_certificate_its_engines_would_refuse_as_a_client_is_refused_at_start(tmp_path: Path) -> None:
    """The README's two-host set-up: the engine CA issues the engine's certificate, the gateway CA is its client
    CA. The launcher's listener would present a certificate its engines refuse, and say scrape_ok 0 for ever."""
    pki = make_pki(tmp_path)
    pki.path("engine.key").chmod(0o600)
    settings = Settings.model_validate({"engine": {"metrics_port": free_port(), "bind": "tcp", "tls": {
        "cert_file": str(pki.path("engine.pem")), "key_file": str(pki.path("engine.key")),
        "client_ca_file": str(pki.path("gateway-ca.pem"))}}})
    with pytest.raises(ConfigError, match=r"engine\.metrics_port: the engines would refuse the certificate") as refused:
        engine_metrics(settings, [ReplicaLaunch(0, [], {}, "https://127.0.0.1:1")])
    assert str(pki.path("engine.pem")) in str(refused.value) and "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
