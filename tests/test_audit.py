"""`airlock audit` on the real stack: no violation where there is none, every kind caught where one is planted,
and the whole stack working inside a network namespace that has only loopback, where plaintext hops are caught on
the wire."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from .conftest import AIRLOCK, ROOT, Credentials, Stack, wait_ready, write_config
from .servers import free_port

pytestmark = pytest.mark.engine

ROUNDS = 2
# Per round: a question with an image and the canary PDF, the same streamed, a completion, and one request the
# gateway refuses.
REQUESTS_PER_ROUND = 4
DOCUMENT_CANARIES = {"document text", "document pixels", "document base64", "document name"}


def run_audit(*args: str, credential: str | None = None, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    env = {key: value for key, value in os.environ.items() if key != "AIRLOCK_AUDIT_KEY"}
    if credential:
        env["AIRLOCK_AUDIT_KEY"] = credential
    result = subprocess.run([*AIRLOCK, "audit", "--rounds", str(ROUNDS), "--json", "-", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.stdout.startswith("{"), f"no report (exit {result.returncode}):\n{result.stderr[-4000:]}"
    return result.returncode, json.loads(result.stdout), result.stderr


def assert_requests_went_through(report: dict[str, Any]) -> None:
    """An audit proves something only if its canaries really travelled through the stack."""
    requests = report["requests"]
    assert requests["sent"] == ROUNDS * REQUESTS_PER_ROUND
    assert requests["refused_as_expected"] == ROUNDS
    assert requests["answered"] == requests["sent"] - ROUNDS
    assert {"prompt", "image", "image pixels", "image base64", "credential"} <= set(report["canaries"])
    assert any(name.startswith("answer") for name in report["canaries"])
    # The questions carried the canary PDF, rendered by the gateway's worker processes, which were traced too.
    assert requests["documents"] is True and set(report["canaries"]) >= DOCUMENT_CANARIES
    assert "server.render_worker" in report["traced"]["programs"]


def test_audit_of_the_running_stack_finds_no_violation(stack: Stack) -> None:
    """The session's stack speaks plain HTTP on loopback, so the wire is left out here, and the report says so."""
    assert os.geteuid() == 0, "attaching to a non-dumpable gateway needs root here: must not be skipped silently"
    status, report, summary = run_audit("--attach", str(stack.process.pid), "--url", stack.base_url, "--no-wire",
                                        credential=stack.api_key)
    assert status == 0, summary
    assert report["passed"] and report["violations"] == [] and report["verdict"] == "PASSED"
    assert report["wire"] == {"watched": False, "verified": False, "reason": "--no-wire"}
    assert "wire: NOT watched (--no-wire)" in summary
    assert report["mode"] == "attached"
    assert_requests_went_through(report)
    # The gateway, the engine's API server and its engine core, with their threads, were all watched.
    assert report["traced"]["processes_and_threads"] >= 3
    assert report["traced"]["calls"] > 100


