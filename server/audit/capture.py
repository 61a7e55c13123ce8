"""tcpdump as the audit's ear on the wire: which ports and interface to watch, and the capture held in memory.

tcpdump writes pcap to its standard output (``-w -``), a pipe the audit reads into memory: the capture holds the
canaries (and, on a plaintext hop, whatever else crossed it), so it never touches a file. ``-s 0`` keeps whole
packets, ``-U --immediate-mode`` hands each one over as it comes. Unix sockets are not on any wire; a stack whose
engines listen on them has only its client hop watched, and the report says so.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from ..config import Settings, is_loopback_host
from . import AuditError

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
CHUNK_BYTES = 64 * 1024
# The kernel's capture buffer (KiB): bursts of canary requests must not overflow it.
KERNEL_BUFFER_KIB = 8192
DEFAULT_MAX_MB = 256
_DROPPED = re.compile(r"(\d+) packets? dropped by kernel")
_CAPTURED = re.compile(r"(\d+) packets? captured")
NO_WIRE_HINT = "pass --no-wire to audit without watching the wire (the report then says it was not watched)"


@dataclass(frozen=True)
class WirePlan:
    """Where the stack's TCP hops are: the interface to listen on and each watched port's hop."""

    interface: str
    ports: dict[int, str]
    notes: tuple[str, ...] = ()
    # Hops the audit knows exist but cannot watch (no settings to find them): the wire is then not verified.
    unwatched: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_MB * 1024 * 1024

    def capture_filter(self) -> str:
        return "tcp and (" + " or ".join(f"port {port}" for port in sorted(self.ports)) + ")"

    def command(self) -> list[str]:
        return ["tcpdump", "-i", self.interface, "-s", "0", "-U", "--immediate-mode", "-n",
                "-B", str(KERNEL_BUFFER_KIB), "-w", "-", self.capture_filter()]

    def as_json(self) -> dict[str, Any]:
        return {"interface": self.interface, "ports": {str(port): hop for port, hop in sorted(self.ports.items())},
                "notes": list(self.notes)}


def plan_wire(gateway_url: str, settings: Settings | None, *, interface: str | None, max_mb: int,
              started: bool) -> WirePlan:
    """The gateway's port from its URL; engine ports from the settings (``engine.bind: tcp`` when the audit starts
    ``airlock up``; ``upstreams`` too when it attaches, since a running gateway may be ``airlock gateway``)."""
    gateway = urlsplit(gateway_url)
    gateway_port = gateway.port or (443 if gateway.scheme == "https" else 80)
    ports, hosts, notes = {gateway_port: "gateway"}, [gateway.hostname or ""], []
    engine_urls: list[str] = []
    unwatched: list[str] = []
    if settings is None:
        unwatched.append("the engine hop is not known (give --config so the audit knows where the engines listen)")
    else:
        if settings.gateway.tls_terminated_by_proxy and settings.gateway.port != gateway_port:
            # The URL is the proxy's; the hop behind it, from the proxy to the gateway, is watched too.
            ports[settings.gateway.port] = "gateway behind the proxy"
            hosts.append(settings.gateway.host)
        engine = settings.engine
        if engine.bind == "tcp" and (started or not settings.upstreams):
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(engine.host, engine.host)
            engine_urls += [f"tcp://{host}:{engine.base_port + i}" for i in range(engine.replicas)]
        if not started:
            engine_urls += [upstream.url for upstream in settings.upstreams]
        if not engine_urls or any(url.startswith("unix:") for url in engine_urls):
            notes.append("engine hop: unix sockets, which are not on any wire (nothing to capture)")
    for url in engine_urls:
        if url.startswith("unix:"):
            continue
        parts = urlsplit(url)
        ports.setdefault(parts.port or (443 if parts.scheme == "https" else 80), "engine")
        hosts.append(parts.hostname or "")
    chosen = interface or ("lo" if all(is_loopback_host(host) for host in hosts) else "any")
    return WirePlan(chosen, ports, tuple(notes), tuple(unwatched), max_mb * 1024 * 1024)


@dataclass
class CaptureResult:
    pcap: bytes
    captured_packets: int | None
    dropped_packets: int | None
    truncated: bool


@dataclass
class _Reading:
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    stderr: list[str] = field(default_factory=list)
    listening: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def capturing(plan: WirePlan) -> Iterator[CaptureHandle]:
    """tcpdump running (and listening) for the duration; refuses to go on when it cannot capture."""
    if shutil.which("tcpdump") is None:
        raise AuditError(f"tcpdump is not installed (Debian: apt-get install tcpdump), so the wire cannot be "
                         f"watched; {NO_WIRE_HINT}")
    try:
        process = subprocess.Popen(plan.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    except OSError as exc:
        raise AuditError(f"tcpdump could not start ({exc.strerror}); {NO_WIRE_HINT}") from exc
    assert process.stdout is not None and process.stderr is not None
    reading = _Reading()
    readers = [threading.Thread(target=_read_packets, args=(process.stdout, reading, plan.max_bytes), daemon=True),
               threading.Thread(target=_read_messages, args=(process.stderr, reading), daemon=True)]
    for reader in readers:
        reader.start()
    handle = CaptureHandle(process, reading, readers)
    try:
        handle.wait_listening(plan.interface)
        yield handle
    finally:
        handle.stop()


class CaptureHandle:
    """A running tcpdump; ``stop()`` ends it and returns what it captured."""

    def __init__(self, process: subprocess.Popen[bytes], reading: _Reading, readers: Sequence[threading.Thread]):
        self._process, self._reading, self._readers = process, reading, readers
        self._result: CaptureResult | None = None

    def wait_listening(self, interface: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._reading.listening.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                said = "; ".join(line for line in self._reading.stderr if line)[-500:] or "no message"
                raise AuditError(f"tcpdump cannot capture on {interface} (capturing needs root or CAP_NET_RAW): "
                                 f"{said}; {NO_WIRE_HINT}")

    def stop(self) -> CaptureResult:
        if self._result is None:
            if self._process.poll() is None:
                self._process.terminate()  # SIGTERM: tcpdump flushes what it holds and prints its counts
            try:
                self._process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            for reader in self._readers:
                reader.join(timeout=STOP_TIMEOUT_S)
            for stream in (self._process.stdout, self._process.stderr):
                if stream is not None:
                    stream.close()
            messages = "\n".join(self._reading.stderr)
            self._result = CaptureResult(bytes(self._reading.data), _count(_CAPTURED, messages),
                                         _count(_DROPPED, messages), self._reading.truncated)
            self._reading.data.clear()
        return self._result


def _count(pattern: re.Pattern[str], messages: str) -> int | None:
    found = pattern.search(messages)
    return int(found.group(1)) if found else None


def _read_packets(stream: IO[bytes], reading: _Reading, max_bytes: int) -> None:
    """Into memory up to ``max_bytes``; past that the pipe is drained (tcpdump must not block) and marked cut."""
    while chunk := stream.read1(CHUNK_BYTES):  # type: ignore[attr-defined]
        room = max_bytes - len(reading.data)
        if len(chunk) > room:
            reading.truncated = True
            chunk = chunk[:max(room, 0)]
        reading.data += chunk


def _read_messages(stream: IO[bytes], reading: _Reading) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").strip()
        reading.stderr.append(line)
        if "listening on" in line:
            reading.listening.set()
