"""The limits server in the Helm chart (sharedLimits): one `airlock limits-server` pod that every gateway pod consults,
so that a user's own limits hold for the whole gateway Deployment. Rendered by the real Helm engine (as in
test_helm_chart.py): the pod and its Service, the settings both sides read (with Airlock's own loader and CLI), the
limits hop's certificate in each tls.source mode (generated ones used in real TLS handshakes with Airlock's contexts,
server/tls.py, which both sides of the hop build), and the network policies around it."""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from server.cli import main as airlock
from server.config import Settings, load_settings

from .pss import restricted_violations
from .test_helm_chart import (
    CHART,
    EXISTING_TLS,
    KUBERNETES,
    LIMITS_EXTENSIBLE,
    RELEASE,
    gateway_settings_of,
    manifests,
    merged,
    named,
    of_kind,
    render,
    secret_volume,
)
from .test_helm_extensible import POD_VALUES, refused
from .test_helm_tls import Cluster, cert_manager_chain, generated_files, pod_checksums, remade

__all__ = ["manifests"]  # the parametrized fixture, shared with test_helm_chart.py

LIMITS = f"{RELEASE}-limits"
URL_HOST = f"{LIMITS}.airlock.svc.cluster.local"
OFF: dict[str, Any] = {"sharedLimits": {"enabled": False}}


