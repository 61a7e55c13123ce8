"""Certificate and key files as operators get them wrong: encrypted keys, the wrong file in the wrong place, keys
others can read, certificates near or past their end, engine certificates that do not name the engine's address,
and systemd's credential copies. Real certificates from ``trustme`` (its ``not_before`` / ``not_after`` make the
expired ones), real ``ssl`` contexts, the real `airlock` command; no engine is started."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_gateway
from server.config import ConfigError, load_settings
from server.runner import check_engine_tls
from server.tls import (
    CertificateFiles,
    CertificateReloader,
    TlsFileError,
    client_context,
    from_systemd_credentials,
    names_host,
    server_context,
)
from server.upstream import EngineTls

from .conftest import AIRLOCK, ROOT, airlock_env, log_tail, stop, write_config
from .servers import free_port

NOW = datetime.now(UTC)
ENCRYPTED = "the private key is encrypted; give an unencrypted key (readable only by the service's user)"
PASSPHRASE_PROMPT = "pass phrase"
CLI_DEADLINE_S = 60


def write_pair(directory: Path, name: str, ca: trustme.CA, *identities: str, **validity: datetime) -> CertificateFiles:
    """A leaf and its key as an operator keeps them (key 0600)."""
    leaf = ca.issue_cert(*(identities or ("127.0.0.1",)), **validity)  # type: ignore[arg-type]
    files = CertificateFiles(directory / f"{name}.pem", directory / f"{name}.key")
    leaf.cert_chain_pems[0].write_to_path(str(files.cert_file))
    leaf.private_key_pem.write_to_path(str(files.key_file))
    files.key_file.chmod(0o600)
    return files


def encrypt_key(key_file: Path) -> None:
    """The key as `openssl genpkey -aes256` leaves it: encrypted with a passphrase."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"a passphrase")))


def not_after(cert_file: Path) -> datetime:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


# 1. Encrypted keys: refused, never a passphrase prompt.