@pytest.fixture
def leaky_gateway(stack: Stack, credentials: Credentials, tmp_path: Path) -> Any:
    """A second gateway in front of the session's engine, with tests/planted/sitecustomize.py switched on."""
    port = free_port()
    config = write_config(tmp_path / "leaky.yaml", {
        "gateway": {"port": port},
        "auth": {"api_keys_file": str(credentials.api_keys)},
        "upstreams": [{"url": f"unix:{stack.engine_socket}"}],
    })
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "planted"), "LEAKY_GATEWAY_TEST": "1"}
    log_path = tmp_path / "leaky.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base_url}/readyz", process, log_path, 60)
        yield process, base_url, config
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_audit_catches_every_kind_of_planted_leak(leaky_gateway: Any, credentials: Credentials) -> None:
    process, base_url, config = leaky_gateway
    status, report, summary = run_audit("--attach", str(process.pid), "--url", base_url, "--config", str(config),
                                        credential=credentials.api_key)
    assert status == 1, summary
    assert not report["passed"]
    assert_requests_went_through(report)
    kinds = {violation.split(":", 1)[0] for violation in report["violations"]}
    assert kinds == {"egress", "dns", "file", "log", "wire"}, report["violations"]
    # On the wire: the plain-HTTP client hop, watched from the moment of attaching; the engine is on a unix socket.
    wire = report["wire"]
    assert wire["verified"] and wire["interface"] == "lo" and wire["ports"] == {str(urlsplit(base_url).port): "gateway"}
    assert any("unix sockets" in note for note in wire["notes"])
    sent = [finding for finding in wire["findings"] if finding["direction"] == "client -> gateway"]
    assert sent and {"prompt", "image base64", "credential"} <= set(sent[0]["found"])
    assert [entry["address"] for entry in report["egress"]] == ["192.0.2.1"]
    # Spools are files already gone (tempfile.TemporaryFile); the gateway's stderr, which this test keeps in a log
    # file, is reported as a file too.
    spooled = [written for written in report["files_written"] if written["path"].endswith(" (deleted)")]
    assert spooled and all(written["path"].startswith("/tmp/#") for written in spooled)
    # The forwarded bodies carry the prompt and the image (as base64), and the PDF's pages: its name in each page's
    # label and its text layer; the PDF spooled as it came shows its embedded image. No answer was spooled.
    found = {name for written in spooled for name in written["canaries"]}
    assert {"prompt", "image base64", "document name", "document text", "document pixels"} <= found
    assert not any(name.startswith("answer") for name in found)
    logged = [stream for stream in report["log_streams"] if stream["canaries"]]
    assert logged and {stream["stream"] for stream in logged} == {"stderr"}
    assert {"prompt", "document base64", "document text"} <= {name for stream in logged for name in stream["canaries"]}
    assert "VIOLATION" in summary


def test_audit_runs_the_whole_stack_in_a_loopback_only_namespace_and_catches_plaintext_hops(
    demo_model_dir: Path, credentials: Credentials, tmp_path: Path,
) -> None:
    """The audit's own stack (`airlock up`), traced from its first instruction, inside `unshare --net`: nothing
    leaks to files, logs or the outside, but its gateway speaks plain HTTP and its engine plain HTTP over TCP
    (a planted plaintext hop): the wire capture reports the canary on both hops, the credential on the first."""
    assert os.geteuid() == 0, "unshare --net needs root here; this test must not be skipped silently"
    engine_port = free_port()
    config = write_config(tmp_path / "airlock.yaml", {
        "auth": {"htpasswd_file": str(credentials.htpasswd)},
        "engine": {
            "model": "demo", "demo_model_dir": str(demo_model_dir), "cpu_kvcache_gb": 1, "max_model_len": 2048,
            "bind": "tcp", "host": "127.0.0.1", "base_port": engine_port,
        },
    })
    basic = f"alice:{credentials.passwords['alice']}"
    status, report, summary = run_audit("--netns", "--config", str(config), credential=basic)
    assert status == 1, summary
    assert report["netns"] and report["interfaces"] == ["lo"]  # really nothing but loopback in there
    assert report["mode"] == "started"
    assert report["requests"]["answered"] == ROUNDS * (REQUESTS_PER_ROUND - 1)
    # Traced from the start: the engine processes vLLM spawned are among those seen.
    assert report["traced"]["processes_and_threads"] >= 10
    # Only the wire failed: no egress, no lookup, no canary in a file or a log line.
    assert report["verdict"] == "FAILED"
    assert report["violations"] and all(v.startswith("wire: ") for v in report["violations"]), report["violations"]
    wire = report["wire"]
    assert wire["verified"], wire["problems"]
    assert wire["interface"] == "lo" and set(wire["ports"].values()) == {"gateway", "engine"}
    assert str(engine_port) in wire["ports"] and wire["notes"] == []
    assert wire["flows_per_hop"]["gateway"] >= 1 and wire["flows_per_hop"]["engine"] >= 1
    assert wire["encrypted"] == 0 and wire["in_clear"] >= 2 and wire["bytes"] > 0
    found: dict[str, set[str]] = {}
    for finding in wire["findings"]:
        found.setdefault(finding["direction"], set()).update(finding["found"])
    assert {"prompt", "image base64", "credential base64", "document base64"} <= found["client -> gateway"]
    assert {"prompt", "image base64", "document name", "document text"} <= found["gateway -> engine"]
    # The PDF itself never reaches the engine: only its rendered pages and their text do.
    assert not {"document base64", "document pixels"} & found["gateway -> engine"]
    # The gateway does not pass the client's credentials on to the engine.
    assert not any(kind.startswith("credential") for kind in found["gateway -> engine"])
    # Kinds and ports only: neither the secret nor the canary itself is printed.
    assert credentials.passwords["alice"] not in summary + json.dumps(report)
    assert "wire: " in summary and " in clear (0 TLS," in summary


