"""Run an audit: start (or attach to) a stack under strace, send the canaries through it, judge what happened.

A stack the audit starts is traced from its first instruction, so every process it will ever run is seen. A
running stack (``--attach PID``) is traced from the moment of attaching; that needs root or CAP_SYS_PTRACE,
because Airlock marks its gateway non-dumpable precisely so that other processes cannot read its memory.
Meanwhile tcpdump listens on the stack's TCP ports (``capture.py``), from before the stack starts, so that every
connection is seen from its first packet; ``wire.py`` then says where anything travelled in clear.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..config import ConfigError, Settings, load_settings
from ..tls import TlsFileError, client_context
from . import AuditError
from .canary import Canaries
from .capture import CaptureHandle, CaptureResult, capturing, plan_wire
from .findings import Findings, own_pid_tree
from .probe import Gateway, ProbeError, run_probe
from .report import ProbeSummary, Report, WireReport
from .strace import TraceReader, strace_command

CREDENTIAL_ENV = "AIRLOCK_AUDIT_KEY"
EXIT_PASSED, EXIT_VIOLATIONS, EXIT_NOT_RUN = 0, 1, 2
ATTACH_TIMEOUT_S = 60
STOP_TIMEOUT_S = 120
# After the last answer, time for anything the stack does late (a log line, a cache flush) to show in the trace.
SETTLE_S = 2.0
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class AuditOptions:
    config: Path | None
    attach: tuple[int, ...]
    url: str | None
    netns: bool
    inside_netns: bool
    rounds: int
    start_timeout_s: float
    json_path: str | None
    wire: bool = True
    wire_interface: str | None = None
    wire_max_mb: int = 256
    ca_file: Path | None = None


def audit(options: AuditOptions) -> int:
    if shutil.which("strace") is None:
        raise AuditError("strace is not installed (Debian: apt-get install strace)")
    if options.netns:
        return _reexec_in_netns(options)
    credential = os.environ.get(CREDENTIAL_ENV) or None
    canaries = Canaries.fresh(credential)
    findings = Findings(canaries)
    if options.attach:
        if not options.url:
            raise AuditError("--attach needs --url (the gateway's address)")
        settings = load_settings(options.config) if options.config is not None else None
        gateway = Gateway(options.url.rstrip("/"), options.ca_file)
    else:
        settings = load_settings(options.config)
        gateway = _started_gateway(settings, _free_loopback_port(), options.ca_file)
    if gateway.url.startswith("https://"):
        try:
            client_context(gateway.ca_file)
        except TlsFileError as exc:
            raise AuditError(f"--ca-file: {exc}") from exc
    plan = (plan_wire(gateway.url, settings, interface=options.wire_interface, max_mb=options.wire_max_mb,
                      started=not options.attach) if options.wire else None)
    with capturing(plan) if plan else contextlib.nullcontext() as capture:
        if options.attach:
            probe = _audit_attached(options, gateway, credential, findings, settings)
        else:
            probe = _audit_started(options, gateway, credential, findings, settings)
    wire = WireReport.of(plan, _stopped(capture), canaries) if plan else WireReport.not_watched("--no-wire")
    findings.scan_files_left()
    interfaces = sorted(name for _, name in socket.if_nameindex())
    mode = "attached" if options.attach else "started"
    report = Report(mode, options.inside_netns, interfaces, probe, findings, wire).judge()
    document = json.dumps(report.as_json(), indent=2)
    if options.json_path == "-":
        print(document)
        print(report.summary(), file=sys.stderr)
    else:
        if options.json_path:
            Path(options.json_path).write_text(document + "\n")
        print(report.summary())
    return {"PASSED": EXIT_PASSED, "FAILED": EXIT_VIOLATIONS}.get(report.verdict, EXIT_NOT_RUN)


def _documents(settings: Settings | None) -> bool:
    """Send the canary PDF unless the stack's settings turn documents off (unknown settings: the default, on)."""
    return settings is None or settings.documents.enabled


def _stopped(capture: CaptureHandle | None) -> CaptureResult:
    assert capture is not None
    return capture.stop()


def _started_gateway(settings: Settings, port: int, ca_file: Path | None) -> Gateway:
    """The stack the audit starts listens on 127.0.0.1; with gateway TLS on, its certificate names the service,
    so that name (or localhost / 127.0.0.1 when the certificate has them) is what the audit verifies."""
    cert_file = settings.gateway.tls.cert_file
    if cert_file is None:
        return Gateway(f"http://127.0.0.1:{port}")
    return Gateway(f"https://127.0.0.1:{port}", ca_file, _certificate_name(cert_file))


def _certificate_name(cert_file: Path) -> str | None:
    """None when the certificate is valid for 127.0.0.1 itself; else localhost, or its first DNS name."""
    from cryptography import x509  # read only here: the audit's start stays light

    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise AuditError(f"gateway.tls.cert_file: cannot read its names ({type(exc).__name__})") from exc
    if "127.0.0.1" in {str(address) for address in names.get_values_for_type(x509.IPAddress)}:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return "localhost" if "localhost" in dns else (dns[0] if dns else None)


