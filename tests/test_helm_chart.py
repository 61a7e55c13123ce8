"""The Helm chart, rendered by the real Helm engine (PyPI helm-python-sdk bundles it) for several sets of values:
every manifest validates against the Kubernetes schemas (kubernetes-validate), lint passes, values.schema.json
refuses bad values, and policy holds over what is rendered (restricted security, limits, pinned images, engines
reachable only from the gateway, egress only to configured targets, TLS with client certificates on the engine hop,
an Ingress that never spools a body). The certificates the chart generates are parsed (cryptography) and used for
real TLS handshakes with the gateway's own TLS contexts (server/tls.py)."""

from __future__ import annotations

import base64
import contextlib
import copy
import http.server
import json
import re
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
from helm_python import _native

from server.config import Settings, load_settings

from .conftest import ROOT

CHART = ROOT / "helm" / "airlock"
KUBERNETES = "1.30.0"
RELEASE = "airlock"
# Kinds that are custom resources: no Kubernetes schema to validate them against (checked by hand below).
CUSTOM_KINDS = {"ServiceMonitor", "Certificate", "Issuer"}
IDP_CIDR = "10.20.0.5/32"
PROXY_CIDR = "10.42.0.0/16"
EXISTING_TLS = {"engine": "corp-airlock-engine", "gatewayClient": "corp-airlock-gateway-client",
                "gatewayServer": "corp-airlock-gateway"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "two-replicas-tp2": {"engine": {"replicas": 2, "tensorParallelSize": 2},
                         "gateway": {"autoscaling": {"enabled": True}}},
    "oidc": {"auth": {"apiKeys": {"content": ""}, "oidc": {"issuer": "https://sso.internal.example/realms/staff",
                                                          "audience": "airlock", "caConfigMap": "internal-ca"}},
             "networkPolicy": {"identityProvider": {"cidrs": [IDP_CIDR], "ports": [443]}}},
    "ingress-tls": {"ingress": {"enabled": True, "className": "nginx", "host": "airlock.corp.example",
                                "tls": {"enabled": True, "secretName": "airlock-tls"}},
                    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "existing-secrets": {"auth": {"htpasswd": {"existingSecret": "airlock-users"},
                                  "apiKeys": {"existingSecret": "airlock-keys", "content": ""},
                                  "oidc": {"existingSecret": "airlock-oidc"}},
                         "privacy": {"saltSecret": {"existingSecret": "airlock-salt"}},
                         "engine": {"model": {"existingClaim": "",
                                              "nfs": {"server": "nfs.internal", "path": "/models"}}},
                         "tls": {"source": "existingSecret", "existingSecret": EXISTING_TLS},
                         "imageRegistry": "", "gateway": {"image": {"repository": "registry.corp/airlock/gateway",
                                                                    "digest": "sha256:" + "a" * 64}}},
    "tls-cert-manager": {"tls": {"source": "certManager"}, "engine": {"replicas": 2},
                         "ingress": {"enabled": True, "className": "nginx"}},
    "tls-generated": {"tls": {"source": "generated"}, "engine": {"replicas": 2},
                      "ingress": {"enabled": True, "className": "nginx"},
                      "gateway": {"settings": {"gateway": {"max_body_bytes": 8 * 1024 * 1024 + 512,
                                                           "read_timeout_s": 900.5}}}},
    "tls-terminated-by-proxy": {"tls": {"gateway": {"enabled": False}},
                                "ingress": {"enabled": True, "className": "nginx"},
                                "gateway": {"settings": {"gateway": {"tls_terminated_by_proxy": True,
                                                                     "trusted_proxies": [PROXY_CIDR]}}}},
}


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    def merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) and value else value
        return into
    return merge(copy.deepcopy(helm.Chart.load(CHART).values), overrides)


