"""TLS at the gateway's listener, with real parts: certificates from a test CA (trustme), the real `airlock gateway`
in front of the session stack's real engine, and real clients (the OpenAI SDK, curl, Node, Python's ssl)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import trustme
import yaml
from starlette.responses import PlainTextResponse

from server.config import load_settings
from server.hsts import with_hsts
from server.tls import CertificateFiles, server_context

from .conftest import AIRLOCK, ROOT, Credentials, Stack, log_tail, stop, write_config
from .servers import free_port

GATEWAY_START_TIMEOUT_S = 60
# The reloader looks every 2 s (server/tls.py); "within seconds" with room for a busy machine.
# The reloader looks every 2 s; the bound leaves room for this 2-core machine stalling while the gateway relays a
# stream at full speed (seen: 17 s once in CI). It is a liveness bound, not a speed target.
RELOAD_DEADLINE_S = 60
# Long enough (seconds of generation with the demo model) that the certificate changes while it streams.
STREAM_TOKENS = 6000
# A handshake while the engine generates on both cores: 10 s was once not enough in CI, though the gateway's own
# handshake time with a held-back stream open and a renewal under way is at most 30 ms (an instant stand-in engine).
HANDSHAKE_TIMEOUT_S = 30
HSTS = "max-age=31536000"


@dataclass
class Certificates:
    """A test CA and the gateway's certificate files, which a test may replace on disk."""

    ca: trustme.CA
    directory: Path
    ca_file: Path = field(init=False)
    cert_file: Path = field(init=False)
    key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca_file = self.directory / "ca.pem"
        self.cert_file = self.directory / "airlock.crt"
        self.key_file = self.directory / "airlock.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self) -> int:
        """A new leaf for 127.0.0.1 and localhost, put in place as a renewal tool would (written aside, renamed
        over the old files); returns its serial number."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        for pem, target in ((leaf.private_key_pem, self.key_file), (leaf.cert_chain_pems[0], self.cert_file)):
            staging = target.with_suffix(".new")
            pem.write_to_path(str(staging))
            staging.chmod(0o600)
            os.replace(staging, target)
        return serial_of(self.cert_file.read_bytes())


def serial_of(pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).serial_number


@dataclass
class Gateway:
    """A running `airlock gateway`."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def trusting(ca_file: Path) -> ssl.SSLContext:
    """A client context trusting only the test CA (httpx deprecates ``verify=<path>``)."""
    return ssl.create_default_context(cafile=str(ca_file))


def start_gateway(workdir: Path, settings: dict[str, object], ready_url: str,
                  verify: ssl.SSLContext | bool) -> Gateway:
    config = write_config(workdir / "gateway.yaml", {"log_format": "text", **settings})
    log_path = workdir / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"airlock gateway exited with {process.returncode}:\n{log_tail(log_path)}")
        try:
            if httpx.get(ready_url, verify=verify, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"airlock gateway was not ready after {GATEWAY_START_TIMEOUT_S} s:\n{log_tail(log_path)}")
        time.sleep(0.5)
    return Gateway(process, int(settings["gateway"]["port"]), log_path)  # type: ignore[index]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    certificates = Certificates(trustme.CA(), tmp_path_factory.mktemp("tls"))
    certificates.issue()
    return certificates


@pytest.fixture(scope="module")
def tls_gateway(
    stack: Stack, credentials: Credentials, certificates: Certificates, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """`airlock gateway` serving TLS in front of the session stack's engine (no second engine to start)."""
    port = free_port()
    gateway = start_gateway(tmp_path_factory.mktemp("tls-gateway"), {
        "gateway": {"port": port, "shutdown_grace_s": 5,
                    "tls": {"cert_file": str(certificates.cert_file), "key_file": str(certificates.key_file)}},
        "auth": {"api_keys_file": str(credentials.api_keys), "htpasswd_file": str(credentials.htpasswd)},
        "admission": {"max_concurrent_per_user": 0, "requests_per_minute_per_user": 0},
        "upstreams": [{"url": f"unix:{stack.engine_socket}"}],
    }, f"https://127.0.0.1:{port}/readyz", trusting(certificates.ca_file))
    try:
        yield gateway
    finally:
        stop(gateway.process)


def sdk(gateway: Gateway, credentials: Credentials, ca_file: Path) -> openai.OpenAI:
    # As the README tells users: the SDK's HTTP client trusts the site's CA.
    return openai.OpenAI(base_url=f"{gateway.https}/v1", api_key=credentials.api_key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=trusting(ca_file)))


