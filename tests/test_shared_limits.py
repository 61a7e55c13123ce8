"""Users' own limits counted once for several gateways by a real ``airlock limits-server`` process: across two real
gateways (in front of the session's engine, or of the paced stand-in where a request must be held while it runs),
over a unix socket and over TCP with mutual TLS (``trustme`` CAs); what happens while the server is away; and the
server's side of the wire, driven with raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml
from pydantic import ValidationError

from server.config import ConfigError, SharedLimitsSettings, load_settings
from server.errors import RateLimited
from server.limits import UserLimits
from server.shared_limits import SharedLimitsClient, SharedUserLimits

from .conftest import AIRLOCK, ROOT, Credentials, Stack, airlock_cli, airlock_env, log_tail, write_config
from .servers import free_port, gateway_in_front_of
from .test_limits_and_drain import chat, first_chunk, paced, paced_engine  # noqa: F401 (paced_engine is a fixture)

SECRET = "a secret that the gateways and nobody else share, 48 bytes long......"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "salt"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@contextmanager
def limits_server(config: Path, log_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``airlock limits-server``, ready once its start line is logged."""
    with log_path.open("ab") as log:
        process = subprocess.Popen([*AIRLOCK, "limits-server", "--config", str(config), *args], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, env=airlock_env())
    try:
        deadline = time.monotonic() + 30
        while "limits server on" not in log_path.read_text():
            assert process.poll() is None, f"the limits server exited:\n{log_tail(log_path)}"
            assert time.monotonic() < deadline, f"the limits server did not start:\n{log_tail(log_path)}"
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def settings_file(path: Path, secret_file: Path, shared: dict[str, Any], **admission: Any) -> Path:
    return write_config(path, {"admission": {**admission, "shared_limits": shared},
                               "privacy": {"salt_secret_file": str(secret_file)}})


def gateway_settings(credentials: Credentials, secret_file: Path, shared: dict[str, Any],
                     **admission: Any) -> dict[str, Any]:
    return {"admission": {**admission, "shared_limits": {**shared, "reconnect_interval_s": 0.2}},
            "privacy": {"salt_secret_file": str(secret_file)},
            "auth": {"api_keys_file": str(credentials.api_keys)}}


def shared_limits_connected(client: httpx.Client, headers: dict[str, str]) -> float:
    metrics = client.get("/metrics", headers=headers)
    assert metrics.status_code == 200, metrics.text
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics.text.splitlines()
              if line.startswith("airlock_shared_limits_connected ")]
    assert len(values) == 1, "airlock_shared_limits_connected is missing"
    return values[0]