def limits_pod(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = named(documents, "Deployment", LIMITS)["spec"]["template"]["spec"]
    return spec


def gateway_pod(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = named(documents, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    return spec


def test_the_limits_server_runs_by_default_alone_restricted_and_probed_without_tls() -> None:
    documents = render({})
    deployment = named(documents, "Deployment", LIMITS)
    # One server, never two at once (each would count part of a user's requests).
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "limits"
    template = deployment["spec"]["template"]
    assert {"checksum/config", "checksum/tls"} <= template["metadata"]["annotations"].keys()
    spec = template["spec"]
    assert restricted_violations(template["metadata"], spec, KUBERNETES.rsplit(".", 1)[0]) == []
    assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == LIMITS
    (container,) = spec["containers"]
    assert container["args"] == ["limits-server", "--config", "/etc/airlock/airlock.yaml", "--host", "0.0.0.0"]
    # The gateway's image has the command.
    assert container["image"] == gateway_pod(documents)["containers"][0]["image"]
    assert container["ports"] == [{"name": "limits", "containerPort": 9470, "protocol": "TCP"}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    # No HTTP on this port: the kubelet only connects (a bare TCP connection, which the server closes quietly).
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "limits"}
    service = named(documents, "Service", LIMITS)["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [{"name": "limits", "port": 9470, "targetPort": "limits", "protocol": "TCP"}]
    assert service["selector"]["app.kubernetes.io/component"] == "limits"
    assert named(documents, "ServiceAccount", LIMITS)["automountServiceAccountToken"] is False


def test_the_limits_pod_mounts_the_gateways_settings_and_its_certificate_only() -> None:
    """Not the salt: users reach the server as pseudonyms keyed with it, which it should not turn back into names.
    No credentials (htpasswd, API keys) and not the gateway's certificates either."""
    spec = limits_pod(render({}))
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes.keys() == {"config", "tls-limits"}
    assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-gateway"
    secret = secret_volume(spec, "/etc/airlock/tls/limits")
    assert secret["secretName"] == f"{LIMITS}-tls"
    assert {item["path"] for item in secret["items"]} == {"tls.crt", "tls.key", "ca.crt"}


def test_disabled_renders_no_limits_server_and_the_gateways_count_alone() -> None:
    documents = render(OFF)
    assert not [d for d in documents if "limits" in d["metadata"]["name"]]
    assert not [d for d in documents if d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                == "limits"]
    assert "shared_limits" not in gateway_settings_of(documents)["admission"]
    assert "tls-limits" not in {volume["name"] for volume in gateway_pod(documents)["volumes"]}
    egress = named(documents, "NetworkPolicy", f"{RELEASE}-gateway")["spec"]["egress"]
    assert not [rule for rule in egress if "9470" in str(rule)]
    # Nor is its Secret asked for when the certificates are the user's own.
    secrets = {key: value for key, value in EXISTING_TLS.items() if key != "limits"}
    existing = render({**OFF, "tls": {"source": "existingSecret", "existingSecret": secrets}})
    assert not [d for d in existing if "limits" in d["metadata"]["name"]]


def test_both_pods_read_valid_settings_naming_the_limits_service(
    manifests: tuple[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The gateways' airlock.yaml as the limits pod reads it: `airlock config --config` under its environment (an
    OIDC-only gateway has its issuer from the environment, which the limits pod needs too, or no sign-in method is
    left and the settings are refused). Every file of admission.shared_limits is in a Secret both pods mount."""
    name, documents = manifests
    config = named(documents, "ConfigMap", f"{RELEASE}-gateway")["data"]["airlock.yaml"]
    path = tmp_path / "airlock.yaml"
    path.write_text(config)
    (container,) = limits_pod(documents)["containers"]
    for variable in container.get("env", []):
        monkeypatch.setenv(variable["name"], variable.get("value", f"https://from-a-secret.example/{variable['name']}"))
    assert airlock(["config", "--config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["admission"]["shared_limits"]["url"] == f"tcp://{URL_HOST}:9470"
    shared = load_settings(path).admission.shared_limits
    assert shared is not None and shared.tcp_address == (URL_HOST, 9470) and shared.tls is not None
    expected = EXISTING_TLS["limits"] if name == "existing-secrets" else f"{LIMITS}-tls"
    for pod in (limits_pod(documents), gateway_pod(documents)):
        for file in (shared.tls.ca_file, shared.tls.cert_file, shared.tls.key_file):
            secret = secret_volume(pod, str(file.parent))
            assert secret["secretName"] == expected and file.name in {item["path"] for item in secret["items"]}
    # The limits server binds the URL's port, the port its Service sends to.
    assert container["ports"][0]["containerPort"] == shared.tcp_address[1]


def test_the_port_follows_the_value_everywhere() -> None:
    documents = render({"sharedLimits": {"port": 7000}})
    assert gateway_settings_of(documents)["admission"]["shared_limits"]["url"] == f"tcp://{URL_HOST}:7000"
    assert named(documents, "Service", LIMITS)["spec"]["ports"][0]["port"] == 7000
    assert limits_pod(documents)["containers"][0]["ports"][0]["containerPort"] == 7000
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(documents, "NetworkPolicy")}
    assert policies[LIMITS]["ingress"][0]["ports"] == [{"port": 7000, "protocol": "TCP"}]
    assert [{"port": 7000, "protocol": "TCP"}] in [rule["ports"] for rule in policies[f"{RELEASE}-gateway"]["egress"]]


def test_only_the_gateways_reach_the_limits_server_and_it_reaches_nothing() -> None:
    documents = render({})
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(documents, "NetworkPolicy")}
    limits = policies[LIMITS]
    own = {"app.kubernetes.io/name": "airlock", "app.kubernetes.io/instance": RELEASE}
    assert limits["podSelector"] == {"matchLabels": {**own, "app.kubernetes.io/component": "limits"}}
    assert set(limits["policyTypes"]) == {"Ingress", "Egress"} and limits["egress"] == []
    assert limits["ingress"] == [{"from": [{"podSelector": {"matchLabels": {**own, "app.kubernetes.io/component":
                                                                            "gateway"}}}],
                                  "ports": [{"port": 9470, "protocol": "TCP"}]}]
    # The gateways' way there; no other policy selects the limits pod (policies add up).
    egress = policies[f"{RELEASE}-gateway"]["egress"]
    assert {"to": [{"podSelector": {"matchLabels": {**own, "app.kubernetes.io/component": "limits"}}}],
            "ports": [{"port": 9470, "protocol": "TCP"}]} in egress
    others = [name for name, spec in policies.items() if name != LIMITS
              and spec["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") in (None, "limits")]
    assert others == []


def test_the_chart_writes_where_the_limits_server_is_and_leaves_the_timeouts_to_the_user() -> None:
    message = refused({"gateway": {"settings": {"admission": {"shared_limits": {"url": "tcp://elsewhere:1"}}}}})
    assert "gateway.settings.admission.shared_limits.url is set by the chart from sharedLimits" in message
    message = refused({"gateway": {"settings": {"admission": {"shared_limits": {"tls": {"ca_file": "/x"}}}}}})
    assert "gateway.settings.admission.shared_limits.tls.ca_file is set by the chart from tls.source" in message
    documents = render({"gateway": {"settings": {"admission": {"shared_limits": {"timeout_s": 0.2},
                                                               "max_concurrent_per_user": 4}}}})
    settings = gateway_settings_of(documents)["admission"]
    assert settings["shared_limits"]["timeout_s"] == 0.2 and settings["max_concurrent_per_user"] == 4
    assert settings["shared_limits"]["url"] == f"tcp://{URL_HOST}:9470"


@pytest.mark.parametrize(("value", "setting", "where"),
                         [v for v in POD_VALUES if v[0] in LIMITS_EXTENSIBLE],
                         ids=[v[0] for v in POD_VALUES if v[0] in LIMITS_EXTENSIBLE])
def test_each_pod_value_lands_in_the_limits_pod(value: str, setting: Any, where: Any) -> None:
    documents = render({"sharedLimits": {value: setting}})
    template = named(documents, "Deployment", LIMITS)["spec"]["template"]
    assert where(template["spec"], template["metadata"]) == setting
    gateway = named(documents, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]
    with contextlib.suppress(KeyError):
        assert where(gateway["spec"], gateway["metadata"]) != setting
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_an_image_and_service_account_of_its_own() -> None:
    documents = render({"sharedLimits": {
        "image": {"repository": "airlock/limits", "tag": "0.2.0", "pullPolicy": "Never"},
        "serviceAccount": {"create": False, "name": "corp-limits", "automountServiceAccountToken": False}}})
    spec = limits_pod(documents)
    assert spec["containers"][0]["image"] == "registry.internal.example/airlock/limits:0.2.0"
    assert spec["containers"][0]["imagePullPolicy"] == "Never"
    assert spec["serviceAccountName"] == "corp-limits"
    assert LIMITS not in {a["metadata"]["name"] for a in of_kind(documents, "ServiceAccount")}
    assert "tags must be pinned" in refused({"sharedLimits": {"image": {"repository": "airlock/limits"}}})


@pytest.mark.parametrize(("overrides", "where"), [
    ({"sharedLimits": {"replicas": 2}}, "replicas"),
    ({"sharedLimits": {"port": 0}}, "port"),
    ({"sharedLimits": {"image": {"tag": "latest"}}}, "tag"),
    ({"sharedLimits": {"runtimeClassName": "nvidia"}}, "runtimeClassName"),
    ({"sharedLimits": {"resources": {"limits": {"memory": "plenty"}}}}, "memory"),
    ({"tls": {"existingSecret": {"limits": "Corp_Limits"}}}, "limits"),
])
def test_the_schema_refuses_bad_shared_limits_values(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmError) as error:
        helm.Chart.load(CHART).validate_schema(merged(overrides))
    assert where in str(error.value)


# --- The limits hop's certificate ---------------------------------------------------------------------------------


def test_existing_secret_mode_mounts_the_named_limits_secret_in_both_pods() -> None:
    message = refused({"tls": {"source": "existingSecret", "existingSecret": {
        key: value for key, value in EXISTING_TLS.items() if key != "limits"}}})
    assert "tls.existingSecret.limits" in message and "sharedLimits.enabled: false" in message
    documents = render({"tls": {"source": "existingSecret", "existingSecret": EXISTING_TLS}})
    for pod in (limits_pod(documents), gateway_pod(documents)):
        assert secret_volume(pod, "/etc/airlock/tls/limits")["secretName"] == EXISTING_TLS["limits"]
    assert not [s for s in of_kind(documents, "Secret") if s["type"] == "kubernetes.io/tls"]


def test_cert_manager_issues_the_limits_certificate_from_a_ca_of_its_own() -> None:
    documents = render({"tls": {"source": "certManager"}})
    chain = cert_manager_chain(documents)
    assert chain[f"{LIMITS}-tls"] == (f"{LIMITS}-ca", ("server auth", "client auth"))
    assert f"{LIMITS}-ca" not in {ca for secret, (ca, _) in chain.items() if secret != f"{LIMITS}-tls"}
    (certificate,) = [c["spec"] for c in of_kind(documents, "Certificate")
                      if c["spec"]["secretName"] == f"{LIMITS}-tls"]
    assert certificate["dnsNames"] == [LIMITS, f"{LIMITS}.airlock", f"{LIMITS}.airlock.svc", URL_HOST]
    # With the user's own issuer, it issues this one too.
    issuer = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    own = render({"tls": {"source": "certManager", "certManager": {"issuerRef": issuer}}})
    (certificate,) = [c["spec"] for c in of_kind(own, "Certificate") if c["spec"]["secretName"] == f"{LIMITS}-tls"]
    assert certificate["issuerRef"] == issuer and certificate["usages"] == ["server auth", "client auth"]


def test_the_generated_limits_certificate_names_the_url_host_and_chains_to_the_limits_ca(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    documents = render({"tls": {"source": "generated"}})
    files = generated_files(documents, tmp_path)

    def load(name: str, key: str = "tls.crt") -> x509.Certificate:
        return x509.load_pem_x509_certificate(files[name][key].read_bytes())

    certificate = load(f"{LIMITS}-tls")
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    shared = load_settings_of(documents).admission.shared_limits
    assert shared is not None and shared.tcp_address is not None
    assert shared.tcp_address[0] in names
    assert set(names) == {LIMITS, f"{LIMITS}.airlock", f"{LIMITS}.airlock.svc", URL_HOST}
    limits_ca = load(f"{LIMITS}-ca")
    certificate.verify_directly_issued_by(limits_ca)
    assert load(f"{LIMITS}-tls", "ca.crt") == limits_ca
    for other in ("engine-ca", "gateway-ca"):
        assert load(f"{RELEASE}-{other}").subject != limits_ca.subject
        with pytest.raises(ValueError):
            certificate.verify_directly_issued_by(load(f"{RELEASE}-{other}"))
    usages = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def load_settings_of(documents: list[dict[str, Any]]) -> Settings:
    """The gateway's settings as Airlock's model builds them (no file it names is read)."""
    return Settings(**gateway_settings_of(documents))


@contextlib.contextmanager
def line_server(context: ssl.SSLContext) -> Iterator[int]:
    """A small real TLS server (stdlib) that answers each line with the same line, behind the given context: stands in
    for an engine's listener (vLLM builds its context from the same files: server_context with the engine CA as
    client_ca_file), to see which client certificates it takes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), raw:
                raw.settimeout(10)
                with context.wrap_socket(raw, server_side=True) as tls:
                    line = tls.recv(4096)
                    tls.sendall(line)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


HELLO = b'{"hello": {}}\n'


def exchange(context: ssl.SSLContext, port: int, server_name: str, line: bytes = HELLO) -> bytes:
    """One line over TLS to 127.0.0.1, verifying the server as ``server_name``; what came back (ConnectionError
    when nothing did)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        tls.sendall(line)
        answer = tls.recv(4096)
    if not answer:
        raise ConnectionError("the server closed the connection without an answer")
    return answer


def test_the_limits_certificate_lets_only_the_gateways_in(tmp_path: Path) -> None:
    """Real handshakes: a real `airlock limits-server`, with the chart's settings for the hop and the generated
    certificate (the pod's mount paths made local), presents the limits certificate and requires a client
    certificate from the limits CA; the gateway's context (server/tls.py) presents the same certificate and verifies
    the server against the limits CA under the URL's host. An engine's certificate, the gateway's upstream client
    certificate or its server certificate gets no answer; the limits certificate gets none from an engine, and the
    limits server is not taken for an engine."""
    from server.tls import CertificateFiles, client_context, server_context

    from .servers import free_port
    from .test_shared_limits import limits_server

    documents = render({"tls": {"source": "generated"}})
    files = generated_files(documents, tmp_path)
    limits, engine, client, gateway = (files[f"{RELEASE}-{n}"] for n in ("limits-tls", "engine-0-tls",
                                                                          "gateway-client-tls", "gateway-tls"))
    shared = load_settings_of(documents).admission.shared_limits
    assert shared is not None and shared.tcp_address is not None
    host = shared.tcp_address[0]

    def pair(secret: dict[str, Path]) -> CertificateFiles:
        return CertificateFiles(secret["tls.crt"], secret["tls.key"])

    port = free_port()
    tls = {name: str(limits[key]) for name, key in (("ca_file", "ca.crt"), ("cert_file", "tls.crt"),
                                                    ("key_file", "tls.key"))}
    assert {Path(path).name for path in tls.values()} == {Path(path).name
                                                          for path in shared.tls.model_dump().values()}  # type: ignore[union-attr]
    config = tmp_path / "limits.yaml"
    config.write_text(yaml.safe_dump({"admission": {"shared_limits": {"url": f"tcp://{host}:{port}", "tls": tls}}}))
    with limits_server(config, tmp_path / "limits.log", "--host", "127.0.0.1"):
        as_gateway = client_context(limits["ca.crt"], pair(limits))
        assert exchange(as_gateway, port, host) == b'{"ready":true}\n'
        for certificate in (None, pair(engine), pair(client), pair(gateway)):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                exchange(client_context(limits["ca.crt"], certificate), port, host)
        # Verified against the engine CA, the limits server is nobody; nor does it answer to an engine's name.
        with pytest.raises(ssl.SSLCertVerificationError):
            exchange(client_context(engine["ca.crt"], pair(client)), port, host)
        with pytest.raises(ssl.SSLCertVerificationError):
            exchange(as_gateway, port, f"{RELEASE}-engine-0")
    # An engine does not take the limits certificate as a client.
    listener = server_context(pair(engine), client_ca_file=engine["ca.crt"])
    with line_server(listener) as port:
        assert exchange(client_context(client["ca.crt"], pair(client)), port, f"{RELEASE}-engine-0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            exchange(client_context(client["ca.crt"], pair(limits)), port, f"{RELEASE}-engine-0")


def test_the_generated_limits_certificate_is_kept_renewed_and_restarts_both_sides(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    first = cluster.helm({})
    assert {f"{LIMITS}-ca", f"{LIMITS}-tls"} <= set(cluster.secrets)
    second = cluster.helm({})
    assert remade(first, second) == set() and pod_checksums(first) == pod_checksums(second)
    cluster.expire(f"{LIMITS}-tls", 29)
    third = cluster.helm({})
    assert remade(second, third) == {f"{LIMITS}-tls"}
    changed = {name for name, value in pod_checksums(third).items() if pod_checksums(second)[name] != value}
    assert changed == {LIMITS, f"{RELEASE}-gateway"}
    # A limits CA near its end is made again with its certificate, and nothing of the other hops.
    cluster.expire(f"{LIMITS}-ca", 854)
    assert remade(third, cluster.helm({})) == {f"{LIMITS}-ca", f"{LIMITS}-tls"}
    assert f"  {LIMITS}-tls: " in cluster.notes and f"tcp://{URL_HOST}:9470" in cluster.notes
    assert base64.b64decode(cluster.secrets[f"{LIMITS}-tls"]["data"]["ca.crt"]) == base64.b64decode(
        cluster.secrets[f"{LIMITS}-ca"]["data"]["tls.crt"])