def served_serial(port: int, ca_file: Path) -> int:
    """The serial number of the certificate a new connection is given (within HANDSHAKE_TIMEOUT_S)."""
    context = trusting(ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(ssl.DER_cert_to_PEM_cert(der).encode())


@pytest.mark.engine
def test_the_openai_sdk_trusting_the_ca_gets_an_answer_and_a_stream(
    tls_gateway: Gateway, stack: Stack, credentials: Credentials, certificates: Certificates,
) -> None:
    with sdk(tls_gateway, credentials, certificates.ca_file) as client:
        sdk_answer_and_stream(client, stack.model)


def sdk_answer_and_stream(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert raw.headers["strict-transport-security"] == HSTS
    answer = raw.parse()
    assert answer.choices[0].message.content and answer.usage is not None and answer.usage.completion_tokens > 0
    # A stream passes the same layer: the header is on its first message too.
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=[{"role": "user", "content": "Count."}], max_tokens=16, stream=True,
        extra_body={"ignore_eos": True},
    ) as streamed:
        assert streamed.headers["strict-transport-security"] == HSTS
        chunks = list(streamed.parse())
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@pytest.mark.engine
def test_curl_with_cacert_gets_200_and_hsts(tls_gateway: Gateway, credentials: Credentials,
                                            certificates: Certificates, tmp_path: Path) -> None:
    # The key goes in a header file (curl -H @file), not on a command line other users could read in ps.
    header = tmp_path / "auth.header"
    header.write_text(f"Authorization: Bearer {credentials.api_key}\n")
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(certificates.ca_file), "-H", f"@{header}", "-D", "-", "-o", os.devnull,
         "-w", "%{http_code}", f"{tls_gateway.https}/v1/models"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("200")
    assert f"strict-transport-security: {HSTS}" in result.stdout.lower()
    # Without the CA, curl refuses the server (its certificate is from no CA the system knows).
    untrusting = subprocess.run(["curl", "-sS", "-o", os.devnull, f"{tls_gateway.https}/healthz"],
                                capture_output=True, text=True, timeout=60)
    assert untrusting.returncode == 60, untrusting.stderr  # CURLE_PEER_FAILED_VERIFICATION


@pytest.mark.engine
def test_node_trusts_the_ca_through_node_extra_ca_certs(tls_gateway: Gateway, certificates: Certificates) -> None:
    # The Node SDK uses Node's fetch, which trusts what NODE_EXTRA_CA_CERTS adds (the README's instruction).
    script = f"fetch('{tls_gateway.https}/healthz').then(r => console.log(r.status)).catch(e => " \
             "{ console.log('failed: ' + (e.cause && e.cause.code)); })"
    trusting = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "NODE_EXTRA_CA_CERTS": str(certificates.ca_file)})
    assert trusting.stdout.strip() == "200", trusting.stderr
    untrusting = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"})
    assert untrusting.stdout.strip().startswith("failed"), untrusting.stdout


@pytest.mark.engine
def test_the_application_sees_https(tls_gateway: Gateway, credentials: Credentials,
                                    certificates: Certificates) -> None:
    # The console marks its session cookie Secure when the request's scheme is https (scope["scheme"]).
    answer = httpx.post(f"{tls_gateway.https}/console/api/sign-in", verify=trusting(certificates.ca_file),
                        json={"username": "alice", "password": credentials.passwords["alice"]}, timeout=30)
    assert answer.status_code == 200
    assert "secure" in answer.headers["set-cookie"].lower()
    # The privacy posture says where clients' TLS ends.
    posture = httpx.get(f"{tls_gateway.https}/v1/airlock/privacy", verify=trusting(certificates.ca_file),
                        headers={"authorization": f"Bearer {credentials.api_key}"}, timeout=30).json()
    assert posture["client_transport"] == {"tls": "gateway", "hsts_max_age_s": 31_536_000}


