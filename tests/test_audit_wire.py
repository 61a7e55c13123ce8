"""The audit's ear on the wire, without a stack: real tcpdump captures of real connections on loopback (a TLS
server made with Python's ssl and a trustme CA, and the same bytes in clear), read back by ``server.audit.wire``;
and the reassembly on packets written by dpkt, for what loopback never does (loss, reordering, retransmission)."""

from __future__ import annotations

import base64
import http.server
import io
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import dpkt
import httpx
import pytest
import trustme

from server.audit import AuditError
from server.audit.canary import Canaries
from server.audit.capture import CaptureResult, WirePlan, capturing, plan_wire
from server.audit.probe import Gateway
from server.audit.report import WireReport
from server.audit.run import _certificate_name
from server.audit.wire import connections, is_tls, judge
from server.cli import build_parser
from server.config import ConfigError, load_settings

from .servers import free_port

CREDENTIAL = "alice:correct horse battery staple"
CANARIES = Canaries.fresh(CREDENTIAL)


def request_bytes() -> bytes:
    """What a client sends the gateway: Basic credentials in a header, the prompt and the image in the body."""
    body = (f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{CANARIES.text}"}}, '
            f'{{"type": "image_url", "image_url": {{"url": "{CANARIES.data_url}"}}}}]}}]}}').encode()
    authorization = base64.b64encode(CREDENTIAL.encode()).decode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {authorization}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class EchoServer:
    """Reads one request to its end, answers it, closes; over TLS when given a context."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        with self.context.wrap_socket(raw, server_side=True) if self.context else raw as conn:
            expected = len(request_bytes())
            while len(self.received) < expected and (chunk := conn.recv(65536)):
                self.received += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


def send(port: int, pieces: list[bytes], context: ssl.SSLContext | None = None) -> None:
    """Each piece as its own TCP segment (Nagle off, a pause between writes)."""
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw as conn:
        for piece in pieces:
            conn.sendall(piece)
            time.sleep(0.05)
        while conn.recv(65536):
            pass


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def captured(ca: trustme.CA) -> Iterator[tuple[WirePlan, WireReport]]:
    """One capture holding a TLS connection and a plaintext one, each carrying the same request in pieces."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    tls_server, plain_server = EchoServer(server_context), EchoServer()
    plan = WirePlan("lo", {tls_server.port: "gateway", plain_server.port: "engine"})
    data = request_bytes()
    # Cut inside the credential's base64 and inside the prompt, so only reassembly can find them.
    prompt_at = data.index(CANARIES.text.encode()) + 10
    credential_at = data.index(b"Basic ") + 12
    pieces = [data[:credential_at], data[credential_at:prompt_at], data[prompt_at:]]
    with capturing(plan) as capture:
        send(tls_server.port, pieces, client_context)
        send(plain_server.port, pieces)
        tls_server.close()
        plain_server.close()
        time.sleep(0.5)
    assert tls_server.received == data and plain_server.received == data
    yield plan, WireReport.of(plan, capture.stop(), CANARIES)


def test_the_canary_inside_tls_is_not_found_and_the_same_bytes_in_clear_are(
    captured: tuple[WirePlan, WireReport],
) -> None:
    plan, report = captured
    assert report.verified, report.problems
    assert report.capture is not None and report.capture.dropped_packets == 0
    findings = report.findings
    assert findings is not None
    assert findings.connections == 2 and findings.per_hop == {"gateway": 1, "engine": 1}
    assert findings.encrypted == 1 and findings.plaintext_clean == 0
    # Only the plaintext connection leaked, in the client's direction, and only kinds are named.
    [leak] = findings.leaks
    assert leak.hop == "engine" and leak.direction == "gateway -> engine"
    assert leak.to_port == next(port for port, hop in plan.ports.items() if hop == "engine")
    assert set(leak.kinds) == {"prompt", "image base64", "credential base64"}
    assert "credential" not in leak.kinds  # user:password itself never travels; its base64 does
    violation = leak.violation()
    assert violation.startswith("wire: ") and "in clear gateway -> engine" in violation
    document = report.as_json()
    assert document["in_clear"] == 1 and document["flows"] == 2 and document["verified"]
    for secret in (CANARIES.text, CREDENTIAL.split(":", 1)[1], base64.b64encode(CREDENTIAL.encode()).decode()):
        assert secret not in str(document) and secret not in violation and secret not in "\n".join(report.summary())