def test_an_encrypted_key_is_refused_naming_it_for_every_load(tmp_path: Path, ca: trustme.CA,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    files = write_pair(tmp_path, "airlock", ca)
    context = server_context(files)  # the unencrypted pair is in use
    reloader = CertificateReloader(files, [context])
    encrypt_key(files.key_file)
    for load in (lambda: server_context(files), lambda: client_context(None, files)):
        with pytest.raises(TlsFileError) as refused:
            load()
        assert str(refused.value) == f"{files.key_file}: {ENCRYPTED}"
    # A renewal that brings an encrypted key keeps the previous certificate, and says why.
    with caplog.at_level(logging.WARNING, logger="airlock.tls"):
        assert not reloader.check()
    assert f"{files.key_file}: {ENCRYPTED}" in caplog.text


def test_an_encrypted_upstream_client_key_stops_the_start_naming_the_setting(tmp_path: Path, ca: trustme.CA) -> None:
    from server.config import UpstreamTlsSettings

    files = write_pair(tmp_path, "gateway", ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    encrypt_key(files.key_file)
    with pytest.raises(ConfigError) as refused:
        EngineTls.from_settings(UpstreamTlsSettings(ca_file=tmp_path / "ca.pem", cert_file=files.cert_file,
                                                    key_file=files.key_file))
    assert str(refused.value) == f"upstream_tls: {files.key_file}: {ENCRYPTED}"


def test_airlock_gateway_with_an_encrypted_key_exits_without_asking_for_a_passphrase(tmp_path: Path,
                                                                                       ca: trustme.CA) -> None:
    files = write_pair(tmp_path, "airlock", ca)
    encrypt_key(files.key_file)
    config = write_config(tmp_path / "airlock.yaml", {
        "gateway": {"port": free_port(), "tls": {"cert_file": str(files.cert_file), "key_file": str(files.key_file)}},
        "upstreams": [{"url": "unix:/nonexistent.sock"}],
    })
    # A session of its own: no controlling terminal for OpenSSL to prompt on (a prompt would wait for the timeout).
    result = subprocess.run([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=CLI_DEADLINE_S, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=airlock_env())
    assert result.returncode == 2, result.stderr
    assert f"gateway.tls: {files.key_file}: {ENCRYPTED}" in result.stderr
    output = result.stdout + result.stderr
    assert PASSPHRASE_PROMPT not in output.lower() and "Traceback" not in output


# 2. Each file's own fault, in its own words.

GARBAGE = "-----BEGIN {kind}-----\nNOT-PEM-7f3c\n-----END {kind}-----\n"


@pytest.mark.parametrize("broken", ["certificate", "key", "mismatch", "empty chain", "garbage chain"])
def test_the_file_at_fault_is_named_with_what_is_wrong(tmp_path: Path, ca: trustme.CA, broken: str) -> None:
    files = write_pair(tmp_path, "airlock", ca)
    chain_file = tmp_path / "chain.pem"
    if broken == "certificate":
        files.cert_file.write_text(GARBAGE.format(kind="CERTIFICATE"))
        expected = f"{files.cert_file}: not a PEM certificate"
    elif broken == "key":
        files.key_file.write_text(GARBAGE.format(kind="PRIVATE KEY"))
        expected = f"{files.key_file}: not a PEM private key"
    elif broken == "mismatch":
        ca.issue_cert("localhost").private_key_pem.write_to_path(str(files.key_file))
        expected = f"{files.key_file}: the key does not match the certificate in {files.cert_file}"
    else:
        chain_file.write_text("" if broken == "empty chain" else GARBAGE.format(kind="CERTIFICATE"))
        files = CertificateFiles(files.cert_file, files.key_file, chain_file)
        expected = f"{chain_file}: holds no PEM certificate (a chain_file lists intermediates)"
    with pytest.raises(TlsFileError) as refused:
        server_context(files)
    assert str(refused.value) == expected
    assert "NOT-PEM" not in str(refused.value)


def test_a_chain_file_with_intermediates_is_served_after_the_leaf(tmp_path: Path) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1")
    files = CertificateFiles(tmp_path / "leaf.pem", tmp_path / "leaf.key", tmp_path / "chain.pem")
    leaf.cert_chain_pems[0].write_to_path(str(files.cert_file))
    leaf.private_key_pem.write_to_path(str(files.key_file))
    intermediate.cert_pem.write_to_path(str(files.chain_file))
    files.key_file.chmod(0o600)
    root.cert_pem.write_to_path(str(tmp_path / "root.pem"))
    # A client that trusts only the root verifies the leaf: the intermediate went out with it.
    handshake(server_context(files), client_context(tmp_path / "root.pem"), "127.0.0.1")


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> None:
    """A full TLS handshake in memory (ssl.SSLCertVerificationError if the client refuses the server)."""
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    ends = [client.wrap_bio(pipes[0][0], pipes[1][0], server_hostname=host),
            server.wrap_bio(pipes[1][1], pipes[0][1], server_side=True)]
    done = [False, False]
    for _ in range(20):
        for index, end in enumerate(ends):
            if not done[index]:
                try:
                    end.do_handshake()
                    done[index] = True
                except ssl.SSLWantReadError:
                    pass
        # What each end wrote goes to the other's incoming side.
        for outgoing, incoming in ((pipes[1][0], pipes[1][1]), (pipes[0][1], pipes[0][0])):
            if outgoing.pending:
                incoming.write(outgoing.read())
        if all(done):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True), (0o604, True)])
def test_a_key_every_user_can_read_is_warned_about(tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture,
                                                    mode: int, warned: bool) -> None:
    files = write_pair(tmp_path, "airlock", ca)
    files.key_file.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="airlock.tls"):
        server_context(files)  # a warning, not a refusal
    readable = [r.getMessage() for r in caplog.records if "readable by every user" in r.getMessage()]
    assert bool(readable) is warned
    if warned:
        assert str(files.key_file) in readable[0] and f"mode {mode:04o}" in readable[0]


# 3. Expiry: warned about at start and at every reload; the gauge.