@pytest.mark.engine
def test_plain_http_to_the_tls_port_gets_no_answer(tls_gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        with contextlib.suppress(ConnectionResetError):  # a reset instead of a close: no answer either way
            while chunk := sock.recv(4096):
                received += chunk
    assert not received.startswith(b"HTTP/")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_gateway.port}/healthz", timeout=10)


@pytest.mark.engine
def test_a_client_trusting_another_ca_refuses_the_server(tls_gateway: Gateway, credentials: Credentials,
                                                         tmp_path: Path) -> None:
    stranger = tmp_path / "another-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    with httpx.Client(verify=trusting(stranger)) as http, pytest.raises(httpx.ConnectError) as refused:
        http.get(f"{tls_gateway.https}/healthz")
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    client = openai.OpenAI(base_url=f"{tls_gateway.https}/v1", api_key=credentials.api_key, max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=trusting(stranger)))
    with client, pytest.raises(openai.APIConnectionError) as sdk_refused:
        client.models.list()
    assert isinstance(sdk_refused.value.__cause__, Exception) and "CERTIFICATE_VERIFY_FAILED" in repr(
        sdk_refused.value.__cause__)


def _old_protocol_client(ca_file: Path | None, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _handshake(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return str(tls.version())


@contextlib.contextmanager
def permissive_tls_server(certificates: Certificates) -> Iterator[int]:
    """A server that still speaks TLS 1.1, to show the client below really can (so a refusal is the gateway's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(certificates.cert_file, certificates.key_file)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, context.wrap_socket(connection, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=10)


@pytest.mark.engine
def test_tls_1_1_and_weak_ciphers_are_refused(tls_gateway: Gateway, certificates: Certificates) -> None:
    old = _old_protocol_client(certificates.ca_file, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    with permissive_tls_server(certificates) as port:
        assert _handshake(port, old) == "TLSv1.1"  # this client can speak TLS 1.1 ...
    with pytest.raises(ssl.SSLError):
        _handshake(tls_gateway.port, old)  # ... and the gateway will not
    # TLS 1.2 without forward secrecy (RSA key exchange) is refused too; with it, the handshake succeeds.
    static_rsa = _old_protocol_client(certificates.ca_file, ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256:AES256-SHA")
    with pytest.raises(ssl.SSLError):
        _handshake(tls_gateway.port, static_rsa)
    assert _handshake(tls_gateway.port, trusting(certificates.ca_file)) in {
        "TLSv1.2", "TLSv1.3"}


@pytest.mark.engine
def test_a_renewed_certificate_is_served_to_new_connections_while_an_open_stream_flows_on(
    tls_gateway: Gateway, stack: Stack, credentials: Credentials, certificates: Certificates,
) -> None:
    before = served_serial(tls_gateway.port, certificates.ca_file)
    client = sdk(tls_gateway, credentials, certificates.ca_file)
    arrivals: list[float] = []
    ends: list[tuple[str | None, int | None]] = []
    first_chunk = threading.Event()
    # The reader holds still after its first chunk until the renewal is seen, so the stream is still open then
    # however fast the engine answers (TCP holds the rest back; it must then come over the old connection).
    renewal_seen = threading.Event()

    def read_stream() -> None:
        stream = client.chat.completions.create(
            model=stack.model, messages=[{"role": "user", "content": "Tell a very long story."}],
            max_tokens=STREAM_TOKENS, stream=True, temperature=0.0, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        finish, tokens = None, None
        for chunk in stream:
            arrivals.append(time.monotonic())
            if not first_chunk.is_set():
                first_chunk.set()
                renewal_seen.wait(RELOAD_DEADLINE_S + 30)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        ends.append((finish, tokens))

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    assert first_chunk.wait(120), "the stream did not start"
    renewed_at = time.monotonic()
    new_serial = certificates.issue()
    assert new_serial != before
    while (served := served_serial(tls_gateway.port, certificates.ca_file)) != new_serial:
        assert time.monotonic() - renewed_at < RELOAD_DEADLINE_S, "the renewed certificate was not served"
        time.sleep(0.25)
    seen_at = time.monotonic()
    renewal_seen.set()
    assert served == new_serial
    # A new connection with the new certificate gets answers (the SDK's client opens a fresh one).
    with sdk(tls_gateway, credentials, certificates.ca_file) as fresh:
        assert fresh.models.list().data
    reader.join(timeout=600)
    client.close()
    assert not reader.is_alive(), "the stream did not end"
    # The stream that started before the renewal kept flowing after it, to its natural end.
    assert arrivals[0] < renewed_at and arrivals[-1] > seen_at
    assert ends == [("length", STREAM_TOKENS)]
    assert "certificate reloaded" in tls_gateway.log_path.read_text()


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args, "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_an_open_address_without_tls_is_refused_by_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path / "airlock.yaml", {
        "gateway": {"host": "0.0.0.0", "port": free_port()},
        "auth": {"api_keys_file": str(tmp_path / "api-keys.json")},
        "upstreams": [{"url": "unix:/nonexistent.sock"}],
    })
    for command in ("gateway", "up"):
        result = run_cli(command, config=config)
        assert result.returncode == 2
        assert "refusing to listen on '0.0.0.0' without TLS" in result.stderr
        assert "gateway.tls.cert_file" in result.stderr and "gateway.tls_terminated_by_proxy" in result.stderr
        assert "Traceback" not in result.stderr


KEY_CANARY = "NOT-A-KEY-3b91f0c2"


@pytest.mark.parametrize("broken", ["missing", "garbage", "mismatched"])
def test_an_unusable_certificate_stops_the_start_naming_the_file(tmp_path: Path, broken: str) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "airlock.crt", tmp_path / "airlock.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    expected = "no such file"
    if broken == "garbage":
        key_file.write_text(f"-----BEGIN PRIVATE KEY-----\n{KEY_CANARY}\n-----END PRIVATE KEY-----\n")
        expected = "not a PEM private key"
    elif broken == "mismatched":
        ca.issue_cert("localhost").private_key_pem.write_to_path(str(key_file))
        expected = f"the key does not match the certificate in {cert_file}"
    config = write_config(tmp_path / "airlock.yaml", {
        "gateway": {"port": free_port(), "tls": {"cert_file": str(cert_file), "key_file": str(key_file)}},
        # `up` would build the demo model and start an engine: the refusal must come before either.
        "engine": {"model": "demo", "demo_model_dir": str(tmp_path / "no-demo-model")},
        "upstreams": [{"url": "unix:/nonexistent.sock"}],
    })
    for command in ("gateway", "up"):
        started = time.monotonic()
        result = run_cli(command, config=config)
        assert result.returncode == 2, result.stderr
        assert "gateway.tls: " in result.stderr and f"{key_file}: {expected}" in result.stderr
        assert KEY_CANARY not in result.stderr and "Traceback" not in result.stderr
        assert "DEMO" not in result.stderr and not (tmp_path / "no-demo-model").exists()
        assert time.monotonic() - started < 60


def _failed_logins(port: int, forwarded: dict[str, str], attempts: int) -> list[tuple[int, str | None]]:
    """Answers to requests with a wrong key, each claiming a different client address in X-Forwarded-For."""
    answers = []
    for attempt in range(attempts):
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30, headers={
            "authorization": "Bearer alk_wrong_key", "x-forwarded-for": f"203.0.113.{attempt + 1}", **forwarded})
        answers.append((answer.status_code, answer.headers.get("strict-transport-security")))
    return answers


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_headers_are_believed_only_from_trusted_proxies(
    tmp_path: Path, credentials: Credentials, trusted: bool,
) -> None:
    port = free_port()
    gateway = start_gateway(tmp_path, {
        "gateway": {"port": port, "tls_terminated_by_proxy": True,
                    # This test connects from 127.0.0.1: a trusted proxy, or someone else.
                    "trusted_proxies": ["127.0.0.0/8"] if trusted else ["192.0.2.1"]},
        "auth": {"api_keys_file": str(credentials.api_keys),
                 "failed_logins": {"free_attempts": 1, "max_delay_s": 0, "block_after": 3}},
        "upstreams": [{"url": "unix:/nonexistent.sock"}],
    }, f"http://127.0.0.1:{port}/healthz", verify=False)
    try:
        answers = _failed_logins(port, {"x-forwarded-proto": "https"}, 5)
        plain = _failed_logins(port, {"x-forwarded-proto": "http"}, 1)[0]
    finally:
        stop(gateway.process)
    if trusted:
        # Each failure counts against the address the proxy named, and the proxy's https earns the HSTS header.
        assert answers == [(401, HSTS)] * 5
        assert plain == (401, None)
    else:
        # Headers from an untrusted peer are ignored: every failure counts against the peer itself (blocked after
        # three), and nobody's claimed https adds HSTS to a plain-HTTP answer.
        assert answers == [(401, None)] * 3 + [(429, None)] * 2


def readme_tls_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n### TLS\n", 1)[1].split("\n## ", 1)[0]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme_tls_section(), flags=re.DOTALL)


def handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> str:
    """A TLS handshake between two contexts through memory buffers: no socket needed."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out, server_hostname=hostname)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
                    done[name] = True
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return str(client_side.version())
    raise AssertionError("the handshake did not finish")


def test_the_readme_openssl_steps_make_a_certificate_the_gateway_can_serve(tmp_path: Path) -> None:
    (steps,) = [block for block in readme_blocks("sh") if "openssl req -x509" in block]
    result = subprocess.run(["sh", "-e", "-c", steps], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gateway.crt: OK" in result.stdout
    server = server_context(CertificateFiles(tmp_path / "gateway.crt", tmp_path / "gateway.key"))
    client = trusting(tmp_path / "internal-ca.pem")
    assert handshake_in_memory(server, client, "airlock.internal") in {"TLSv1.2", "TLSv1.3"}
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not list
        handshake_in_memory(server, trusting(tmp_path / "internal-ca.pem"), "other.internal")


def test_the_readme_tls_settings_load(tmp_path: Path) -> None:
    blocks = readme_blocks("yaml")
    assert len(blocks) == 2
    direct, proxied = (yaml.safe_load(block) for block in blocks)
    auth = {"api_keys_file": str(tmp_path / "api-keys.json")}
    settings = load_settings(**direct, auth=auth)
    assert settings.gateway.host == "0.0.0.0" and settings.gateway.tls.enabled
    settings = load_settings(**proxied, auth=auth)
    assert settings.gateway.tls_terminated_by_proxy and settings.gateway.trusted_proxies == ["10.0.0.5/32"]


@pytest.mark.engine
def test_the_readme_python_example_trusts_the_ca(tls_gateway: Gateway, stack: Stack, credentials: Credentials,
                                                  certificates: Certificates, tmp_path: Path) -> None:
    (example,) = readme_blocks("python")
    assert 'base_url="https://airlock.internal:8000/v1"' in example and 'cafile="internal-ca.pem"' in example
    script = tmp_path / "example.py"
    script.write_text(example.replace("https://airlock.internal:8000", tls_gateway.https)
                      .replace('"internal-ca.pem"', f'"{certificates.ca_file}"'))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENAI_API_KEY": credentials.api_key})
    assert result.returncode == 0, result.stderr
    assert stack.model in result.stdout
    # The variant without code: SSL_CERT_FILE for an SDK client built with no http_client.
    plain = tmp_path / "plain.py"
    plain.write_text(f'from openai import OpenAI\nprint([m.id for m in OpenAI(base_url="{tls_gateway.https}/v1")'
                     '.models.list()])\n')
    result = subprocess.run([sys.executable, str(plain)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENAI_API_KEY": credentials.api_key,
                                 "SSL_CERT_FILE": str(certificates.ca_file)})
    assert result.returncode == 0, result.stderr
    assert stack.model in result.stdout


@pytest.mark.parametrize(("scheme", "max_age", "expected"), [
    ("https", 31_536_000, [b"max-age=31536000"]), ("https", 600, [b"max-age=600"]), ("http", 600, []),
    ("https", 0, []),
])
def test_hsts_only_over_https_and_only_when_wanted(scheme: str, max_age: int, expected: list[bytes]) -> None:
    app = with_hsts(PlainTextResponse("ok"), max_age)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "scheme": scheme, "method": "GET", "path": "/", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    start = sent[0]
    assert start["type"] == "http.response.start"
    headers = start["headers"]
    assert isinstance(headers, list)
    assert [value for name, value in headers if name == b"strict-transport-security"] == expected