def wait_for_connected(client: httpx.Client, headers: dict[str, str], expected: float, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while shared_limits_connected(client, headers) != expected:
        assert time.monotonic() < deadline, f"airlock_shared_limits_connected did not become {expected}"
        time.sleep(0.1)


@contextmanager
def two_gateways(engine_socket: Path, settings: dict[str, Any]) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Two real gateways with the same settings in front of one engine, and a client for each."""
    with gateway_in_front_of(engine_socket, **settings) as one_url, \
            gateway_in_front_of(engine_socket, **settings) as two_url, \
            httpx.Client(base_url=one_url, timeout=120) as one, httpx.Client(base_url=two_url, timeout=120) as two:
        yield one, two


@pytest.fixture(scope="module")
def bob_key(credentials: Credentials) -> str:
    return airlock_cli("keys", "create", "--user", "bob", "--file", str(credentials.api_keys)).strip()


# --- settings ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shared", "message"), [
    ({"url": "tcp://limits.example:9470"}, "a tcp:// url on a host other than loopback needs tls"),
    ({"url": "unix:/run/airlock/limits.sock", "tls": {"ca_file": "a", "cert_file": "b", "key_file": "c"}},
     "applies to tcp:// URLs only"),
    ({"url": "http://limits.example:9470"}, "String should match pattern"),
    ({"url": "tcp://limits.example"}, "String should match pattern"),
    ({"url": "tcp://limits.example:99999"}, "not between 1 and 65535"),
])
def test_settings_refuse_a_limits_server_reached_in_clear_or_at_no_address(shared: dict[str, Any],
                                                                           message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SharedLimitsSettings(**shared)


def test_a_gateway_needs_the_gateways_common_secret(secret_file: Path) -> None:
    from server.app import create_app

    shared = {"url": "tcp://127.0.0.1:9470"}  # loopback: clear text allowed, as for the engines
    with pytest.raises(ConfigError, match=r"needs privacy\.salt_secret_file, the same file for every gateway"):
        create_app(load_settings(admission={"shared_limits": shared}), ["unix:/nonexistent.sock"])
    loaded = load_settings(admission={"shared_limits": shared}, privacy={"salt_secret_file": str(secret_file)})
    assert loaded.admission.shared_limits is not None
    assert loaded.admission.shared_limits.tcp_address == ("127.0.0.1", 9470)
    create_app(loaded, ["unix:/nonexistent.sock"])


# --- the server's side of the wire, with raw sockets ---------------------------------------------------------------

class Wire:
    """A gateway's connection as bytes: what the server answers each line."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.lines = self.sock.makefile("rb")

    def enter(self, request_id: int, user: str) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"enter": request_id, "user": user}).encode() + b"\n")
        answer: dict[str, Any] = json.loads(self.lines.readline())
        return answer

    def hello(self, **limits: int) -> dict[str, Any]:
        """The gateway's first line; the server's answer."""
        self.sock.sendall(json.dumps({"hello": limits}).encode() + b"\n")
        answer: dict[str, Any] = json.loads(self.lines.readline())
        return answer

    def leave(self, request_id: int) -> None:
        self.sock.sendall(json.dumps({"leave": request_id}).encode() + b"\n")

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def test_the_server_counts_every_connection_and_forgets_what_a_closed_one_held(tmp_path: Path,
                                                                                secret_file: Path) -> None:
    path = tmp_path / "limits.sock"
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"},
                           max_concurrent_per_user=2, requests_per_minute_per_user=0)
    alice, bob = "a1" * 32, "b2" * 32
    log_path = tmp_path / "limits.log"
    with limits_server(config, log_path):
        assert path.stat().st_mode & 0o777 == 0o660  # the service's user and group only
        one, two = Wire(path), Wire(path)
        # Set up otherwise: served all the same, with the server's limits (and a warning).
        assert one.hello(max_concurrent_per_user=5, requests_per_minute_per_user=0) == {"ready": True}
        assert one.enter(1, alice) == {"id": 1}
        assert two.enter(1, alice) == {"id": 1}  # ids are per connection
        refused = one.enter(2, alice)["refused"]
        assert refused["code"] == "too_many_concurrent_requests"
        assert refused["message"] == "you have 2 requests in progress, the limit is 2; wait for one to finish"
        assert refused["retry_after_s"] == 1
        assert one.enter(3, bob) == {"id": 3}  # another user is counted apart
        one.leave(1)
        assert two.enter(2, alice) == {"id": 2}  # the place alice gave back on one connection
        two.close()  # a gateway gone: both of its requests end with it
        three = Wire(path)
        assert three.enter(1, alice) == {"id": 1}
        assert three.enter(2, alice) == {"id": 2}
        assert three.enter(3, alice)["refused"]["code"] == "too_many_concurrent_requests"
        one.close()
        three.close()
    logged = log_path.read_text()
    assert "a gateway's settings differ (max_concurrent_per_user 5 there, 2 here)" in logged
    assert alice not in logged and bob not in logged
    assert not path.exists(), "a stopped server leaves its socket behind"


@pytest.mark.parametrize("line", [
    b"not json\n",
    b'{"enter": 1, "user": "short"}\n',
    b'{"enter": -1, "user": "' + b"c" * 64 + b'"}\n',
    b'{"enter": "1", "user": "' + b"c" * 64 + b'"}\n',
    b'{"enter": 1}\n',
    b"[1, 2]\n",
    b'{"enter": 1, "user": "' + b"x" * 10_000 + b'"}\n',
])
def test_a_connection_that_breaks_the_wire_is_dropped_with_its_requests_and_the_server_stays_up(
        tmp_path: Path, secret_file: Path, line: bytes) -> None:
    path = tmp_path / "limits.sock"
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"},
                           max_concurrent_per_user=1, requests_per_minute_per_user=0)
    log_path = tmp_path / "limits.log"
    with limits_server(config, log_path) as process:
        broken, other = Wire(path), Wire(path)
        user = "d4" * 32
        assert broken.enter(1, user) == {"id": 1}
        broken.sock.sendall(line)
        assert broken.lines.readline() == b"", "the connection was kept"
        assert other.enter(1, user) == {"id": 1}, "the dropped connection's request is still counted"
        assert process.poll() is None
        other.close()
        broken.close()
    logged = log_path.read_text()
    assert "dropped a connection that broke the wire" in logged
    assert "short" not in logged and "xxxx" not in logged and user not in logged  # no byte of what it sent


