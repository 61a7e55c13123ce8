"""The wire, read back: a pcap held in memory, cut into TCP connections, each direction reassembled and searched.

tcpdump captures; this module only reads what it captured (with dpkt, a well-kept pcap/packet parser) and says
where a canary or a credential travelled in clear. Each direction of a connection is put back together by sequence
number (segments sorted, retransmitted bytes dropped), so a canary split across segments is found whole. A
connection whose client spoke TLS first (a handshake record, ``0x16 0x03``) and in which nothing was found counts
as encrypted. Nothing read here is ever written anywhere; findings name kinds and ports, never contents.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import dpkt  # type: ignore[import-untyped]
import dpkt.sll  # type: ignore[import-untyped]
import dpkt.sll2  # type: ignore[import-untyped]

from .canary import Canaries

SEQ_MODULUS = 1 << 32
# A segment "before" the first one seen by more than this is an old retransmission, not data past a wrap-around.
SEQ_WINDOW = 1 << 31
TLS_HANDSHAKE = b"\x16\x03"
# A connection captured after it opened starts with whatever record came next: any TLS record type, version 3.x.
TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})


class CaptureFormatError(Exception):
    """The capture is not a pcap this module can read (the wire was then not verified)."""


@dataclass
class Direction:
    """The bytes one side of a connection sent, as segments keyed by sequence number."""

    segments: list[tuple[int, bytes]] = field(default_factory=list)
    start: int | None = None  # sequence number of the first data byte, once the SYN is seen

    def add(self, seq: int, payload: bytes, *, syn: bool) -> None:
        if syn:
            self.start = (seq + 1) % SEQ_MODULUS
        if payload:
            self.segments.append((seq, payload))

    def assemble(self) -> tuple[bytes, int]:
        """The bytes in order, each once, and how many bytes are missing (segments the capture did not hold)."""
        if not self.segments:
            return b"", 0
        base = self.start if self.start is not None else min(seq for seq, _ in self.segments)
        placed = sorted(((seq - base) % SEQ_MODULUS, payload) for seq, payload in self.segments)
        out, missing = bytearray(), 0
        for offset, payload in placed:
            if offset >= SEQ_WINDOW:
                continue  # sent before the capture's first byte of this direction
            end = len(out) + missing
            if offset > end:
                missing += offset - end
                out += payload
            elif offset + len(payload) > end:
                out += payload[end - offset:]
        return bytes(out), missing


@dataclass
class Connection:
    """One TCP connection to a watched port: the client's side and the server's side."""

    server_port: int
    client_port: int
    hop: str
    opened_in_capture: bool = False
    to_server: Direction = field(default_factory=Direction)
    from_server: Direction = field(default_factory=Direction)


@dataclass(frozen=True)
class Leak:
    """Something the audit sent or received, seen in clear in one direction of one connection."""

    hop: str
    direction: str
    from_port: int
    to_port: int
    kinds: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"hop": self.hop, "direction": self.direction, "from_port": self.from_port, "to_port": self.to_port,
                "found": list(self.kinds)}

    def violation(self) -> str:
        return f"wire: {', '.join(self.kinds)} in clear {self.direction} (port {self.from_port} -> {self.to_port})"


@dataclass
class WireFindings:
    """What the capture held, connection by connection, and where anything travelled in clear."""

    connections: int = 0
    payload_bytes: int = 0
    encrypted: int = 0
    plaintext_clean: int = 0
    empty: int = 0  # no byte either way: refused, or opened and closed (a probe before the port listened)
    missing_bytes: int = 0
    per_hop: dict[str, int] = field(default_factory=dict)
    leaks: list[Leak] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"flows": self.connections, "bytes": self.payload_bytes,
                "in_clear": len({(leak.hop, frozenset((leak.from_port, leak.to_port))) for leak in self.leaks}),
                "encrypted": self.encrypted, "plaintext_without_findings": self.plaintext_clean,
                "empty": self.empty,
                "missing_bytes": self.missing_bytes, "flows_per_hop": dict(sorted(self.per_hop.items())),
                "findings": [leak.as_json() for leak in self.leaks]}


def connections(pcap: bytes, ports: Mapping[int, str]) -> list[Connection]:
    """Every TCP connection in ``pcap`` whose server side is one of ``ports`` (port -> hop name)."""
    table: dict[tuple[bytes, int, bytes, int], Connection] = {}
    found: list[Connection] = []
    for src, sport, dst, dport, tcp in _tcp_segments(pcap):
        syn = bool(tcp.flags & dpkt.tcp.TH_SYN)
        from_client = _from_client(sport, dport, ports, syn=syn, ack=bool(tcp.flags & dpkt.tcp.TH_ACK))
        if from_client is None:
            continue
        key = (src, sport, dst, dport) if from_client else (dst, dport, src, sport)
        server_port, client_port = (dport, sport) if from_client else (sport, dport)
        connection = table.get(key)
        if connection is None or (syn and from_client and _carried_data(connection)):
            # A new connection (or the same address pair used again after the old one closed).
            connection = table[key] = Connection(server_port, client_port, ports[server_port])
            found.append(connection)
        if syn and from_client:
            connection.opened_in_capture = True
        side = connection.to_server if from_client else connection.from_server
        side.add(tcp.seq, bytes(tcp.data), syn=syn)
    return found


def _carried_data(connection: Connection) -> bool:
    return bool(connection.to_server.segments or connection.from_server.segments)


def _from_client(sport: int, dport: int, ports: Mapping[int, str], *, syn: bool, ack: bool) -> bool | None:
    """True when the segment goes to the watched server, False when it comes from it, None when it is neither."""
    if syn:  # the side that opens the connection is the client, whatever the ports
        return (not ack) if (dport in ports or sport in ports) else None
    if dport in ports and sport not in ports:
        return True
    if sport in ports and dport not in ports:
        return False
    if sport in ports and dport in ports:
        return dport < sport  # both watched (rare): the lower port is taken as the listener
    return None


def judge(found: list[Connection], canaries: Canaries) -> WireFindings:
    """Search each direction of each connection for every canary and credential; count what was encrypted."""
    findings = WireFindings(connections=len(found))
    for connection in found:
        findings.per_hop[connection.hop] = findings.per_hop.get(connection.hop, 0) + 1
        request, request_missing = connection.to_server.assemble()
        answer, answer_missing = connection.from_server.assemble()
        findings.payload_bytes += len(request) + len(answer)
        findings.missing_bytes += request_missing + answer_missing
        leaked = False
        for data, outward in ((request, True), (answer, False)):
            kinds = canaries.found_in(data)
            if kinds:
                leaked = True
                findings.leaks.append(_leak(connection, outward, tuple(kinds)))
        if not leaked:
            if not request and not answer:
                findings.empty += 1
            elif is_tls(request, opened_in_capture=connection.opened_in_capture):
                findings.encrypted += 1
            else:
                findings.plaintext_clean += 1
    return findings


def is_tls(client_bytes: bytes, *, opened_in_capture: bool) -> bool:
    """Whether the client's stream is TLS: it starts with a handshake record, or (a connection captured after it
    opened) with any TLS record."""
    if opened_in_capture or not client_bytes:
        return client_bytes.startswith(TLS_HANDSHAKE)
    return client_bytes[0] in TLS_RECORD_TYPES and client_bytes[1:2] == b"\x03"


def _leak(connection: Connection, outward: bool, kinds: tuple[str, ...]) -> Leak:
    client, server = ("client", "gateway") if connection.hop == "gateway" else ("gateway", connection.hop)
    if outward:
        return Leak(connection.hop, f"{client} -> {server}", connection.client_port, connection.server_port, kinds)
    return Leak(connection.hop, f"{server} -> {client}", connection.server_port, connection.client_port, kinds)


def _tcp_segments(pcap: bytes) -> Iterator[tuple[bytes, int, bytes, int, Any]]:
    """(source address, source port, destination address, destination port, TCP segment) for each packet."""
    try:
        reader = dpkt.pcap.Reader(io.BytesIO(pcap))
    except (ValueError, dpkt.dpkt.Error) as exc:
        raise CaptureFormatError(f"not a pcap capture: {exc}") from exc
    link = reader.datalink()
    try:
        for _, frame in reader:
            ip = _network_layer(link, frame)
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.tcp.TCP):
                yield ip.src, ip.data.sport, ip.dst, ip.data.dport, ip.data
    except dpkt.dpkt.NeedData:
        return  # the last packet was cut off when the capture stopped: the ones before it stand


def _network_layer(link: int, frame: bytes) -> Any:
    try:
        if link == dpkt.pcap.DLT_EN10MB:
            return dpkt.ethernet.Ethernet(frame).data
        if link == dpkt.pcap.DLT_LINUX_SLL:
            return dpkt.sll.SLL(frame).data
        if link == dpkt.pcap.DLT_LINUX_SLL2:
            return dpkt.sll2.SLL2(frame).data
        if link in (dpkt.pcap.DLT_RAW, dpkt.pcap.DLT_IPV4, dpkt.pcap.DLT_IPV6):
            return dpkt.ip6.IP6(frame) if frame[:1] and frame[0] >> 4 == 6 else dpkt.ip.IP(frame)
    except (dpkt.dpkt.Error, ValueError):
        return None
    raise CaptureFormatError(f"link type {link} is not one the audit reads (capture on another interface)")
