"""What the benchmarks run against: real Airlock processes (`airlock up` with a real engine, or `airlock gateway`
in front of the instant upstream), started and stopped the way an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
AIRLOCK = [sys.executable, "-m", "server.cli"]
# Per-user limits off: a benchmark's one user stands for many.
NO_USER_LIMITS = {"max_concurrent_per_user": 0, "requests_per_minute_per_user": 0}


def api_keys(keys_file: Path, users: list[str]) -> dict[str, dict[str, str]]:
    """An API key per user (made with `airlock keys create`), as request headers."""
    headers = {}
    for user in users:
        created = subprocess.run([*AIRLOCK, "keys", "create", "--user", user, "--file", str(keys_file)], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
        headers[user] = {"authorization": f"Bearer {created.stdout.strip()}"}
    return headers


def _accepting(path: Path) -> bool:
    """Whether a server listens on the unix socket ``path`` (a plain socket, closed whatever happens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


@contextmanager
def running(argv: list[str], log_path: Path, ready_url: str, timeout_s: float = 600,
            ready_uds: Path | None = None, cpus: set[int] | None = None,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process (on ``cpus`` only, if given, with its children) that is ready once ``ready_url`` answers 200 (over
    ``ready_uds`` if given); stopped with SIGTERM at the end."""
    pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin,
                                   env=None if env is None else {**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if ready_uds is not None and not _accepting(ready_uds):
                    raise httpx.ConnectError("not listening yet")  # httpx would leak its socket on this failure
                transport = httpx.HTTPTransport(uds=str(ready_uds)) if ready_uds else None
                with httpx.Client(transport=transport, timeout=2) as client:
                    if client.get(ready_url).status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv[2:4])} did not start: see {log_path}")
            time.sleep(0.5)
        yield process
    finally:
        stop(process, signal.SIGTERM, 120)


def stop(process: subprocess.Popen[bytes], signal_number: int, timeout_s: float) -> None:
    """Send ``signal_number``; killed if it has not ended within ``timeout_s``; reaped either way."""
    process.send_signal(signal_number)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def py_spy(pid: int, out: Path | None, native: bool = False, duration_s: int = 60) -> Iterator[None]:
    """py-spy records process ``pid`` into ``out`` (if given; raw stacks if ``*.txt``, else speedscope; its own log
    beside it) while the block runs, ``duration_s`` at most; stopped with SIGINT at the end, which makes it write
    what it has. ``native``: C frames too, which stops the process for each sample (it then runs slower)."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    sampling = ["--native"] if native else ["--nonblocking"]
    with out.with_suffix(".log").open("wb") as log:
        recorder = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                     "--duration", str(duration_s), "--rate", "250", *sampling, "--format",
                                     "raw" if out.suffix == ".txt" else "speedscope", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield
        finally:
            stop(recorder, signal.SIGINT, 60)


@contextmanager
def airlock(command: str, work: Path, port: int, settings: dict[str, Any], cpus: set[int] | None = None,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`airlock up` or `airlock gateway` with ``settings`` on ``port``, ready to serve."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / f"airlock-{command}.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"port": port}, **settings}))
    with running([*AIRLOCK, command, "--config", str(config)], work / f"airlock-{command}.log",
                 f"http://127.0.0.1:{port}/readyz", cpus=cpus, env=env) as process:
        yield process