# --- over TCP, mutual TLS ------------------------------------------------------------------------------------------

def write_identity(ca: trustme.CA, directory: Path, name: str) -> dict[str, str]:
    leaf = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return {"cert_file": str(cert), "key_file": str(key)}


async def connects(client: SharedLimitsClient, seconds: float = 5) -> bool:
    """Whether the gateways' real client gets a connection within ``seconds``, and a request counted."""
    await client.start()
    try:
        deadline = time.monotonic() + seconds
        while not client.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if client.connected:  # and is counted by the server
            counted = await client.enter("local:alice")
            client.leave(counted)
        return client.connected
    finally:
        await client.close()


def test_over_tcp_only_a_gateway_with_a_certificate_of_the_hops_ca_is_served(
        tmp_path: Path, secret_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    hop_ca, stranger_ca = trustme.CA(), trustme.CA()
    hop_ca.cert_pem.write_to_path(str(tmp_path / "hop-ca.pem"))
    stranger_ca.cert_pem.write_to_path(str(tmp_path / "stranger-ca.pem"))
    port = free_port()
    url = f"tcp://localhost:{port}"
    server_tls = {"ca_file": str(tmp_path / "hop-ca.pem"), **write_identity(hop_ca, tmp_path, "limits")}
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": url, "tls": server_tls})
    gateway = write_identity(hop_ca, tmp_path, "gateway")
    stranger = write_identity(stranger_ca, tmp_path, "stranger")
    log_path = tmp_path / "limits.log"
    with limits_server(config, log_path, "--host", "127.0.0.1") as process:
        def shared(ca: str, identity: dict[str, str]) -> SharedLimitsClient:
            settings = SharedLimitsSettings(url=url, tls={"ca_file": str(tmp_path / ca), **identity})
            return SharedLimitsClient(settings, SECRET.encode())

        assert asyncio.run(connects(shared("hop-ca.pem", gateway)))
        with caplog.at_level(logging.WARNING, logger="airlock.shared_limits"):
            # A gateway whose certificate another CA issued is refused by the server...
            assert not asyncio.run(connects(shared("hop-ca.pem", stranger), seconds=2))
            # ...and a server the gateway's CA did not vouch for is refused by the gateway.
            assert not asyncio.run(connects(shared("stranger-ca.pem", gateway), seconds=2))
        assert "its certificate was not accepted" in caplog.text
        # Clear text, a bare connect (a tcpSocket probe) and TLS without a client certificate get no answer and do not
        # disturb the server.
        line = b'{"enter": 1, "user": "' + b"e" * 64 + b'"}\n'
        assert b'"id"' not in exchange_in_clear(port, line)
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert b'"id"' not in exchange_without_certificate(port, tmp_path / "hop-ca.pem", line)
        assert process.poll() is None
        assert asyncio.run(connects(shared("hop-ca.pem", gateway)))
    logged = log_path.read_text()
    assert "Traceback" not in logged


def exchange_in_clear(port: int, line: bytes) -> bytes:
    """What the server answers ``line`` sent without TLS (a TLS alert at most)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as plain:
        plain.sendall(line)
        try:
            return plain.recv(100)
        except ConnectionResetError:
            return b""


def exchange_without_certificate(port: int, ca_file: Path, line: bytes) -> bytes:
    """What the server answers ``line`` over TLS from a client with no certificate (with TLS 1.3 the refusal
    comes after the client's handshake, at its first read)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(line)
                return tls.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


# --- two real gateways ---------------------------------------------------------------------------------------------

@pytest.mark.engine
def test_a_users_requests_in_progress_are_counted_across_two_gateways(
        tmp_path: Path, secret_file: Path, paced_engine: Path,  # noqa: F811
        credentials: Credentials, bob_key: str) -> None:
    path = tmp_path / "limits.sock"
    limits = {"max_concurrent_per_user": 2, "requests_per_minute_per_user": 0}
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"}, **limits)
    settings = gateway_settings(credentials, secret_file, {"url": f"unix:{path}"}, **limits)
    alice, bob = {"authorization": f"Bearer {credentials.api_key}"}, {"authorization": f"Bearer {bob_key}"}
    with limits_server(config, tmp_path / "limits.log"), \
            two_gateways(paced_engine, settings) as (one, two):
        wait_for_connected(one, alice, 1.0)
        wait_for_connected(two, alice, 1.0)
        with one.stream("POST", "/v1/chat/completions", json=paced(2000, stream=True), headers=alice) as held_one, \
                two.stream("POST", "/v1/chat/completions", json=paced(2000, stream=True), headers=alice) as held_two:
            assert held_one.status_code == held_two.status_code == 200
            lines = first_chunk(held_one), first_chunk(held_two)  # kept: a dropped iterator closes its stream
            next(lines[0])
            next(lines[1])
            # Each gateway holds one of alice's requests: her third is refused wherever it arrives.
            for gateway in (one, two):
                refused = gateway.post("/v1/chat/completions", json=paced(4), headers=alice)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"] == {
                    "message": "you have 2 requests in progress, the limit is 2; wait for one to finish",
                    "type": "rate_limit_error", "param": None, "code": "too_many_concurrent_requests"}
                assert refused.headers["retry-after"] == "1"
            assert two.post("/v1/chat/completions", json=paced(4), headers=bob).status_code == 200
        # Both streams ended: her places came back on both gateways.
        deadline = time.monotonic() + 10
        while (answer := two.post("/v1/chat/completions", json=paced(4), headers=alice)).status_code == 429:
            assert time.monotonic() < deadline, "alice's places did not come back"
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text


@pytest.mark.engine
def test_requests_per_minute_are_counted_across_two_gateways(
        tmp_path: Path, secret_file: Path, stack: Stack, credentials: Credentials, bob_key: str) -> None:
    path = tmp_path / "limits.sock"
    limits = {"max_concurrent_per_user": 0, "requests_per_minute_per_user": 3}
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"}, **limits)
    settings = gateway_settings(credentials, secret_file, {"url": f"unix:{path}"}, **limits)
    alice, bob = {"authorization": f"Bearer {credentials.api_key}"}, {"authorization": f"Bearer {bob_key}"}
    with limits_server(config, tmp_path / "limits.log"), \
            two_gateways(stack.engine_socket, settings) as (one, two):
        wait_for_connected(one, alice, 1.0)
        wait_for_connected(two, alice, 1.0)
        statuses = [gateway.post("/v1/chat/completions", json=chat(1), headers=alice).status_code
                    for gateway in (one, two, one)]
        assert statuses == [200, 200, 200]
        refused = two.post("/v1/chat/completions", json=chat(1), headers=alice)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["message"].startswith("more than 3 requests per minute; try again in ")
        assert 1 <= int(refused.headers["retry-after"]) <= 20
        assert one.post("/v1/chat/completions", json=chat(1), headers=bob).status_code == 200
        # The posture says what reaches the limits server, never where it is.
        posture = one.get("/v1/airlock/privacy", headers=bob).json()
        assert posture["egress"]["limits_server"]["transport"] == "unix"
        assert "pseudonym" in posture["egress"]["limits_server"]["sends"]
        assert "shared_limits" not in posture["limits"]["admission"]
        assert str(path) not in json.dumps(posture)


@pytest.mark.engine
def test_while_the_server_is_away_each_gateway_counts_its_own_and_it_rejoins(
        tmp_path: Path, secret_file: Path, paced_engine: Path, credentials: Credentials,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "limits.sock"
    limits = {"max_concurrent_per_user": 1, "requests_per_minute_per_user": 0}
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"}, **limits)
    settings = gateway_settings(credentials, secret_file, {"url": f"unix:{path}"}, **limits)
    alice = {"authorization": f"Bearer {credentials.api_key}"}
    log_path = tmp_path / "limits.log"
    with caplog.at_level(logging.INFO, logger="airlock.shared_limits"), \
            two_gateways(paced_engine, settings) as (one, two):
        # No server yet: the gateways serve, each counting alice's requests on its own (her limit per gateway).
        assert shared_limits_connected(one, alice) == 0.0
        with one.stream("POST", "/v1/chat/completions", json=paced(2000, stream=True), headers=alice) as held:
            assert held.status_code == 200
            lines = first_chunk(held)
            next(lines)
            assert one.post("/v1/chat/completions", json=paced(4), headers=alice).status_code == 429
            assert two.post("/v1/chat/completions", json=paced(4), headers=alice).status_code == 200
        assert "cannot reach the limits server" in caplog.text

        with limits_server(config, log_path) as server:
            wait_for_connected(one, alice, 1.0)
            wait_for_connected(two, alice, 1.0)
            with one.stream("POST", "/v1/chat/completions", json=paced(2000, stream=True), headers=alice) as held:
                lines = first_chunk(held)
                next(lines)
                assert two.post("/v1/chat/completions", json=paced(4), headers=alice).status_code == 429
                # The server dies while it counts her stream: the gateways notice and count on their own again.
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=30)
                wait_for_connected(one, alice, 0.0)
                wait_for_connected(two, alice, 0.0)
                assert two.post("/v1/chat/completions", json=paced(4), headers=alice).status_code == 200
                assert "lost the limits server" in caplog.text or "closed the connection" in caplog.text
        # A new server starts from nothing; the gateways find it again.
        with limits_server(config, log_path):
            wait_for_connected(one, alice, 1.0)
            wait_for_connected(two, alice, 1.0)
            with two.stream("POST", "/v1/chat/completions", json=paced(2000, stream=True), headers=alice) as held:
                lines = first_chunk(held)
                next(lines)
                assert one.post("/v1/chat/completions", json=paced(4), headers=alice).status_code == 429
    assert credentials.api_key not in caplog.text
    assert "alice" not in caplog.text and "alice" not in log_path.read_text()


def readme_yaml_naming(marker: str) -> dict[str, Any]:
    """The README's YAML block that holds ``marker``."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"the README has {len(found)} YAML blocks with {marker}"
    loaded: dict[str, Any] = yaml.safe_load(found[0])
    return loaded


def test_the_readmes_bare_metal_settings_connect_a_gateway_to_the_limits_server(tmp_path: Path,
                                                                                secret_file: Path) -> None:
    """"Gateways on several hosts", as typed: its OpenSSL commands (with the server's name edited, as it says), its
    two settings files (with the credentials' directories and the host made local)."""
    commands = re.findall(r"```sh\n(mkdir limits-pki.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert len(commands) == 1
    made = subprocess.run(["sh", "-e", "-c", commands[0].replace("limits.internal", "localhost")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    pki = tmp_path / "limits-pki"
    handed = {"airlock-limits.service": "limits-server", "airlock-gateway.service": "limits-client"}
    for side, name in handed.items():  # what LoadCredential= hands over, under the names the units give them
        directory = tmp_path / side
        directory.mkdir()
        (directory / "limits-ca.crt").write_bytes((pki / "limits-ca.crt").read_bytes())
        (directory / "limits.crt").write_bytes((pki / f"{name}.crt").read_bytes())
        (directory / "limits.key").write_bytes((pki / f"{name}.key").read_bytes())
    port = free_port()

    def local(settings: dict[str, Any]) -> str:
        text = yaml.safe_dump(settings).replace("/run/credentials/", f"{tmp_path}/")
        return text.replace("tcp://limits.internal:9470", f"tcp://localhost:{port}")  # the name edited, as above

    server_settings = readme_yaml_naming("airlock-limits.service/limits-ca.crt")
    gateway_settings = readme_yaml_naming("airlock-gateway.service/limits-ca.crt")
    # The files the YAML names are the ones the units' LoadCredential= lines hand over (the gateway's commented out).
    for unit, settings in (("airlock-limits.service", server_settings), ("airlock-gateway.service", gateway_settings)):
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        handed = set(re.findall(r"^#?LoadCredential=(limits[\w.-]*):", text, flags=re.M))
        named = {Path(path).name for path in settings["admission"]["shared_limits"]["tls"].values()}
        assert named == handed == {"limits-ca.crt", "limits.crt", "limits.key"}, (unit, named, handed)
    assert server_settings["admission"]["shared_limits"]["url"] == gateway_settings["admission"]["shared_limits"]["url"]
    (tmp_path / "limits.yaml").write_text(local(server_settings))
    (tmp_path / "gateway.yaml").write_text(
        local(gateway_settings) + f"privacy: {{salt_secret_file: {secret_file}}}\n")
    with limits_server(tmp_path / "limits.yaml", tmp_path / "limits.log", "--host", "127.0.0.1"):
        client = SharedLimitsClient.for_gateway(load_settings(tmp_path / "gateway.yaml"))
        assert client is not None
        assert asyncio.run(connects(client))


def test_a_server_slower_than_the_timeout_is_dropped_and_asked_again_only_once_it_answers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stand-in server that answers its first request after 0.5 s, the rest at once (a fake on purpose: the real one
    cannot be made slow on cue), in front of a gateway's real client that waits 0.1 s. A hung server (SIGSTOP, a cut
    without a reset) must not cost every request the timeout: the client gives it up when nothing at all comes from
    it for another 0.1 s."""
    path = tmp_path / "slow.sock"
    received: list[dict[str, Any]] = []
    hellos = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hellos
        while line := await reader.readline():
            message = json.loads(line)
            received.append(message)
            if "hello" in message:
                hellos += 1
                writer.write(b'{"ready": true}\n')
            if "enter" in message:
                if len([m for m in received if "enter" in m]) == 1:
                    await asyncio.sleep(0.5)
                writer.write(json.dumps({"id": message["enter"]}).encode() + b"\n")
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(slow, path=str(path))
        settings = SharedLimitsSettings(url=f"unix:{path}", timeout_s=0.1, reconnect_interval_s=0.3)
        client = SharedLimitsClient(settings, SECRET.encode(), {"max_concurrent_per_user": 1})
        local = UserLimits(load_settings(admission={"max_concurrent_per_user": 1,
                                                    "requests_per_minute_per_user": 0}).admission)
        limits = SharedUserLimits(client, local)
        await client.start()
        async with server:
            while not client.connected:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            async with limits.admit("local:alice"):  # counted here after 0.1 s, not after the server's 0.5 s
                assert local._active["local:alice"] == 1
                while client.connected:  # nothing at all from the server in the next 0.1 s either: dropped
                    assert time.monotonic() - started < 10, "a silent server was kept"
                    await asyncio.sleep(0.01)
                with pytest.raises(RateLimited):  # by this gateway's own count, without asking the server
                    async with limits.admit("local:alice"):
                        pass
                assert len([message for message in received if "enter" in message]) == 1
            while not client.connected:  # asked again, and it answers its hello in time
                await asyncio.sleep(0.01)
            async with limits.admit("local:bob"):
                pass
            await asyncio.sleep(0.1)
            await client.close()
            await asyncio.sleep(0.1)  # the stand-in sees the end of the connection and closes its side

    with caplog.at_level(logging.INFO, logger="airlock.shared_limits"):
        asyncio.run(scenario())
    assert hellos == 2
    assert received[0] == {"hello": {"max_concurrent_per_user": 1}}
    entered = [message["enter"] for message in received if "enter" in message]
    left = [message["leave"] for message in received if "leave" in message]
    assert len(entered) == 2 and left == [entered[1]], received  # the first ended with its connection
    assert caplog.text.count("did not answer within 0.1 s") == 1
    assert "lost the limits server" not in caplog.text and "closed the connection" not in caplog.text
    pseudonyms = {message["user"] for message in received if "enter" in message}
    assert len(pseudonyms) == 2 and all(len(name) == 64 and "alice" not in name for name in pseudonyms)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_peer_that_does_not_read_its_answers_is_cut_off_and_leaves_nothing_behind(
        tmp_path: Path, secret_file: Path) -> None:
    path = tmp_path / "limits.sock"
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"},
                           max_concurrent_per_user=0, requests_per_minute_per_user=0)
    with limits_server(config, tmp_path / "limits.log") as process:
        before = open_descriptors(process.pid)
        greedy = Wire(path)
        lines = b"".join(b'{"enter": %d, "user": "%s"}\n' % (number, b"f%063d" % number)
                         for number in range(1, 90_001))
        with contextlib.suppress(OSError):  # cut off part-way: a broken pipe or a reset
            greedy.sock.sendall(lines)
        deadline = time.monotonic() + 20
        while open_descriptors(process.pid) > before:
            assert time.monotonic() < deadline, "the peer's connection is still held"
            time.sleep(0.1)
        greedy.close()
        other = Wire(path)
        assert other.enter(1, "a1" * 32) == {"id": 1}
        other.close()
        assert process.poll() is None


def test_connections_past_the_most_the_server_takes_are_closed_and_the_gateways_served(
        tmp_path: Path, secret_file: Path) -> None:
    from server.limits_server import MAX_CONNECTIONS

    path = tmp_path / "limits.sock"
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"})
    log_path = tmp_path / "limits.log"
    with limits_server(config, log_path):
        held = []
        for _ in range(MAX_CONNECTIONS):  # one by one, each accepted (asyncio's listen backlog is 100)
            held.append(Wire(path))
            assert held[-1].hello() == {"ready": True}
        extra = Wire(path)
        assert extra.lines.readline() == b"", "a connection past the most was kept"
        extra.close()
        for wire in held[:10]:
            wire.close()
        time.sleep(0.5)
        again = Wire(path)
        assert again.hello() == {"ready": True}
        again.close()
        for wire in held[10:]:
            wire.close()
    assert log_path.read_text().count(f"{MAX_CONNECTIONS} connections open") == 1


def test_a_second_server_on_the_same_socket_is_refused_and_the_first_keeps_it(tmp_path: Path,
                                                                               secret_file: Path) -> None:
    path = tmp_path / "limits.sock"
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"})
    with limits_server(config, tmp_path / "first.log"):
        second = subprocess.run([*AIRLOCK, "limits-server", "--config", str(config)], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, env=airlock_env())
        assert second.returncode == 2, second.stderr
        assert f"another limits server is listening on unix:{path}" in second.stderr
        wire = Wire(path)
        assert wire.hello() == {"ready": True}
        wire.close()


def test_tcp_on_loopback_needs_no_tls_but_listening_beyond_it_does(tmp_path: Path, secret_file: Path) -> None:
    port = free_port()
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"tcp://127.0.0.1:{port}"})
    with limits_server(config, tmp_path / "limits.log"):
        client = SharedLimitsClient(SharedLimitsSettings(url=f"tcp://127.0.0.1:{port}"), SECRET.encode())
        assert asyncio.run(connects(client))
    beyond = subprocess.run([*AIRLOCK, "limits-server", "--config", str(config), "--host", "0.0.0.0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=airlock_env())
    assert beyond.returncode == 2
    assert "refusing to listen on '0.0.0.0' without TLS" in beyond.stderr


def test_a_gateway_whose_own_loop_stalls_past_the_timeout_keeps_a_server_that_answered(tmp_path: Path,
                                                                                        secret_file: Path) -> None:
    """The gateway's event loop blocked for 1 s (a burst of work) with the real server's answer already in the
    socket: that request is counted here, its late count is given back, and the connection is kept."""
    path = tmp_path / "limits.sock"
    config = settings_file(tmp_path / "limits.yaml", secret_file, {"url": f"unix:{path}"},
                           max_concurrent_per_user=1, requests_per_minute_per_user=0)

    async def scenario() -> None:
        client = SharedLimitsClient(SharedLimitsSettings(url=f"unix:{path}", timeout_s=0.2), SECRET.encode())
        local = UserLimits(load_settings(admission={"max_concurrent_per_user": 1,
                                                    "requests_per_minute_per_user": 0}).admission)
        limits = SharedUserLimits(client, local)
        await client.start()
        while not client.connected:
            await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)  # blocks the loop once the enter is out
        async with limits.admit("local:alice"):
            assert local._active["local:alice"] == 1  # the wait ended before the loop read the answer
        await asyncio.sleep(1.0)  # longer than the check for a silent server
        assert client.connected, "a server that had answered was given up"
        async with limits.admit("local:alice"):  # at the server: the late count was given back, so she has room
            pass
        async with limits.admit("local:alice"), limits.admit("local:bob"):
            with pytest.raises(RateLimited):
                async with limits.admit("local:alice"):
                    pass
        await client.close()

    with limits_server(config, tmp_path / "limits.log"):
        asyncio.run(scenario())
