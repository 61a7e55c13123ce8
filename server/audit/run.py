"""Run an audit: start (or attach to) a stack under strace, send the canaries through it, judge what happened.

A stack the audit starts is traced from its first instruction, so every process it will ever run is seen. A
running stack (``--attach PID``) is traced from the moment of attaching; that needs root or CAP_SYS_PTRACE,
because Airlock marks its gateway non-dumpable precisely so that other processes cannot read its memory.
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

import httpx

from ..config import ConfigError
from . import AuditError
from .canary import Canaries
from .findings import Findings, own_pid_tree
from .probe import ProbeError, run_probe
from .report import ProbeSummary, Report
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
    attach: int | None
    url: str | None
    netns: bool
    inside_netns: bool
    rounds: int
    start_timeout_s: float
    json_path: str | None


def audit(options: AuditOptions) -> int:
    if shutil.which("strace") is None:
        raise AuditError("strace is not installed (Debian: apt-get install strace)")
    if options.netns:
        return _reexec_in_netns(options)
    credential = os.environ.get(CREDENTIAL_ENV) or None
    canaries = Canaries.fresh(credential)
    findings = Findings(canaries)
    if options.attach is not None:
        if not options.url:
            raise AuditError("--attach needs --url (the gateway's address)")
        probe = _audit_attached(options, credential, findings)
    else:
        probe = _audit_started(options, credential, findings)
    findings.scan_files_left()
    interfaces = sorted(name for _, name in socket.if_nameindex())
    mode = "attached" if options.attach is not None else "started"
    report = Report(mode, options.inside_netns, interfaces, probe, findings).judge()
    document = json.dumps(report.as_json(), indent=2)
    if options.json_path == "-":
        print(document)
        print(report.summary(), file=sys.stderr)
    else:
        if options.json_path:
            Path(options.json_path).write_text(document + "\n")
        print(report.summary())
    return EXIT_PASSED if report.passed else EXIT_VIOLATIONS


def _audit_started(options: AuditOptions, credential: str | None, findings: Findings) -> ProbeSummary:
    port = _free_loopback_port()
    stack_command = [sys.executable, "-m", "server.cli", "up", "--host", "127.0.0.1", "--port", str(port)]
    if options.config is not None:
        stack_command += ["--config", str(options.config)]
    # The audit's credential is the audit's: the stack is not given it.
    stack_env = {key: value for key, value in os.environ.items() if key != CREDENTIAL_ENV}
    with _traced(findings, lambda output: [*strace_command(output), "--", *stack_command], stack_env) as (
        tracer, log_tail,
    ):
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(base_url, tracer, log_tail, options.start_timeout_s)
        try:
            probe = run_probe(base_url, credential, findings.canaries, options.rounds)
        except (ProbeError, httpx.HTTPError) as exc:
            raise AuditError(f"the audit's requests failed: {exc}\n" + "\n".join(log_tail)) from exc
        time.sleep(SETTLE_S)
        # Stop the stack, not strace: its shutdown is traced too.
        for child in _children(tracer.pid):
            os.kill(child, signal.SIGTERM)
        _wait(tracer)
    return probe


def _audit_attached(options: AuditOptions, credential: str | None, findings: Findings) -> ProbeSummary:
    assert options.attach is not None and options.url is not None
    pids = own_pid_tree(options.attach)
    with _traced(findings, lambda output: strace_command(output, attach=pids)) as (tracer, log_tail):
        _wait_attached(pids, tracer, log_tail)
        try:
            probe = run_probe(options.url.rstrip("/"), credential, findings.canaries, options.rounds)
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


def _wait_ready(base_url: str, tracer: subprocess.Popen[bytes], log_tail: deque[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tracer.poll() is not None:
            raise AuditError("the stack stopped while starting:\n" + "\n".join(log_tail))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
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
             "--start-timeout", str(options.start_timeout_s)]
    if options.config is not None:
        inner += ["--config", str(options.config)]
    if options.json_path:
        inner += ["--json", options.json_path]
    namespace = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    command = [*namespace, "sh", "-c", 'ip link set lo up && exec "$@"', "airlock-audit", *inner]
    try:
        return subprocess.run(command).returncode
    except OSError as exc:
        raise ConfigError(f"cannot start a network namespace: {exc}") from exc