def test_the_request_was_split_across_segments(captured: tuple[WirePlan, WireReport]) -> None:
    """The capture really held the request in several segments: the finding above is the reassembly's."""
    plan, report = captured
    assert report.capture is not None
    plain = next(c for c in connections(report.capture.pcap, plan.ports) if c.hop == "engine")
    assert len(plain.to_server.segments) >= 3
    assert all(CANARIES.text.encode() not in payload for _, payload in plain.to_server.segments)
    assert plain.opened_in_capture


def ethernet_frame(seq: int, payload: bytes, *, flags: int = dpkt.tcp.TH_ACK, sport: int = 40000,
                   dport: int = 8100) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=payload)
    ip = dpkt.ip.IP(src=b"\x7f\x00\x00\x01", dst=b"\x7f\x00\x00\x01", p=dpkt.ip.IP_PROTO_TCP, data=tcp)
    ip.len = len(bytes(ip))
    return bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def pcap_of(frames: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    writer = dpkt.pcap.Writer(buffer, linktype=dpkt.pcap.DLT_EN10MB)
    for frame in frames:
        writer.writepkt(frame)
    return buffer.getvalue()


def test_reassembly_orders_segments_drops_retransmissions_and_wraps() -> None:
    data = request_bytes()
    isn = (1 << 32) - 100  # the sequence number wraps inside the request
    pieces = [(isn + 1 + offset, data[offset:offset + 700]) for offset in range(0, len(data), 700)]
    frames = [ethernet_frame(isn, b"", flags=dpkt.tcp.TH_SYN)]
    frames += [ethernet_frame(seq % (1 << 32), payload) for seq, payload in reversed(pieces)]  # all out of order
    frames += [ethernet_frame(seq % (1 << 32), payload) for seq, payload in pieces[:3]]  # retransmitted
    seq, payload = pieces[1]
    frames.append(ethernet_frame(seq % (1 << 32), payload + pieces[2][1][:50]))  # overlapping, repacketised
    [connection] = connections(pcap_of(frames), {8100: "engine"})
    assert connection.to_server.assemble() == (data, 0)
    assert judge([connection], CANARIES).leaks[0].direction == "gateway -> engine"


def test_a_lost_segment_is_counted_missing_not_papered_over() -> None:
    data = request_bytes()
    frames = [ethernet_frame(1000, b"", flags=dpkt.tcp.TH_SYN), ethernet_frame(1001, data[:100]),
              ethernet_frame(1001 + 200, data[200:300])]
    [connection] = connections(pcap_of(frames), {8100: "engine"})
    assembled, missing = connection.to_server.assemble()
    assert missing == 100 and assembled == data[:100] + data[200:300]
    assert judge([connection], CANARIES).missing_bytes == 100


def test_tls_is_recognised_by_its_first_record() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert is_tls(hello, opened_in_capture=True)
    assert not is_tls(b"POST / HTTP/1.1\r\n", opened_in_capture=True)
    # A connection already open when the capture started shows application data records.
    assert is_tls(b"\x17\x03\x03\x00\x20", opened_in_capture=False)
    assert not is_tls(b"\x17\x03\x03\x00\x20", opened_in_capture=True)


def test_clean_plaintext_and_empty_connections_are_neither_encrypted_nor_in_clear() -> None:
    frames = [ethernet_frame(1, b"", flags=dpkt.tcp.TH_SYN), ethernet_frame(2, b"GET /readyz HTTP/1.1\r\n\r\n")]
    findings = judge(connections(pcap_of(frames), {8100: "engine"}), CANARIES)
    assert (findings.encrypted, findings.plaintext_clean, findings.empty, findings.leaks) == (0, 1, 0, [])
    refused = [ethernet_frame(7, b"", flags=dpkt.tcp.TH_SYN), ethernet_frame(0, b"", flags=dpkt.tcp.TH_RST, sport=8100,
                                                                              dport=40000)]
    findings = judge(connections(pcap_of(refused), {8100: "engine"}), CANARIES)
    assert (findings.connections, findings.encrypted, findings.plaintext_clean, findings.empty) == (1, 0, 0, 1)


def test_no_connection_on_a_hop_means_not_verified() -> None:
    """A capture on the wrong interface (or a filter that missed) must never read as "nothing in clear"."""
    plan = WirePlan("lo", {8000: "gateway", 8100: "engine"})
    frames = [ethernet_frame(1, b"", flags=dpkt.tcp.TH_SYN, dport=8000)]
    report = WireReport.of(plan, CaptureResult(pcap_of(frames), 1, 0, False), CANARIES)
    assert not report.verified and any("engine" in problem for problem in report.problems)
    dropped = WireReport.of(plan, CaptureResult(pcap_of(frames), 1, 3, False), CANARIES)
    assert any("dropped 3" in problem for problem in dropped.problems)


def test_the_plan_watches_the_hops_the_settings_put_on_tcp(tmp_path: Path) -> None:
    unix = plan_wire("http://127.0.0.1:8000", load_settings(None), interface=None, max_mb=1, started=True)
    assert unix.ports == {8000: "gateway"} and unix.interface == "lo"
    assert any("unix sockets" in note for note in unix.notes)
    config = tmp_path / "tcp.yaml"
    config.write_text("engine: {bind: tcp, host: 127.0.0.1, base_port: 8200, replicas: 2}\n")
    tcp = plan_wire("https://127.0.0.1:9443", load_settings(config), interface=None, max_mb=1, started=True)
    assert tcp.ports == {9443: "gateway", 8200: "engine", 8201: "engine"} and tcp.notes == ()
    assert tcp.capture_filter() == "tcp and (port 8200 or port 8201 or port 9443)"
    remote = tmp_path / "remote.yaml"
    remote.write_text("upstreams: [{url: 'https://10.1.2.3:8443'}, {url: 'unix:/run/airlock/replica-0.sock'}]\n"
                      "upstream_tls: {ca_file: /etc/airlock/ca.pem, cert_file: /etc/airlock/gw.crt, "
                      "key_file: /etc/airlock/gw.key}\n")
    attached = plan_wire("https://airlock.example:443", load_settings(remote), interface=None, max_mb=1,
                         started=False)
    assert attached.ports == {443: "gateway", 8443: "engine"} and attached.interface == "any"
    unknown = plan_wire("http://127.0.0.1:8000", None, interface="eth0", max_mb=1, started=False)
    assert unknown.interface == "eth0" and unknown.unwatched and "--config" in unknown.unwatched[0]
    proxied = tmp_path / "proxied.yaml"
    proxied.write_text("gateway: {host: 0.0.0.0, port: 8000, tls_terminated_by_proxy: true, trusted_proxies: "
                       "[10.0.0.5]}\nauth: {api_keys_file: /etc/airlock/api-keys.json}\n")
    behind = plan_wire("https://airlock.example:443", load_settings(proxied), interface=None, max_mb=1, started=False)
    assert behind.ports[443] == "gateway" and behind.ports[8000] == "gateway behind the proxy"


def test_a_hop_the_audit_could_not_find_leaves_the_wire_not_verified() -> None:
    plan = plan_wire("http://127.0.0.1:8000", None, interface=None, max_mb=1, started=False)
    report = WireReport.of(plan, CaptureResult(b"", 0, 0, False), Canaries.fresh())
    assert not report.verified and any("engine hop is not known" in problem for problem in report.problems)


def test_an_interface_tcpdump_cannot_open_stops_the_audit() -> None:
    with pytest.raises(AuditError, match=r"tcpdump cannot capture on airlock-nonexistent0.*--no-wire"), \
            capturing(WirePlan("airlock-nonexistent0", {free_port(): "gateway"})):
        pass


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_audit_commands() -> list[list[str]]:
    """Every `airlock audit` command in the README's "Proving it" section, as the shell would pass its arguments
    (command substitutions, which find pids or make a key, stand in as a number)."""
    text = README.read_text()
    section = text[text.index("### Proving it: `airlock audit`"):text.index("**In the test suite** (`make test`)")]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if "airlock audit" in line and not line.lstrip().startswith("#"):
                words = shlex.split(re.sub(r'"\$\([^)]*\)"', "4242", line))
                commands.append(words[words.index("audit") + 1:])
    return commands


def test_every_audit_example_in_the_readme_is_accepted_as_written() -> None:
    parsed = [build_parser().parse_args(["audit", *arguments]) for arguments in readme_audit_commands()]
    assert len(parsed) == 4 and all(args.func.__name__ == "_cmd_audit" for args in parsed)
    attached = [args for args in parsed if args.attach]
    assert [len(args.attach) for args in attached] == [1, 2]  # `airlock up`; the gateway and engines units
    assert all(args.url for args in attached)


def test_the_readmes_systemd_audit_reaches_the_gateway_bare_metal_sets_up() -> None:
    """The audit of the systemd units talks to the port 3a's gateway.yaml listens on, over https, trusting the CA
    file the TLS section makes."""
    from .test_systemd import readme_bare_metal

    gateway = readme_bare_metal().yaml_files["/etc/airlock/gateway.yaml"]["gateway"]
    systemd = next(args for args in (build_parser().parse_args(["audit", *arguments])
                                     for arguments in readme_audit_commands()) if args.attach and len(args.attach) == 2)
    url = urlsplit(systemd.url)
    assert url.scheme == "https" and url.port == gateway["port"], systemd.url
    assert str(systemd.ca_file) == "internal-ca.pem" and "-CAkey internal-ca.key" in README.read_text()


def test_the_readme_synopsis_names_exactly_the_audit_options() -> None:
    text = README.read_text()
    synopsis = text[text.index("airlock audit [--config FILE]"):text.index("AIRLOCK_AUDIT_KEY: the credential")]
    documented = set(re.findall(r"--[a-z][a-z-]+", synopsis))
    help_text = subprocess.run([sys.executable, "-m", "server.cli", "audit", "--help"], capture_output=True,
                               text=True, check=True, cwd=README.parent).stdout
    offered = set(re.findall(r"--[a-z][a-z-]+", help_text)) - {"--help"}
    assert documented == offered


def test_the_audit_credential_is_not_taken_for_a_misspelt_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """`AIRLOCK_AUDIT_KEY=... airlock audit --config FILE` (as the README writes it) loads the settings."""
    monkeypatch.setenv("AIRLOCK_AUDIT_KEY", "alk_0123456789abcdef_secret")
    assert load_settings(None).engine.bind == "unix"
    monkeypatch.setenv("AIRLOCK_AUDIT_KEYS", "x")
    with pytest.raises(ConfigError, match="AIRLOCK_AUDIT_KEYS: unknown setting"):
        load_settings(None)


class Answering(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_the_audit_reaches_a_tls_gateway_at_127_0_0_1_under_its_certificate_name(
    ca: trustme.CA, tmp_path: Path,
) -> None:
    """How the audit talks to a TLS stack it started on 127.0.0.1: the CA from --ca-file, the name from the
    gateway's certificate (a real TLS server with a certificate for a service name only)."""
    leaf = ca.issue_cert("airlock.internal")
    cert_file, ca_file = tmp_path / "gateway.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    assert _certificate_name(cert_file) == "airlock.internal"
    cases = ((("127.0.0.1", "airlock.internal"), None), (("airlock.internal", "localhost"), "localhost"))
    for names, expected in cases:
        other = tmp_path / "other.pem"
        ca.issue_cert(*names).cert_chain_pems[0].write_to_path(str(other))
        assert _certificate_name(other) == expected
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        with Gateway(url, ca_file, "airlock.internal").client(timeout=5) as client:
            assert client.get("/readyz").text == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), \
                Gateway(url, ca_file).client(timeout=5) as client:
            client.get("/readyz")  # 127.0.0.1 is not a name the certificate gives
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), \
                Gateway(url, None, "airlock.internal").client(timeout=5) as client:
            client.get("/readyz")  # the system's CAs do not know the test CA
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