def render(overrides: dict[str, Any], api_versions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The chart's manifests as Helm renders them offline (``lookup`` finds nothing: a first install).

    ``api_versions`` are the APIs the cluster serves (``.Capabilities.APIVersions``). Chart.render does not pass them
    on, but the SDK's native render call takes them (helm-python-sdk 0.2.2: its RenderOptions has ``api_versions``),
    so that call is used directly; it is the same Helm engine."""
    options = {"name": RELEASE, "namespace": "airlock", "is_install": True, "api_versions": list(api_versions)}
    chart = helm.Chart.load(CHART)
    rendered: dict[str, str] = json.loads(_native.call_string(
        "helm_render", chart._raw(), json.dumps(overrides), json.dumps(options)))
    return [document for name, text in rendered.items() if name.endswith(".yaml")
            for document in yaml.safe_load_all(text) if document]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def manifests(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUE_SETS[request.param])


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def pod_specs(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [document["spec"]["template"]["spec"] for document in of_kind(documents, "Deployment")]


def test_every_manifest_validates_against_the_kubernetes_schemas(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = manifests
    kinds = {document["kind"] for document in documents}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy"} <= kinds or "existing" in manifests[0]
    for document in documents:
        if document["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_lint_passes_for_every_value_set(tmp_path: Path) -> None:
    for name, overrides in VALUE_SETS.items():
        values = tmp_path / f"{name}.yaml"
        values.write_text(yaml.safe_dump(merged(overrides)))
        report = helm.lint(CHART, merged(overrides), strict=True, kube_version=f"v{KUBERNETES}")
        problems = [message for message in report["messages"] if message["severity"] >= 2] + report["errors"]
        assert not problems, (name, problems)


def test_the_ci_value_files_are_the_tested_sets() -> None:
    files = {path.stem.removesuffix("-values"): yaml.safe_load(path.read_text()) or {}
             for path in (CHART / "ci").glob("*-values.yaml")}
    assert files == VALUE_SETS


def test_every_container_runs_restricted_with_limits_and_pinned_images(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    _, documents = manifests
    specs = pod_specs(documents)
    assert len(specs) >= 2
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
            assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert not security["capabilities"].get("add")
            assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
            image = container["image"]
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"))
            assert container["imagePullPolicy"] == "IfNotPresent"
        # Writable paths are memory only.
        for volume in spec["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]


def test_engines_get_gpus_a_read_only_model_and_memory_backed_shm(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = manifests
    overrides = VALUE_SETS[name].get("engine", {})
    replicas, tensor_parallel = overrides.get("replicas", 1), overrides.get("tensorParallelSize", 1)
    engines = [d for d in of_kind(documents, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"]
               == "engine"]
    assert len(engines) == replicas
    for engine in engines:
        spec = engine["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == tensor_parallel
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        model = volumes["models"]
        assert model.get("persistentVolumeClaim", {}).get("readOnly") or model.get("nfs", {}).get("readOnly")
    # The engines' settings: the chart's choices, valid Airlock settings, tensor parallel as asked.
    config = next(c for c in of_kind(documents, "ConfigMap") if c["metadata"]["name"].endswith("-engine"))
    engine_settings = Settings(**yaml.safe_load(config["data"]["airlock.yaml"])).engine
    assert engine_settings.tensor_parallel_size == tensor_parallel and engine_settings.bind == "tcp"
    assert engine_settings.verify_model == "require"
    services = [s for s in of_kind(documents, "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"]
                == "engine"]
    assert len(services) == replicas and all(s["spec"]["type"] == "ClusterIP" for s in services)


def test_the_gateway_settings_are_valid_and_name_every_engine(
    manifests: tuple[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Read as the gateway reads them: its airlock.yaml under the environment its Deployment sets.
    name, documents = manifests
    config = next(c for c in of_kind(documents, "ConfigMap") if c["metadata"]["name"].endswith("-gateway"))
    (gateway,) = [d for d in of_kind(documents, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-gateway"]
    for variable in gateway["spec"]["template"]["spec"]["containers"][0]["env"]:
        monkeypatch.setenv(variable["name"], variable.get("value", f"https://from-a-secret.example/{variable['name']}"))
    path = tmp_path / "airlock.yaml"
    path.write_text(config["data"]["airlock.yaml"])
    settings = load_settings(path)
    replicas = VALUE_SETS[name].get("engine", {}).get("replicas", 1)
    assert [u.url for u in settings.upstreams] == [f"https://{RELEASE}-engine-{i}:8100" for i in range(replicas)]
    assert settings.metrics.listener == "separate" and settings.log_format == "json"
    assert settings.privacy.salt_secret_file is not None
    # The engines are verified against the engine CA and the gateway presents its client certificate.
    assert settings.upstream_tls.ca_file == Path("/etc/airlock/tls/upstream/ca.crt")
    assert settings.upstream_tls.cert_file == Path("/etc/airlock/tls/upstream/tls.crt")
    assert settings.upstream_tls.key_file == Path("/etc/airlock/tls/upstream/tls.key")
    # Its own listener is TLS, unless a proxy in front terminates it (and is named).
    if name == "tls-terminated-by-proxy":
        assert settings.gateway.tls.cert_file is None and settings.gateway.tls_terminated_by_proxy
        assert settings.gateway.trusted_proxies == [PROXY_CIDR]
    else:
        assert settings.gateway.tls.cert_file == Path("/etc/airlock/tls/server/tls.crt")
        assert settings.gateway.tls.key_file == Path("/etc/airlock/tls/server/tls.key")


def test_engines_are_reachable_only_from_the_gateway_and_reach_nothing(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    _, documents = manifests
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(documents, "NetworkPolicy")}
    engine = policies[f"{RELEASE}-engine"]
    assert engine["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert set(engine["policyTypes"]) == {"Ingress", "Egress"} and engine["egress"] == []
    (rule,) = engine["ingress"]
    (peer,) = rule["from"]
    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "airlock",
                                                    "app.kubernetes.io/instance": RELEASE,
                                                    "app.kubernetes.io/component": "gateway"}}}


def test_the_gateway_egress_goes_only_to_engines_dns_and_the_configured_provider(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    name, documents = manifests
    gateway = {p["metadata"]["name"]: p["spec"] for p in of_kind(documents, "NetworkPolicy")}[f"{RELEASE}-gateway"]
    assert set(gateway["policyTypes"]) == {"Ingress", "Egress"}
    blocks: list[str] = []
    for rule in gateway["egress"]:
        assert rule.get("to"), "an egress rule without 'to' allows every destination"
        for peer in rule["to"]:
            if "ipBlock" in peer:
                blocks.append(peer["ipBlock"]["cidr"])
                assert not peer["ipBlock"].get("except")
            elif "namespaceSelector" in peer:
                assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                assert {port["port"] for port in rule["ports"]} == {53}
            else:
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert blocks == ([IDP_CIDR] if name == "oidc" else [])
    # Metrics only from the monitoring namespace by default.
    metrics_rule = next(rule for rule in gateway["ingress"] if rule["ports"][0]["port"] == 9464)
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                                          "monitoring"}}}]


def test_secrets_come_from_existing_ones_when_named(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = manifests
    made = {secret["metadata"]["name"] for secret in of_kind(documents, "Secret")}
    issued = {c["spec"]["secretName"] for c in of_kind(documents, "Certificate")}
    used: set[str] = set()
    for spec in pod_specs(documents):
        used |= {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    (gateway,) = [d for d in of_kind(documents, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-gateway"]
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    if name == "existing-secrets":
        assert made == set() and issued == set()
        assert used == {"airlock-users", "airlock-keys", "airlock-salt", *EXISTING_TLS.values()}
        assert env["AIRLOCK_AUTH__OIDC__ISSUER"]["valueFrom"]["secretKeyRef"] == {"name": "airlock-oidc",
                                                                                 "key": "issuer"}
    else:
        assert f"{RELEASE}-salt" in made and f"{RELEASE}-salt" in used
        assert used <= made | issued
        assert not made & issued, "a Secret both made by the chart and issued by cert-manager"


def test_ingress_terminates_tls_and_a_service_monitor_scrapes_metrics() -> None:
    documents = render(VALUE_SETS["ingress-tls"])
    (ingress,) = of_kind(documents, "Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["airlock.corp.example"], "secretName": "airlock-tls"}]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (monitor,) = of_kind(documents, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert not of_kind(render({}), "Ingress") and not of_kind(render({}), "ServiceMonitor")


@pytest.mark.parametrize(("overrides", "where"), [
    ({"gateway": {"image": {"tag": "latest"}}}, "tag"),
    ({"engine": {"image": {"pullPolicy": "Always"}}}, "pullPolicy"),
    ({"engine": {"tensorParallelSize": 3}}, "tensorParallelSize"),
    ({"engine": {"replicas": 0}}, "replicas"),
    ({"engine": {"model": {"profile": "some-model-from-the-internet"}}}, "profile"),
    ({"gateway": {"resources": {"limits": {"memory": "plenty"}}}}, "memory"),
    ({"networkPolicy": {"enabled": "yes"}}, "enabled"),
    ({"gateway": {"hostNetwork": True}}, "hostNetwork"),
    ({"engine": {"image": {"digest": "md5:abc"}}}, "digest"),
    ({"tls": {"source": "selfSigned"}}, "source"),
    # The engine hop has no off switch: Airlock refuses engines on the pod network without TLS.
    ({"tls": {"engine": {"enabled": False}}}, "engine"),
    ({"tls": {"gateway": {"enabled": "no"}}}, "enabled"),
    ({"tls": {"generated": {"validityDays": 0}}}, "validityDays"),
    ({"tls": {"certManager": {"issuerRef": {"name": "corp-ca", "kind": "Vault"}}}}, "kind"),
])
def test_the_values_schema_refuses_bad_values(overrides: dict[str, Any], where: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError) as refused:
        chart.validate_schema(merged(overrides))
    assert where in str(refused.value)


def test_templates_refuse_what_the_schema_cannot_see() -> None:
    for overrides, message in [
        ({"auth": {"apiKeys": {"content": ""}}}, "configure at least one sign-in method"),
        ({"engine": {"model": {"existingClaim": ""}}}, "exactly one of existingClaim"),
        ({"engine": {"model": {"existingClaim": "", "nfs": {"server": "nfs.internal", "path": ""}}}},
         "nfs.path is required"),
    ]:
        with pytest.raises(helm.HelmError) as refused:
            helm.Chart.load(CHART).render(overrides, name=RELEASE, namespace="airlock")
        assert message in str(refused.value)


def test_the_readme_kubernetes_section_matches_the_chart() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### 3b. Kubernetes (Helm)"):readme.index("## Configuration")]
    (example,) = [block for block in re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
                  if "# airlock-values.yaml" in block]
    values = yaml.safe_load(example)
    helm.Chart.load(CHART).validate_schema(merged(values))
    assert of_kind(render(values), "Ingress")
    defaults = helm.Chart.load(CHART).values
    named = re.findall(r"`([a-z][A-Za-z]*(?:\.[A-Za-z]+)+)`", section)
    checked = 0
    for path in named:
        node: Any = defaults
        # Not chart values: the file names in a TLS Secret, and Airlock settings under the free-form gateway.settings.
        if path.split(".")[0] not in defaults or path in {"tls.crt", "tls.key"} or path.startswith("gateway.settings."):
            continue
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"the README names {path}, which the chart lacks"
            node = node[part]
        checked += 1
    assert checked >= 20


# --- TLS inside the cluster and an Ingress that never spools ------------------------------------------------------


def named(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (document,) = [d for d in of_kind(documents, kind) if d["metadata"]["name"] == name]
    return document


def engine_settings_of(documents: list[dict[str, Any]]) -> Settings:
    config = named(documents, "ConfigMap", f"{RELEASE}-engine")
    return Settings(**yaml.safe_load(config["data"]["airlock.yaml"]))


def gateway_settings_of(documents: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(named(documents, "ConfigMap", f"{RELEASE}-gateway")["data"]["airlock.yaml"])
    return config


def secret_volume(spec: dict[str, Any], mount_path: str) -> dict[str, Any]:
    """The Secret volume mounted at ``mount_path`` in the pod's only container."""
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    assert mount["readOnly"] is True and "subPath" not in mount, "renewed files only appear in a whole-Secret mount"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret: dict[str, Any] = volume["secret"]
    # Readable by the non-root user through fsGroup, by nobody else.
    assert secret["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
    return secret


def with_ingress(name: str) -> dict[str, Any]:
    overrides = copy.deepcopy(VALUE_SETS[name])
    overrides.setdefault("ingress", {})["enabled"] = True
    return overrides


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_ingress_never_spools_and_mirrors_the_gateways_limits(name: str) -> None:
    documents = render(with_ingress(name))
    annotations = named(documents, "Ingress", f"{RELEASE}-gateway")["metadata"]["annotations"]
    nginx = "nginx.ingress.kubernetes.io/"
    # Request bodies (images) stream through instead of landing on the controller's disk; answers are not buffered.
    assert annotations[nginx + "proxy-request-buffering"] == "off"
    assert annotations[nginx + "proxy-buffering"] == "off"
    limits = VALUE_SETS[name].get("gateway", {}).get("settings", {}).get("gateway", {})
    body = limits.get("max_body_bytes", 32 * 1024 * 1024)
    assert annotations[nginx + "proxy-body-size"] == (f"{body // 2**20}m" if body % 2**20 == 0 else str(body))
    timeout = str(-(-limits.get("read_timeout_s", 600) // 1)).removesuffix(".0")
    assert annotations[nginx + "proxy-read-timeout"] == annotations[nginx + "proxy-send-timeout"] == timeout
    service = named(documents, "Service", f"{RELEASE}-gateway")
    (backend_port,) = [p for p in service["spec"]["ports"] if p["port"] == 8000]
    rule = named(documents, "Ingress", f"{RELEASE}-gateway")["spec"]["rules"][0]["http"]["paths"][0]
    assert rule["backend"]["service"]["port"] == {"name": backend_port["name"]}
    if name == "tls-terminated-by-proxy":
        assert nginx + "backend-protocol" not in annotations and backend_port["name"] == "http"
    else:
        # HTTPS to the gateway, its certificate verified against the gateway CA under its Service name.
        assert annotations[nginx + "backend-protocol"] == "HTTPS" and backend_port["name"] == "https"
        assert annotations[nginx + "proxy-ssl-verify"] == "on"
        secret = EXISTING_TLS["gatewayServer"] if name == "existing-secrets" else f"{RELEASE}-gateway-tls"
        assert annotations[nginx + "proxy-ssl-secret"] == f"airlock/{secret}"
        assert annotations[nginx + "proxy-ssl-name"] == f"{RELEASE}-gateway.airlock.svc"


@pytest.mark.parametrize(("annotation", "value", "message"), [
    ("proxy-request-buffering", "on", "controller's disk"),
    ("proxy-buffering", "on", "never"),
    ("proxy-body-size", "1g", "gateway.settings.gateway.max_body_bytes"),
    ("proxy-read-timeout", "60", "gateway.settings.gateway.read_timeout_s"),
    ("backend-protocol", "HTTP", "tls.gateway.enabled"),
])
def test_the_ingress_refuses_annotations_that_would_spool_or_contradict_the_gateway(
    annotation: str, value: str, message: str,
) -> None:
    overrides = {"ingress": {"enabled": True, "annotations": {f"nginx.ingress.kubernetes.io/{annotation}": value}}}
    with pytest.raises(helm.HelmError) as refused:
        helm.Chart.load(CHART).render(overrides, name=RELEASE, namespace="airlock")
    assert annotation in str(refused.value) and message in str(refused.value)


def test_engines_require_client_certificates_by_default(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = manifests
    engine = engine_settings_of(documents).engine
    assert engine.bind == "tcp" and engine.host == "0.0.0.0"
    assert engine.tls.cert_file == Path("/etc/airlock/tls/tls.crt")
    assert engine.tls.key_file == Path("/etc/airlock/tls/tls.key")
    assert engine.tls.client_ca_file == Path("/etc/airlock/tls/ca.crt")
    for deployment in of_kind(documents, "Deployment"):
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] != "engine":
            continue
        spec = deployment["spec"]["template"]["spec"]
        secret = secret_volume(spec, "/etc/airlock/tls")
        assert {item["path"] for item in secret["items"]} == {"tls.crt", "tls.key", "ca.crt"}
        index = int(deployment["metadata"]["labels"]["airlock.dev/replica"])
        expected = EXISTING_TLS["engine"] if name == "existing-secrets" else f"{RELEASE}-engine-{index}-tls"
        assert secret["secretName"] == expected
        # The kubelet's probes carry no client certificate: the probe runs in the pod and presents the engine's.
        (container,) = spec["containers"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"] == ["python3", "/etc/airlock/health-probe.py"]
        assert "checksum/tls" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_the_gateway_mounts_its_certificates_and_is_probed_over_https(
    manifests: tuple[str, list[dict[str, Any]]],
) -> None:
    name, documents = manifests
    gateway = named(documents, "Deployment", f"{RELEASE}-gateway")
    spec = gateway["spec"]["template"]["spec"]
    client = secret_volume(spec, "/etc/airlock/tls/upstream")
    existing = name == "existing-secrets"
    assert client["secretName"] == (EXISTING_TLS["gatewayClient"] if existing else f"{RELEASE}-gateway-client-tls")
    (container,) = spec["containers"]
    schemes = {container[probe]["httpGet"]["scheme"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    if name == "tls-terminated-by-proxy":
        assert schemes == {"HTTP"}
        assert not [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/airlock/tls/server"]
    else:
        assert schemes == {"HTTPS"}
        server = secret_volume(spec, "/etc/airlock/tls/server")
        assert server["secretName"] == (EXISTING_TLS["gatewayServer"] if existing else f"{RELEASE}-gateway-tls")


def test_gateway_tls_goes_off_only_when_a_named_proxy_terminates_it() -> None:
    for settings in [{}, {"tls_terminated_by_proxy": True}, {"trusted_proxies": [PROXY_CIDR]}]:
        overrides = {"tls": {"gateway": {"enabled": False}}, "gateway": {"settings": {"gateway": settings}}}
        with pytest.raises(helm.HelmError) as refused:
            helm.Chart.load(CHART).render(overrides, name=RELEASE, namespace="airlock")
        assert "tls_terminated_by_proxy" in str(refused.value) and "trusted_proxies" in str(refused.value)


def test_existing_secret_mode_names_each_secret_it_needs() -> None:
    given = {"engine": "e", "gatewayClient": "c", "gatewayServer": "s"}
    for missing in given:
        secrets = {key: value for key, value in given.items() if key != missing}
        with pytest.raises(helm.HelmError) as refused:
            helm.Chart.load(CHART).render({"tls": {"source": "existingSecret", "existingSecret": secrets}},
                                          name=RELEASE, namespace="airlock")
        assert f"tls.existingSecret.{missing}" in str(refused.value)


def test_cert_manager_objects_render_when_the_cluster_has_cert_manager() -> None:
    with_api = render({"engine": {"replicas": 2}}, api_versions=("cert-manager.io/v1",))
    without = render({"engine": {"replicas": 2}})
    assert not of_kind(without, "Certificate") and not of_kind(without, "Issuer")
    assert {s["metadata"]["name"] for s in of_kind(without, "Secret") if s["type"] == "kubernetes.io/tls"} == {
        f"{RELEASE}-{n}" for n in ("engine-ca", "gateway-ca", "engine-0-tls", "engine-1-tls", "gateway-client-tls",
                                   "gateway-tls")}
    assert not [s for s in of_kind(with_api, "Secret") if s["type"] == "kubernetes.io/tls"]
    assert cert_manager_chain(with_api) == cert_manager_chain(render({"engine": {"replicas": 2},
                                                                      "tls": {"source": "certManager"}}))


def cert_manager_chain(documents: list[dict[str, Any]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each issued Secret -> (its CA's name, its usages), checked to lead to a self-signed CA of this release."""
    issuers = {i["metadata"]["name"]: i["spec"] for i in of_kind(documents, "Issuer")}
    certificates = {c["metadata"]["name"]: c["spec"] for c in of_kind(documents, "Certificate")}
    chain: dict[str, tuple[str, tuple[str, ...]]] = {}
    for spec in certificates.values():
        if spec.get("isCA"):
            assert issuers[spec["issuerRef"]["name"]] == {"selfSigned": {}}
            continue
        ca_secret = issuers[spec["issuerRef"]["name"]]["ca"]["secretName"]
        (ca,) = [c for c in certificates.values() if c["secretName"] == ca_secret]
        assert ca["isCA"] is True
        chain[spec["secretName"]] = (ca_secret, tuple(spec["usages"]))
    return chain


def test_cert_manager_issues_each_certificate_from_the_ca_of_its_hop() -> None:
    documents = render(VALUE_SETS["tls-cert-manager"])
    chain = cert_manager_chain(documents)
    engine_ca, gateway_ca = f"{RELEASE}-engine-ca", f"{RELEASE}-gateway-ca"
    assert chain == {
        f"{RELEASE}-engine-0-tls": (engine_ca, ("server auth", "client auth")),
        f"{RELEASE}-engine-1-tls": (engine_ca, ("server auth", "client auth")),
        # The only client certificate outside the engine pods; the gateway's server certificate comes from another
        # CA, so the Ingress controller (which reads it) cannot reach an engine with it.
        f"{RELEASE}-gateway-client-tls": (engine_ca, ("client auth",)),
        f"{RELEASE}-gateway-tls": (gateway_ca, ("server auth",)),
    }
    certificates = {c["spec"]["secretName"]: c["spec"] for c in of_kind(documents, "Certificate")}
    gateway = gateway_settings_of(documents)
    for upstream in gateway["upstreams"]:
        host = upstream["url"].removeprefix("https://").rsplit(":", 1)[0]
        assert host in certificates[f"{host}-tls"]["dnsNames"]
    assert f"{RELEASE}-gateway.airlock.svc" in certificates[f"{RELEASE}-gateway-tls"]["dnsNames"]


def test_cert_manager_with_your_own_issuer_makes_no_ca() -> None:
    issuer = {"name": "airlock-internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    documents = render({"tls": {"source": "certManager", "certManager": {"issuerRef": issuer}}})
    assert not of_kind(documents, "Issuer")
    certificates = of_kind(documents, "Certificate")
    assert len(certificates) == 3 and all(c["spec"]["issuerRef"] == issuer for c in certificates)


def test_checksums_follow_the_certificates_a_pod_mounts() -> None:
    def checksums(overrides: dict[str, Any]) -> dict[str, str]:
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
                for d in of_kind(render(overrides), "Deployment")}
    cert_manager = {"tls": {"source": "certManager"}}
    assert checksums(cert_manager) == checksums(cert_manager)
    other_domain = checksums({"tls": {"source": "certManager", "clusterDomain": "corp.internal"}})
    assert all(other_domain[name] != value for name, value in checksums(cert_manager).items())
    # Generated certificates are new on a first install, and every pod's checksum says so.
    first, second = checksums({}), checksums({})
    assert all(first[name] != second[name] for name in first)


# --- the certificates the chart generates, parsed and used ------------------------------------------------------


def generated_files(documents: list[dict[str, Any]], directory: Path) -> dict[str, dict[str, Path]]:
    """Each generated Secret's files, written as the pods would see them."""
    files: dict[str, dict[str, Path]] = {}
    for secret in of_kind(documents, "Secret"):
        if secret["type"] != "kubernetes.io/tls":
            continue
        name = secret["metadata"]["name"]
        (directory / name).mkdir()
        files[name] = {}
        for key, value in secret["data"].items():
            path = directory / name / key
            path.write_bytes(base64.b64decode(value))
            files[name][key] = path
    return files


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def https_health_server(context: ssl.SSLContext) -> Iterator[int]:
    """A small real HTTPS server (stdlib) answering GET /health, behind the given TLS context: stands in for vLLM's
    listener, which a certificate test does not need to load a model for."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def status_of(context: ssl.SSLContext, port: int, server_name: str) -> int:
    """GET /health over TLS to 127.0.0.1, verifying the server as ``server_name``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        tls.sendall(f"GET /health HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    if match is None:
        raise ConnectionError("the server closed the connection without an answer")
    return int(match.group(1))


def test_generated_certificates_carry_the_upstream_names_and_chain_to_their_ca(tmp_path: Path) -> None:
    from cryptography import x509

    documents = render(VALUE_SETS["tls-generated"])
    files = generated_files(documents, tmp_path)

    def load(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    def names(certificate: x509.Certificate) -> list[str]:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)

    engine_ca = load(files[f"{RELEASE}-engine-ca"]["tls.crt"])
    gateway_ca = load(files[f"{RELEASE}-gateway-ca"]["tls.crt"])
    assert engine_ca.subject != gateway_ca.subject
    for upstream in gateway_settings_of(documents)["upstreams"]:
        host = upstream["url"].removeprefix("https://").rsplit(":", 1)[0]
        secret = files[f"{host}-tls"]
        certificate = load(secret["tls.crt"])
        assert host in names(certificate) and f"{host}.airlock.svc.cluster.local" in names(certificate)
        certificate.verify_directly_issued_by(engine_ca)
        assert load(secret["ca.crt"]) == engine_ca
    client = files[f"{RELEASE}-gateway-client-tls"]
    load(client["tls.crt"]).verify_directly_issued_by(engine_ca)
    assert load(client["ca.crt"]) == engine_ca
    server = files[f"{RELEASE}-gateway-tls"]
    load(server["tls.crt"]).verify_directly_issued_by(gateway_ca)
    assert f"{RELEASE}-gateway.airlock.svc" in names(load(server["tls.crt"]))
    with pytest.raises(ValueError):
        load(server["tls.crt"]).verify_directly_issued_by(engine_ca)


def test_generated_certificates_let_only_the_gateway_into_an_engine(tmp_path: Path) -> None:
    """Real handshakes with the contexts Airlock builds (server/tls.py): the engine's listener as its settings say
    (client_ca_file), the gateway's client as upstream_tls says, and the engine's probe script as shipped."""
    import subprocess
    import sys

    from server.tls import CertificateFiles, client_context, server_context

    documents = render(VALUE_SETS["tls-generated"])
    files = generated_files(documents, tmp_path)
    engine, client, gateway = (files[f"{RELEASE}-{n}"] for n in ("engine-0-tls", "gateway-client-tls", "gateway-tls"))
    listener = server_context(CertificateFiles(engine["tls.crt"], engine["tls.key"]), client_ca_file=engine["ca.crt"])
    with https_health_server(listener) as port:
        as_gateway = client_context(client["ca.crt"], CertificateFiles(client["tls.crt"], client["tls.key"]))
        assert status_of(as_gateway, port, f"{RELEASE}-engine-0") == 200
        # Without a client certificate, or with the gateway's server certificate (which the Ingress controller
        # reads), the engine refuses the handshake.
        for certificate in (None, CertificateFiles(gateway["tls.crt"], gateway["tls.key"])):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                status_of(client_context(client["ca.crt"], certificate), port, f"{RELEASE}-engine-0")
        # The engine's certificate does not answer to another engine's name.
        with pytest.raises(ssl.SSLCertVerificationError):
            status_of(as_gateway, port, f"{RELEASE}-engine-1")
        # The probe the kubelet runs in the engine pod, as the chart ships it (paths and port moved to this test).
        config = named(documents, "ConfigMap", f"{RELEASE}-engine")["data"]
        probe = config["health-probe.py"].replace("/etc/airlock/tls/", f"{engine['tls.crt'].parent}/")
        probe = probe.replace(", 8100,", f", {port},")
        assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0
        probe = probe.replace(f"{engine['tls.crt'].parent}/", f"{gateway['tls.crt'].parent}/")
        assert subprocess.run([sys.executable, "-c", probe], timeout=30, capture_output=True).returncode != 0
    # The gateway's listener, verified as the Ingress does (gateway CA, Service name).
    listener = server_context(CertificateFiles(gateway["tls.crt"], gateway["tls.key"]))
    with https_health_server(listener) as port:
        assert status_of(client_context(gateway["ca.crt"]), port, f"{RELEASE}-gateway.airlock.svc") == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            status_of(client_context(engine["ca.crt"]), port, f"{RELEASE}-gateway.airlock.svc")