def test_audit_with_tls_on_both_hops_finds_nothing_in_clear(
    demo_model_dir: Path, credentials: Credentials, tmp_path: Path,
) -> None:
    """The deployed shape on one machine: clients reach the gateway over TLS, the gateway reaches its engine over TCP
    with TLS and a client certificate. The same canaries and credential travel, and the wire shows none of them."""
    assert os.geteuid() == 0, "unshare --net needs root here; this test must not be skipped silently"
    import trustme

    engine_ca, gateway_ca = trustme.CA(), trustme.CA()
    files: dict[str, str] = {}

    def write(name: str, blob: trustme.Blob) -> str:
        files[name] = str(tmp_path / name)
        blob.write_to_path(files[name])
        return files[name]

    gateway_cert = gateway_ca.issue_cert("127.0.0.1", "localhost")
    engine_cert = engine_ca.issue_cert("127.0.0.1")
    client_cert = engine_ca.issue_cert("airlock-gateway")
    write("clients-ca.pem", gateway_ca.cert_pem)
    write("engines-ca.pem", engine_ca.cert_pem)
    write("gateway.crt", gateway_cert.cert_chain_pems[0])
    write("gateway.key", gateway_cert.private_key_pem)
    write("engine.crt", engine_cert.cert_chain_pems[0])
    write("engine.key", engine_cert.private_key_pem)
    write("client.crt", client_cert.cert_chain_pems[0])
    write("client.key", client_cert.private_key_pem)
    engine_port = free_port()
    config = write_config(tmp_path / "airlock.yaml", {
        "gateway": {"tls": {"cert_file": files["gateway.crt"], "key_file": files["gateway.key"]}},
        "auth": {"htpasswd_file": str(credentials.htpasswd)},
        "engine": {
            "model": "demo", "demo_model_dir": str(demo_model_dir), "cpu_kvcache_gb": 1, "max_model_len": 2048,
            "bind": "tcp", "host": "127.0.0.1", "base_port": engine_port,
            "tls": {"cert_file": files["engine.crt"], "key_file": files["engine.key"],
                    "client_ca_file": files["engines-ca.pem"]},
        },
        "upstream_tls": {"ca_file": files["engines-ca.pem"], "cert_file": files["client.crt"],
                         "key_file": files["client.key"]},
    })
    basic = f"alice:{credentials.passwords['alice']}"
    status, report, summary = run_audit("--netns", "--config", str(config), "--ca-file", files["clients-ca.pem"],
                                        credential=basic)
    assert status == 0, summary
    assert report["verdict"] == "PASSED" and report["violations"] == []
    assert report["requests"]["answered"] == ROUNDS * (REQUESTS_PER_ROUND - 1)
    wire = report["wire"]
    assert wire["verified"], wire["problems"]
    assert set(wire["ports"].values()) == {"gateway", "engine"}
    assert wire["flows_per_hop"]["gateway"] >= 1 and wire["flows_per_hop"]["engine"] >= 1
    assert wire["in_clear"] == 0 and wire["findings"] == [] and wire["plaintext_without_findings"] == 0
    # Every connection that carried bytes was TLS: the canaries did travel (answered above), encrypted.
    assert wire["encrypted"] >= 2 and wire["encrypted"] + wire["empty"] == wire["flows"]
    assert " 0 in clear (" in summary
    print(next(line for line in summary.splitlines() if line.lstrip().startswith("wire:")))