def _audit_started(options: AuditOptions, gateway: Gateway, credential: str | None, findings: Findings,
                   settings: Settings | None) -> ProbeSummary:
    port = urlsplit(gateway.url).port
    stack_command = [sys.executable, "-m", "server.cli", "up", "--host", "127.0.0.1", "--port", str(port)]
    if options.config is not None:
        stack_command += ["--config", str(options.config)]
    # The audit's credential is the audit's: the stack is not given it.
    stack_env = {key: value for key, value in os.environ.items() if key != CREDENTIAL_ENV}
    with _traced(findings, lambda output: [*strace_command(output), "--", *stack_command], stack_env) as (
        tracer, log_tail,
    ):
        _wait_ready(gateway, tracer, log_tail, options.start_timeout_s)
        try:
            probe = run_probe(gateway, credential, findings.canaries, options.rounds, _documents(settings))
        except (ProbeError, httpx.HTTPError) as exc:
            raise AuditError(f"the audit's requests failed: {exc}\n" + "\n".join(log_tail)) from exc
        time.sleep(SETTLE_S)
        # Stop the stack, not strace: its shutdown is traced too.
        for child in _children(tracer.pid):
            os.kill(child, signal.SIGTERM)
        _wait(tracer)
    return probe


def _audit_attached(options: AuditOptions, gateway: Gateway, credential: str | None,
                    findings: Findings, settings: Settings | None) -> ProbeSummary:
    pids = [pid for root in options.attach for pid in own_pid_tree(root)]
    with _traced(findings, lambda output: strace_command(output, attach=pids)) as (tracer, log_tail):
        _wait_attached(pids, tracer, log_tail)
        try:
            probe = run_probe(gateway, credential, findings.canaries, options.rounds, _documents(settings))
        except (ProbeError, httpx.HTTPError) as exc:
            raise AuditError(f"the audit's requests failed: {exc}") from exc
        time.sleep(SETTLE_S)
        tracer.send_signal(signal.SIGINT)  # strace detaches; the stack runs on untouched
        _wait(tracer)
    return probe


@contextlib.contextmanager
def _traced(
    findings: Findings, command_for: Callable[[str], list[str]], env: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], deque[str]]]:
    """strace writing into a pipe that a thread reads as it comes: the trace is never stored anywhere."""
    trace_read, trace_write = os.pipe()
    log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    tracer = subprocess.Popen(
        command_for(f"/proc/self/fd/{trace_write}"), pass_fds=(trace_write,),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    os.close(trace_write)
    assert tracer.stdout is not None
    readers = [
        threading.Thread(target=_read_trace, args=(trace_read, findings), daemon=True),
        threading.Thread(target=_read_log, args=(tracer.stdout, log_tail), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        yield tracer, log_tail
    finally:
        if tracer.poll() is None:
            for child in _children(tracer.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGTERM)
            tracer.send_signal(signal.SIGINT)
            _wait(tracer)
        for reader in readers:
            reader.join(timeout=STOP_TIMEOUT_S)


def _read_trace(fd: int, findings: Findings) -> None:
    reader = TraceReader()
    with open(fd, encoding="ascii", errors="backslashreplace") as trace:
        for line in trace:
            for call in reader.feed(line):
                findings.observe(call)


def _read_log(stream: object, tail: deque[str]) -> None:
    for raw in stream:  # type: ignore[attr-defined]
        tail.append(raw.decode(errors="replace").rstrip())


def _wait_ready(gateway: Gateway, tracer: subprocess.Popen[bytes], log_tail: deque[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with gateway.client(timeout=2) as client:
        while time.monotonic() < deadline:
            if tracer.poll() is not None:
                raise AuditError("the stack stopped while starting:\n" + "\n".join(log_tail))
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.ConnectError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise AuditError("the gateway's TLS certificate is not trusted: give the CA that signed it "
                                     "with --ca-file (or SSL_CERT_FILE)") from exc
            except httpx.HTTPError:
                pass
            time.sleep(1)
    raise AuditError(f"the stack was not ready after {timeout_s:.0f} s:\n" + "\n".join(log_tail))


def _wait_attached(pids: list[int], tracer: subprocess.Popen[bytes], log_tail: deque[str]) -> None:
    """strace has attached once the kernel names it as every process's tracer."""
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while time.monotonic() < deadline:
        if tracer.poll() is not None:
            raise AuditError("strace could not attach (root or CAP_SYS_PTRACE is needed):\n" + "\n".join(log_tail))
        if all(_tracer_of(pid) in (tracer.pid, None) for pid in pids):
            return
        time.sleep(0.1)
    raise AuditError(f"strace did not attach within {ATTACH_TIMEOUT_S} s")


def _tracer_of(pid: int) -> int | None:
    """The pid tracing ``pid`` (0: none), or None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _reexec_in_netns(options: AuditOptions) -> int:
    """The same audit, run again inside a new network namespace where only loopback exists (and is brought up)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        raise AuditError("--netns needs unshare (util-linux) and ip (iproute2)")
    inner = [sys.executable, "-m", "server.cli", "audit", "--inside-netns", "--rounds", str(options.rounds),
             "--start-timeout", str(options.start_timeout_s), "--wire-max-mb", str(options.wire_max_mb)]
    if options.config is not None:
        inner += ["--config", str(options.config)]
    if not options.wire:
        inner += ["--no-wire"]
    if options.wire_interface:
        inner += ["--wire-interface", options.wire_interface]
    if options.ca_file is not None:
        inner += ["--ca-file", str(options.ca_file)]
    if options.json_path:
        inner += ["--json", options.json_path]
    namespace = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    command = [*namespace, "sh", "-c", 'ip link set lo up && exec "$@"', "airlock-audit", *inner]
    try:
        return subprocess.run(command).returncode
    except OSError as exc:
        raise ConfigError(f"cannot start a network namespace: {exc}") from exc