@pytest.mark.parametrize(("validity", "expected"), [
    ({"not_before": NOW - timedelta(days=30), "not_after": NOW - timedelta(days=1)}, "expired on {after}"),
    ({"not_before": NOW + timedelta(days=1), "not_after": NOW + timedelta(days=90)}, "is not valid before {before}"),
    ({"not_before": NOW - timedelta(days=1), "not_after": NOW + timedelta(days=5, hours=1)},
     "expires on {after} (in 5 days)"),
    ({"not_before": NOW - timedelta(days=1), "not_after": NOW + timedelta(days=60)}, None),
])
def test_a_certificate_out_of_or_near_the_end_of_its_validity_is_warned_about(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture, validity: dict[str, datetime],
    expected: str | None,
) -> None:
    files = write_pair(tmp_path, "airlock", ca, **validity)
    with caplog.at_level(logging.WARNING, logger="airlock.tls"):
        server_context(files)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if expected is None:
        assert warnings == []
        return
    day = "%Y-%m-%d %H:%M UTC"
    text = expected.format(after=validity["not_after"].strftime(day), before=validity["not_before"].strftime(day))
    assert warnings == [warnings[0]] and warnings[0].startswith(f"{files.cert_file}: the certificate ")
    assert text in warnings[0]
    key_body = files.key_file.read_text().splitlines()[1]
    assert key_body not in caplog.text


def test_a_renewal_close_to_its_end_is_warned_about_and_the_reloader_knows_its_date(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture,
) -> None:
    files = write_pair(tmp_path, "airlock", ca, not_after=NOW + timedelta(days=90))
    reloader = CertificateReloader(files, [server_context(files)])
    assert reloader.not_after == not_after(files.cert_file)
    time.sleep(0.01)  # a new mtime even on coarse clocks
    write_pair(tmp_path, "airlock", ca, not_after=NOW + timedelta(days=3))
    with caplog.at_level(logging.WARNING, logger="airlock.tls"):
        assert reloader.check()
    assert f"{files.cert_file}: the certificate expires on" in caplog.text
    assert reloader.not_after == not_after(files.cert_file) and reloader.not_after < NOW + timedelta(days=4)


