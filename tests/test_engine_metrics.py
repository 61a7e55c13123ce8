"""Each engine's ``vllm:*`` series exported once: a gateway with ``metrics.engine_series: false`` leaves them out
(several gateways would each export them again), and the engine launcher's own listener (``engine.metrics_port``)
serves them, read from the real engine, labelled with the replica index the gateway gives it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from server.engine import ReplicaLaunch
from server.runner import engine_metrics_listener

from .conftest import AIRLOCK, ROOT, Credentials, Stack, airlock_env, stop, wait_ready, write_config
from .servers import free_port

pytestmark = pytest.mark.engine


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, []).extend((sample.labels, sample.value) for sample in family.samples)
    return found


def test_a_gateway_without_engine_series_exports_no_vllm_series(stack: Stack, credentials: Credentials,
                                                                  tmp_path: Path) -> None:
    """The real gateway in front of the session's real engine, as the chart runs it."""
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path / "gateway.yaml", {
        "gateway": {"port": port},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "upstreams": [{"url": f"unix:{stack.engine_socket}"}],
        "metrics": {"listener": "separate", "port": metrics_port, "engine_series": False},
    })
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, env=airlock_env())
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", gateway, log_path, 60)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    finally:
        stop(gateway)
    found = families(text)
    assert "airlock_requests" in found and "airlock_replica_healthy" in found  # its own series are there
    assert not [name for name in found if name.startswith("vllm:")]
    # It read no engine's metrics, so it says nothing about reading them: the engine's listener does.
    assert "airlock_engine_scrape_ok" not in found


async def scrape_engine_listener(settings: Settings, launches: list[ReplicaLaunch]) -> str:
    port = settings.engine.metrics_port
    async with engine_metrics_listener(settings, launches), httpx.AsyncClient(timeout=30) as client:
        answer = await client.get(f"http://127.0.0.1:{port}/metrics")
        refused = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert refused.status_code in (404, 405)  # metrics and nothing else: no way to the engine's API
    return answer.text


def test_the_engine_launchers_listener_serves_its_engines_vllm_series_with_the_replica_label(
    stack: Stack, tmp_path: Path,
) -> None:
    """The listener `airlock engine` runs with engine.metrics_port, over the session's real engine (the chart's
    engine pod 3 runs one replica, labelled 3 as the gateway labels it), and one replica that does not exist."""
    settings = Settings.model_validate({"engine": {
        "metrics_port": free_port(), "metrics_replica_offset": 3, "socket_dir": str(stack.socket_dir),
    }, "metrics": {"engine_timeout_s": 5}})
    launches = [ReplicaLaunch(0, [], {}, f"unix:{stack.engine_socket}"),
                ReplicaLaunch(1, [], {}, f"unix:{tmp_path / 'no-such-engine.sock'}")]
    found = families(asyncio.run(scrape_engine_listener(settings, launches)))
    engine = {name: samples for name, samples in found.items() if name.startswith("vllm:")}
    assert "vllm:num_requests_running" in engine and "vllm:generation_tokens" in engine
    assert {labels["replica"] for samples in engine.values() for labels, _ in samples} == {"3"}
    scraped = {labels["replica"]: value for labels, value in found["airlock_engine_scrape_ok"]}
    assert scraped == {"3": 1.0, "4": 0.0}
    # Only vllm:* and the scrape gauge: the engine's process series, and no gateway series.
    assert set(found) - set(engine) == {"airlock_engine_scrape_ok"}