def test_the_expiry_gauge_shows_the_gateways_certificates_by_role(tmp_path: Path, ca: trustme.CA) -> None:
    listener = write_pair(tmp_path, "airlock", ca, not_after=NOW + timedelta(days=40))
    client = write_pair(tmp_path, "gateway", ca, "airlock-gateway", not_after=NOW + timedelta(days=20))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    settings = load_settings(
        metrics={"listener": "separate", "engine_series": False},
        upstreams=[{"url": "https://127.0.0.1:9"}],
        upstream_tls={"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(client.cert_file),
                      "key_file": str(client.key_file)},
    )

    async def scrape(reloader: CertificateReloader | None) -> dict[str, float]:
        gateway = create_gateway(settings, [u.url for u in settings.upstreams], reloader)
        assert gateway.metrics is not None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.metrics),
                                     base_url="http://127.0.0.1") as scraper:  # a name of this computer
            text = (await scraper.get("/metrics")).text
        return {sample.labels["certificate"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "airlock_tls_certificate_expiry_timestamp_seconds"
                for sample in family.samples}

    listener_reloader = CertificateReloader(listener, [server_context(listener)])
    assert asyncio.run(scrape(listener_reloader)) == {
        "gateway": not_after(listener.cert_file).timestamp(),
        "upstream_client": not_after(client.cert_file).timestamp(),
    }
    assert asyncio.run(scrape(None)) == {"upstream_client": not_after(client.cert_file).timestamp()}


# 4. engine.tls: loaded before any engine starts; for `airlock up`, it must name the address the gateway uses.

def engine_settings(files: CertificateFiles, client_ca: Path, host: str = "127.0.0.1") -> dict[str, object]:
    return {"bind": "tcp", "host": host, "tls": {"cert_file": str(files.cert_file), "key_file": str(files.key_file),
                                                 "client_ca_file": str(client_ca)}}


@pytest.mark.parametrize("broken", ["cert_file", "key_file", "client_ca_file"])
def test_unusable_engine_tls_files_are_refused_before_any_engine_starts(tmp_path: Path, ca: trustme.CA,
                                                                         broken: str) -> None:
    files = write_pair(tmp_path, "engine", ca)
    client_ca = tmp_path / "gateway-ca.pem"
    ca.cert_pem.write_to_path(str(client_ca))
    culprit = {"cert_file": files.cert_file, "key_file": files.key_file, "client_ca_file": client_ca}[broken]
    culprit.unlink()
    settings = load_settings(engine=engine_settings(files, client_ca))
    for own_engines in (False, True):
        with pytest.raises(ConfigError) as refused:
            check_engine_tls(settings, own_engines)
        assert str(refused.value) == f"engine.tls: {culprit}: no such file"


@pytest.mark.parametrize(("host", "names", "refused_for"), [
    ("127.0.0.1", ("127.0.0.1",), None),
    ("0.0.0.0", ("127.0.0.1",), None),  # reached on loopback
    ("0.0.0.0", ("engine.example",), "IP:127.0.0.1"),
    ("10.1.2.3", ("127.0.0.1",), "IP:10.1.2.3"),
    ("engine-0.example", ("*.example",), None),
    ("engine-0.example", ("engine-1.example",), "DNS:engine-0.example"),
])
def test_airlock_up_refuses_an_engine_certificate_that_does_not_name_its_address(
    tmp_path: Path, ca: trustme.CA, host: str, names: tuple[str, ...], refused_for: str | None,
) -> None:
    files = write_pair(tmp_path, "engine", ca, *names)
    client_ca = tmp_path / "gateway-ca.pem"
    ca.cert_pem.write_to_path(str(client_ca))
    settings = load_settings(engine=engine_settings(files, client_ca, host))
    check_engine_tls(settings, own_engines=False)  # `airlock engine`: the gateway elsewhere may use any name
    if refused_for is None:
        check_engine_tls(settings, own_engines=True)
        return
    with pytest.raises(ConfigError) as refused:
        check_engine_tls(settings, own_engines=True)
    assert f"engine.tls.cert_file ({files.cert_file}) does not name" in str(refused.value)
    assert f"add {refused_for} to the certificate's subject alternative names" in str(refused.value)


def test_an_expired_engine_certificate_is_warned_about_at_start(tmp_path: Path, ca: trustme.CA,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    files = write_pair(tmp_path, "engine", ca, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=2))
    ca.cert_pem.write_to_path(str(tmp_path / "gateway-ca.pem"))
    with caplog.at_level(logging.WARNING, logger="airlock.tls"):
        check_engine_tls(load_settings(engine=engine_settings(files, tmp_path / "gateway-ca.pem")), own_engines=False)
    assert f"{files.cert_file}: the certificate expired on" in caplog.text


def test_names_host_reads_subject_alternative_names_only(tmp_path: Path, ca: trustme.CA) -> None:
    files = write_pair(tmp_path, "engine", ca, "::1", "Engine.Example", common_name="other.example")
    assert names_host(files.cert_file, "::1") and names_host(files.cert_file, "engine.example")
    assert not names_host(files.cert_file, "other.example") and not names_host(files.cert_file, "127.0.0.1")
    assert not names_host(files.cert_file, "a.engine.example")


@pytest.mark.parametrize("command", ["engine", "up"])
def test_airlock_engine_and_up_stop_at_a_missing_engine_certificate_before_loading_a_model(
    tmp_path: Path, ca: trustme.CA, command: str,
) -> None:
    files = write_pair(tmp_path, "engine", ca)
    client = write_pair(tmp_path, "gateway", ca, "airlock-gateway")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    files.cert_file.unlink()
    config = write_config(tmp_path / "airlock.yaml", {
        "gateway": {"port": free_port()},
        "engine": {"model": "demo", "demo_model_dir": str(tmp_path / "no-demo-model"), "base_port": free_port(),
                   **engine_settings(files, tmp_path / "ca.pem")},
        "upstream_tls": {"ca_file": str(tmp_path / "ca.pem"), "cert_file": str(client.cert_file),
                         "key_file": str(client.key_file)},
    })
    started = time.monotonic()
    result = subprocess.run([*AIRLOCK, command, "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=CLI_DEADLINE_S, stdin=subprocess.DEVNULL, env=airlock_env())
    assert result.returncode == 2, result.stderr
    assert f"engine.tls: {files.cert_file}: no such file" in result.stderr
    assert "DEMO" not in result.stderr and not (tmp_path / "no-demo-model").exists()
    assert time.monotonic() - started < CLI_DEADLINE_S


# 5. systemd credentials: copies made at the service's start, so no promise of live renewal.

def test_paths_under_systemd_credentials_are_recognised(tmp_path: Path) -> None:
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    assert from_systemd_credentials([Path("/run/credentials/airlock.service/tls.crt")], {})
    assert from_systemd_credentials([Path("/etc/airlock/tls.crt"), tmp_path / "creds" / "tls.key"], env)
    assert not from_systemd_credentials([Path("/etc/airlock/tls.crt"), tmp_path / "credentials.key"], env)


@pytest.mark.parametrize("credentials", [True, False])
def test_the_start_log_says_a_renewal_from_systemd_credentials_needs_a_restart(
    tmp_path: Path, ca: trustme.CA, credentials: bool,
) -> None:
    directory = tmp_path / "credentials"
    directory.mkdir()
    files = write_pair(directory, "airlock", ca)
    config = write_config(tmp_path / "airlock.yaml", {
        "log_format": "text",
        "gateway": {"port": free_port(), "tls": {"cert_file": str(files.cert_file), "key_file": str(files.key_file)}},
        "upstreams": [{"url": "unix:/nonexistent.sock"}],
    })
    env = {key: value for key, value in airlock_env().items() if key != "CREDENTIALS_DIRECTORY"}
    if credentials:
        env["CREDENTIALS_DIRECTORY"] = str(directory)
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + CLI_DEADLINE_S
        while "TLS: certificate from" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_tail(log_path)
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop(process)
    text = log_path.read_text()
    restart = "certificate files come from systemd credentials: a renewal takes `systemctl restart`"
    assert (restart in text) is credentials
    assert ("a renewed certificate and key are used for new connections" in text) is not credentials



def test_a_renewal_caught_half_way_leaves_the_served_certificate_working(tmp_path: Path, ca: trustme.CA) -> None:
    """A new certificate beside the old key (certbot swaps its links one at a time): the reload is refused, and the
    context in use still completes handshakes with the old pair (OpenSSL would have dropped its key)."""
    files = write_pair(tmp_path, "gateway", ca)
    server = server_context(files)
    reloader = CertificateReloader(files, [server])
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = client_context(tmp_path / "ca.pem")
    handshake(server, client, "127.0.0.1")
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(files.cert_file))  # its key not yet in place
    assert reloader.check() is False
    handshake(server, client, "127.0.0.1")
    renewed = write_pair(tmp_path, "renewed", ca)
    files.key_file.write_bytes(renewed.key_file.read_bytes())
    files.cert_file.write_bytes(renewed.cert_file.read_bytes())
    assert reloader.check() is True and reloader.reloads == 1
    handshake(server, client, "127.0.0.1")


def test_a_private_ca_is_the_only_one_an_engine_may_be_vouched_for_by(tmp_path: Path, ca: trustme.CA) -> None:
    """With upstream_tls.ca_file the system's CAs are not trusted as well: a certificate from any of them that
    named the engine's host would otherwise let its holder pose as an engine."""
    ca.cert_pem.write_to_path(str(tmp_path / "engines-ca.pem"))
    context = client_context(tmp_path / "engines-ca.pem")
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    other = trustme.CA()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(write_pair(tmp_path, "stranger", other)), context, "127.0.0.1")
    handshake(server_context(write_pair(tmp_path, "engine", ca)), context, "127.0.0.1")
