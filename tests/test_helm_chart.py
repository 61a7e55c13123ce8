"""The Helm chart, rendered by the real Helm engine (PyPI helm-python-sdk bundles it) for several sets of values:
every manifest validates against the Kubernetes schemas (kubernetes-validate), lint passes, values.schema.json
refuses bad values, and policy holds over what is rendered (restricted security, limits, pinned images, engines
reachable only from the gateway, egress only to configured targets, an Ingress that never spools a body and outlasts
the gateway's longest silence). TLS inside the cluster is tested in test_helm_tls.py, with the helpers here."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from server.config import AdmissionSettings, EngineSettings, GatewaySettings, Settings, load_settings
from server.engine import build_replicas
from server.gpus import discover_gpus
from server.profiles import DEMO_PROFILE, ModelChoice, load_profiles
from server.sizing import plan_engine

from .conftest import ROOT
from .nvidia_smi import recorded

CHART = ROOT / "helm" / "airlock"
KUBERNETES = "1.30.0"
RELEASE = "airlock"
# Kinds that are custom resources: no Kubernetes schema to validate them against (checked by hand below).
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"}
IDP_CIDR = "10.20.0.5/32"
PROXY_CIDR = "10.42.0.0/16"
EXISTING_TLS = {"engine": "corp-airlock-engine", "gatewayClient": "corp-airlock-gateway-client",
                "gatewayServer": "corp-airlock-gateway", "limits": "corp-airlock-limits"}

# The extensibility values (bitnami/prometheus-community conventions), the same on the gateway and the engines.
EXTENSIBLE: dict[str, Any] = {
    "priorityClassName": "airlock-critical",
    "nodeSelector": {"corp.example/pool": "airlock"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
            "matchLabels": {"app.kubernetes.io/instance": "{{ .Release.Name }}"}}}}]}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "airlock"}}}],
    "podAnnotations": {"corp.example/team": "ml-platform"},
    "podLabels": {"corp.example/cost-center": "4711"},
    "extraEnv": [{"name": "TZ", "value": "Europe/Berlin"}],
    "extraVolumes": [{"name": "corp-ca", "configMap": {"name": "corp-ca"}}],
    "extraVolumeMounts": [{"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
}
# The ones the limits server's pod takes (it has no extra environment or volumes).
LIMITS_EXTENSIBLE = {key: EXTENSIBLE[key] for key in ("priorityClassName", "nodeSelector", "tolerations", "affinity",
                                                      "topologySpreadConstraints", "podAnnotations", "podLabels")}

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
                         "engine": {"model": {"existingClaim": "", "persistence": {
                             "create": True, "nfs": {"server": "nfs.internal", "path": "/models"}}},
                             "image": {"registry": "registry.corp"}},
                         "tls": {"source": "existingSecret", "existingSecret": EXISTING_TLS},
                         "global": {"imageRegistry": ""},
                         "gateway": {"image": {"repository": "registry.corp/airlock/gateway",
                                               "digest": "sha256:" + "a" * 64}}},
    "sized-engine": {"engine": {"model": {"variant": "thinking"}, "maxModelLen": 32768, "gpuMemoryUtilization": 0.92,
                                "maxNumSeqs": 32, "quantization": "none", "dtype": "bfloat16",
                                "imageBudget": {"maxPixels": 2097152, "minPixels": 65536}, "maxImagesPerRequest": 4}},
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
    # The model from the site's registry (copied by an init container), and the extensibility values on both pods.
    "model-image": {
        "global": {"imagePullSecrets": ["corp-registry"]},
        "imagePullSecrets": [{"name": "airlock-registry"}],
        "engine": {"replicas": 2,
                   "model": {"existingClaim": "", "image": {"repository": "airlock/models/qwen3-vl-8b-instruct",
                                                            "tag": "2026.11", "directory": "Qwen3-VL-8B-Instruct"}},
                   **EXTENSIBLE, "runtimeClassName": "nvidia",
                   "serviceAccount": {"create": True, "name": "", "annotations": {"corp.example/owner": "ml"},
                                      "automountServiceAccountToken": False}},
        "gateway": {**EXTENSIBLE, "serviceAccount": {"create": False, "name": "airlock-gateway-sa",
                                                     "automountServiceAccountToken": False}},
        "sharedLimits": {**LIMITS_EXTENSIBLE, "serviceAccount": {"create": False, "name": "airlock-limits-sa",
                                                                 "automountServiceAccountToken": False}},
        "networkPolicy": {"gatewayFrom": [{"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "corp-ingress"}}}],
                          "gateway": {"extraEgress": [{"to": [{"ipBlock": {"cidr": "10.30.0.0/24"}}],
                                                       "ports": [{"port": 5432, "protocol": "TCP"}]}]}},
        "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "{{ include \"airlock.fullname\" . }}-note"},
                          "data": {"release": "{{ .Release.Name }}"}}]},
    # A claim the chart makes, shared by two engines (ReadWriteMany), behind NodeLocal DNSCache.
    "model-claim": {
        "engine": {"replicas": 2, "model": {"existingClaim": "", "persistence": {
            "create": True, "storageClass": "cephfs", "accessModes": ["ReadWriteMany"], "size": "200Gi",
            "annotations": {"corp.example/backup": "weekly"}}}},
        "networkPolicy": {"dns": {"enabled": True, "to": [{"ipBlock": {"cidr": "169.254.20.10/32"}}],
                                  "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}}},
    # The model image mounted by Kubernetes itself (image volumes: Kubernetes 1.33+, KUBE_VERSIONS below).
    "model-image-volume": {
        "engine": {"model": {"existingClaim": "", "image": {
            "repository": "airlock/models/qwen3-vl-4b-instruct",
            "digest": "sha256:" + "b" * 64, "directory": "Qwen3-VL-4B-Instruct", "delivery": "imageVolume"}}}},
}
# The Kubernetes version a value set is rendered and validated for (default KUBERNETES).
KUBE_VERSIONS = {"model-image-volume": "1.34.0"}


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    def merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) and value else value
        return into
    return merge(copy.deepcopy(helm.Chart.load(CHART).values), overrides)


def render_files(overrides: dict[str, Any], api_versions: tuple[str, ...] = (), chart: Path = CHART,
                 upgrade: bool = False, kubernetes: str = KUBERNETES) -> dict[str, str]:
    """Each template's output (NOTES.txt too) as Helm renders it offline.

    ``api_versions`` are the APIs the cluster serves (``.Capabilities.APIVersions``). Chart.render does not pass them
    on, but the SDK's native render call takes them (helm-python-sdk 0.2.2: its RenderOptions has ``api_versions``),
    so that call is used directly; it is the same Helm engine. ``kubernetes`` is the cluster's version
    (``.Capabilities.KubeVersion``; the manifests are validated against the same version's schemas)."""
    options = {"name": RELEASE, "namespace": "airlock", "is_install": not upgrade, "is_upgrade": upgrade,
               "api_versions": list(api_versions), "kube_version": f"v{kubernetes}"}
    loaded = helm.Chart.load(chart)  # held: the native handle is freed with the object
    rendered: dict[str, str] = json.loads(_native.call_string(
        "helm_render", loaded._raw(), json.dumps(overrides), json.dumps(options)))
    return rendered


def render(overrides: dict[str, Any], api_versions: tuple[str, ...] = (), chart: Path = CHART,
           upgrade: bool = False, kubernetes: str = KUBERNETES) -> list[dict[str, Any]]:
    """The chart's manifests as Helm renders them offline (``lookup`` finds nothing: a first install)."""
    return [document for name, text in render_files(overrides, api_versions, chart, upgrade, kubernetes).items()
            if name.endswith(".yaml") for document in yaml.safe_load_all(text) if document]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def manifests(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUE_SETS[request.param], kubernetes=KUBE_VERSIONS.get(request.param, KUBERNETES))


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def pod_specs(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [document["spec"]["template"]["spec"] for document in of_kind(documents, "Deployment")]


def test_every_manifest_validates_against_the_kubernetes_schemas(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = manifests
    kinds = {document["kind"] for document in documents}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy"} <= kinds or "existing" in manifests[0]
    for document in documents:
        if document["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(document, KUBE_VERSIONS.get(name, KUBERNETES), strict=True)


def test_lint_passes_for_every_value_set(tmp_path: Path) -> None:
    for name, overrides in VALUE_SETS.items():
        values = tmp_path / f"{name}.yaml"
        values.write_text(yaml.safe_dump(merged(overrides)))
        report = helm.lint(CHART, merged(overrides), strict=True,
                           kube_version=f"v{KUBE_VERSIONS.get(name, KUBERNETES)}")
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
        # Writable paths are memory only; the one disk-backed emptyDir holds the model image's copy (weights, no request
        # data), written by the init container only and mounted read-only in the engine.
        for volume in spec["volumes"]:
            if "emptyDir" in volume and volume["name"] == "models":
                assert volume["emptyDir"]["sizeLimit"] and [c["name"] for c in spec["initContainers"]] == ["model"]
                (engine,) = spec["containers"]
                assert all(m["readOnly"] for m in engine["volumeMounts"] if m["name"] == "models")
            elif "emptyDir" in volume:
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
        (mount,) = [mount for mount in container["volumeMounts"] if mount["name"] == "models"]
        assert mount["readOnly"] is True
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        model = volumes["models"]
        image = overrides.get("model", {}).get("image", {})
        if image.get("delivery") == "imageVolume":
            # The image's /model as /models/<directory>, where profile auto looks.
            assert mount["mountPath"] == f"/models/{image['directory']}" and mount["subPath"] == "model"
            assert model["image"]["pullPolicy"] == "IfNotPresent"
        elif image:
            assert mount["mountPath"] == "/models" and "emptyDir" in model
        else:
            assert mount["mountPath"] == "/models" and model["persistentVolumeClaim"]["readOnly"] is True
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
    # A user's own limits are counted by the limits server, over mutual TLS with the limits hop's certificate.
    shared = settings.admission.shared_limits
    assert shared is not None and shared.url == f"tcp://{RELEASE}-limits.airlock.svc.cluster.local:9470"
    assert shared.tls is not None and shared.tls.ca_file == Path("/etc/airlock/tls/limits/ca.crt")
    assert (shared.tls.cert_file, shared.tls.key_file) == (Path("/etc/airlock/tls/limits/tls.crt"),
                                                           Path("/etc/airlock/tls/limits/tls.key"))


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
            elif peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "limits":
                assert rule["ports"] == [{"port": 9470, "protocol": "TCP"}]
            else:
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    # Address blocks only where the values name them: the provider, NodeLocal DNSCache, an extra egress rule.
    expected = {"oidc": [IDP_CIDR], "model-claim": ["169.254.20.10/32"], "model-image": ["10.30.0.0/24"]}
    assert blocks == expected.get(name, [])
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


def test_every_secret_a_pod_mounts_is_readable_by_its_group_only(manifests: tuple[str, list[dict[str, Any]]]) -> None:
    _, documents = manifests
    for spec in pod_specs(documents):
        secrets = [volume["secret"] for volume in spec["volumes"] if "secret" in volume]
        assert len(secrets) >= 1
        for secret in secrets:
            assert secret.get("defaultMode") == 0o440, secret["secretName"]
    gateway = named(documents, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    assert {"salt", "tls-upstream"} <= {volume["name"] for volume in gateway["volumes"] if "secret" in volume}


def test_ingress_terminates_tls_and_a_service_monitor_scrapes_metrics() -> None:
    documents = render(VALUE_SETS["ingress-tls"])
    (ingress,) = of_kind(documents, "Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["airlock.corp.example"], "secretName": "airlock-tls"}]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    monitors = of_kind(documents, "ServiceMonitor")  # the gateways' and the engines' (tests/test_monitoring.py)
    assert [monitor["spec"]["endpoints"][0]["port"] for monitor in monitors] == ["metrics", "metrics"]
    assert all(monitor["metadata"]["labels"]["release"] == "prometheus" for monitor in monitors)
    assert not of_kind(render({}), "Ingress") and not of_kind(render({}), "ServiceMonitor")


def test_the_gateway_budget_never_blocks_a_drain_while_the_engines_are_down() -> None:
    documents = render({})
    budget = named(documents, "PodDisruptionBudget", f"{RELEASE}-gateway")["spec"]
    assert budget["minAvailable"] == 1
    # Gateway pods are NotReady whenever no engine is (readiness is /readyz): they may still be evicted.
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    (container,) = named(documents, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


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
    # The engine's sizing values: the ranges Airlock's own settings take (server/config.py, EngineSettings).
    ({"engine": {"gpuMemoryUtilization": 1.5}}, "gpuMemoryUtilization"),
    ({"engine": {"gpuMemoryUtilization": 0}}, "gpuMemoryUtilization"),
    ({"engine": {"gpuMemoryUtilization": "90%"}}, "gpuMemoryUtilization"),
    ({"engine": {"quantization": "int4"}}, "quantization"),
    ({"engine": {"dtype": "float32"}}, "dtype"),
    ({"engine": {"maxModelLen": -16384}}, "maxModelLen"),
    ({"engine": {"maxModelLen": 100}}, "maxModelLen"),
    ({"engine": {"maxModelLen": "16k"}}, "maxModelLen"),
    ({"engine": {"maxNumSeqs": 0}}, "maxNumSeqs"),
    ({"engine": {"maxNumSeqs": 2.5}}, "maxNumSeqs"),
    ({"engine": {"streamInterval": 0}}, "streamInterval"),
    ({"engine": {"streamInterval": "fast"}}, "streamInterval"),
    ({"engine": {"streamInterval": 1.5}}, "streamInterval"),
    ({"engine": {"imageBudget": {"maxPixels": -1}}}, "maxPixels"),
    ({"engine": {"imageBudget": {"minPixels": 0}}}, "minPixels"),
    ({"engine": {"imageBudget": {"maxTokens": 4096}}}, "maxTokens"),
    ({"engine": {"maxImagesPerRequest": -1}}, "maxImagesPerRequest"),
    ({"engine": {"model": {"variant": "base"}}}, "variant"),
])
def test_the_values_schema_refuses_bad_values(overrides: dict[str, Any], where: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError) as refused:
        chart.validate_schema(merged(overrides))
    assert where in str(refused.value)


def test_templates_refuse_what_the_schema_cannot_see() -> None:
    for overrides, message in [
        ({"auth": {"apiKeys": {"content": ""}}}, "configure at least one sign-in method"),
        ({"engine": {"imageBudget": {"maxPixels": 65536, "minPixels": 131072}}},
         "minPixels must not be more than maxPixels"),
        ({"engine": {"model": {"directory": "my-finetune"}}}, "engine.model.directory needs a named"),
        ({"gateway": {"settings": {"engine": {"max_pixels": 1048576}}}},
         "gateway.settings.engine.max_pixels is set by the chart from engine.imageBudget"),
        ({"engine": {"maxImagesPerRequest": 3}, "gateway": {"settings": {"screening": {"max_images_per_request": 5}}}},
         "more than engine.maxImagesPerRequest (3)"),
        ({"engine": {"model": {"existingClaim": ""}}}, "exactly one of existingClaim"),
        ({"engine": {"model": {"persistence": {"create": True}}}}, "exactly one of existingClaim"),
        ({"engine": {"model": {"existingClaim": "", "persistence": {
            "create": True, "nfs": {"server": "nfs.internal", "path": ""}}}}}, "nfs.path is required"),
        ({"engine": {"model": {"persistence": {"nfs": {"server": "nfs.internal", "path": "/models"}}}}},
         "nfs needs engine.model.persistence.create"),
        ({"engine": {"model": {"existingClaim": "", "image": {"repository": "airlock/models/m", "tag": "1"}}}},
         "engine.model.image.directory"),
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
        # Not chart values: file names (a TLS Secret's, the images' SBOMs), and Airlock settings under the free-form
        # gateway.settings.
        if (path.split(".")[0] not in defaults or path.rsplit(".", 1)[-1] in {"crt", "key", "json", "txt", "yaml"}
                or path.startswith("gateway.settings.")):
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


def ingress_timeout(settings: dict[str, Any]) -> int:
    """The longest the gateway may stay silent, in whole seconds, plus the chart's 10 s margin: queued, then
    connecting, then waiting for the first byte. Unset settings take Airlock's own defaults (server/config.py)."""
    gateway = GatewaySettings(**settings.get("gateway", {}))
    admission = AdmissionSettings(**settings.get("admission", {}))
    return math.ceil(admission.queue_timeout_s + gateway.connect_timeout_s + gateway.read_timeout_s) + 10


def test_the_ingress_outlasts_the_gateways_longest_silence() -> None:
    nginx = "nginx.ingress.kubernetes.io/"
    for settings, expected in [
        ({}, 120 + 5 + 600 + 10),
        ({"admission": {"queue_timeout_s": 300}, "gateway": {"connect_timeout_s": 2.5, "read_timeout_s": 60}},
         300 + 3 + 60 + 10),
        ({"gateway": {"read_timeout_s": 900.5}}, 120 + 5 + 901 + 10),
    ]:
        assert ingress_timeout(settings) == expected
        documents = render({"ingress": {"enabled": True}, "gateway": {"settings": settings}})
        annotations = named(documents, "Ingress", f"{RELEASE}-gateway")["metadata"]["annotations"]
        assert annotations[nginx + "proxy-read-timeout"] == annotations[nginx + "proxy-send-timeout"] == str(expected)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_ingress_never_spools_and_mirrors_the_gateways_limits(name: str) -> None:
    documents = render(with_ingress(name), kubernetes=KUBE_VERSIONS.get(name, KUBERNETES))
    annotations = named(documents, "Ingress", f"{RELEASE}-gateway")["metadata"]["annotations"]
    nginx = "nginx.ingress.kubernetes.io/"
    # Request bodies (images) stream through instead of landing on the controller's disk; answers are not buffered.
    assert annotations[nginx + "proxy-request-buffering"] == "off"
    assert annotations[nginx + "proxy-buffering"] == "off"
    limits = VALUE_SETS[name].get("gateway", {}).get("settings", {}).get("gateway", {})
    body = limits.get("max_body_bytes", 32 * 1024 * 1024)
    assert annotations[nginx + "proxy-body-size"] == (f"{body // 2**20}m" if body % 2**20 == 0 else str(body))
    assert annotations[nginx + "proxy-read-timeout"] == annotations[nginx + "proxy-send-timeout"] == str(
        ingress_timeout(VALUE_SETS[name].get("gateway", {}).get("settings", {})))
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
    ("proxy-read-timeout", "60", "admission.queue_timeout_s + gateway.connect_timeout_s + gateway.read_timeout_s"),
    ("backend-protocol", "HTTP", "tls.gateway.enabled"),
    ("proxy-ssl-verify", "off", "must stay on"),
])
def test_the_ingress_refuses_annotations_that_would_spool_or_contradict_the_gateway(
    annotation: str, value: str, message: str,
) -> None:
    overrides = {"ingress": {"enabled": True, "annotations": {f"nginx.ingress.kubernetes.io/{annotation}": value}}}
    with pytest.raises(helm.HelmError) as refused:
        helm.Chart.load(CHART).render(overrides, name=RELEASE, namespace="airlock")
    assert annotation in str(refused.value) and message in str(refused.value)


@pytest.mark.parametrize("limit", [None, 2048])
def test_the_engines_start_with_tool_calling_and_the_gateways_answer_length(tmp_path: Path, limit: int | None) -> None:
    """The engine pod runs `airlock engine` on its ConfigMap: the vLLM command line it builds from it (here for a
    recorded NVIDIA L4: no GPU on this machine) carries tool calling and, as the default answer length, the gateway's
    own screening.max_tokens_limit."""
    overrides: dict[str, Any] = {"engine": {"model": {"profile": "qwen3-vl-8b-instruct-fp8"}}}
    if limit is not None:
        overrides["gateway"] = {"settings": {"screening": {"max_tokens_limit": limit}}}
    settings = engine_settings_of(render(overrides))
    expected = limit or Settings().screening.max_tokens_limit
    assert settings.screening.max_tokens_limit == expected
    argv = engine_argv(settings, tmp_path)
    assert json.loads(argv[argv.index("--override-generation-config") + 1]) == {"max_new_tokens": expected}
    assert "--enable-auto-tool-choice" in argv and argv[argv.index("--tool-call-parser") + 1] == "hermes"


def engine_argv(settings: Settings, runtime_dir: Path, card: str = "l4") -> list[str]:
    """The vLLM command line the engine pod would run with these settings on a recorded card (tests/data/nvidia-smi):
    the plan by Airlock's sizing, then the launcher's command line."""
    profile = load_profiles()[settings.engine.model]
    gpus = discover_gpus({}, run=recorded(card))
    plan = plan_engine(profile, gpus, settings.engine, settings.admission.expected_tokens_per_request)
    choice = ModelChoice(Path("/models") / (profile.directory or profile.name), profile, profile.served_model_name,
                         False, "the chart's profile")
    (launch,) = build_replicas(settings.engine, choice, plan, runtime_dir, [gpus], {},
                               default_max_tokens=settings.screening.max_tokens_limit)
    return launch.argv


def test_the_engine_values_reach_the_vllm_command_line(tmp_path: Path) -> None:
    """From the chart's values through the ConfigMap and Airlock's sizing to vLLM's flags (a recorded L40S)."""
    values = {"model": {"profile": "qwen3-vl-8b-instruct"}, "maxModelLen": 24576, "gpuMemoryUtilization": 0.85,
              "maxNumSeqs": 12, "dtype": "bfloat16", "maxImagesPerRequest": 3, "streamInterval": 3,
              "imageBudget": {"maxPixels": 2048 * 32 * 32, "minPixels": 128 * 32 * 32}}
    argv = engine_argv(engine_settings_of(render({"engine": values})), tmp_path, "l40s")
    flags = {flag: argv[argv.index(flag) + 1] for flag in ("--max-model-len", "--gpu-memory-utilization",
                                                          "--max-num-seqs", "--dtype", "--limit-mm-per-prompt",
                                                          "--mm-processor-kwargs", "--stream-interval")}
    assert flags["--max-model-len"] == "24576" and float(flags["--gpu-memory-utilization"]) == 0.85
    assert flags["--max-num-seqs"] == "12" and flags["--dtype"] == "bfloat16" and flags["--stream-interval"] == "3"
    assert json.loads(flags["--limit-mm-per-prompt"])["image"] == 3
    assert json.loads(flags["--mm-processor-kwargs"]) == {"size": {"longest_edge": 2048 * 32 * 32,
                                                                   "shortest_edge": 128 * 32 * 32}}


# --- How vLLM runs the model: values for the engine's sizing, not only extraArgs --------------------------------

# The engine settings the sizing values set (server/config.py, EngineSettings), and their defaults when unset.
SIZING_SETTINGS = ("model", "variant", "quantization", "dtype", "max_model_len", "gpu_memory_utilization",
                   "max_num_seqs", "max_pixels", "min_pixels", "max_images_per_request", "stream_interval")


def sizing_of(engine: EngineSettings) -> dict[str, Any]:
    return {name: getattr(engine, name) for name in SIZING_SETTINGS}


def test_the_default_engine_is_airlocks_own_choice_sized_to_the_gpu() -> None:
    """No named profile (the 8B bf16 one crash-loops on 24 GB cards): `model: auto`, and every sizing setting left
    to Airlock's fitting for the pod's GPU, on the engine side and the gateway side alike."""
    documents = render({})
    assert sizing_of(engine_settings_of(documents).engine) == {
        "model": "auto", "variant": "instruct", "quantization": "auto", "dtype": "auto", "max_model_len": None,
        "gpu_memory_utilization": None, "max_num_seqs": None, "max_pixels": None, "min_pixels": None,
        "max_images_per_request": None, "stream_interval": "auto"}
    assert "engine" not in gateway_settings_of(documents)


@pytest.mark.parametrize(("values", "changed"), [
    ({"maxModelLen": 8192}, {"max_model_len": 8192}),
    ({"maxModelLen": 262144}, {"max_model_len": 262144}),
    ({"gpuMemoryUtilization": 0.85}, {"gpu_memory_utilization": 0.85}),
    ({"gpuMemoryUtilization": 1}, {"gpu_memory_utilization": 1.0}),
    ({"maxNumSeqs": 24}, {"max_num_seqs": 24}),
    ({"streamInterval": 4}, {"stream_interval": 4}),
    ({"streamInterval": None}, {}),  # removed by --set engine.streamInterval=null: Airlock's auto, not 0
    ({"quantization": "fp8"}, {"quantization": "fp8"}),
    ({"quantization": "none"}, {"quantization": "none"}),
    ({"dtype": "float16"}, {"dtype": "float16"}),
    ({"dtype": "bfloat16"}, {"dtype": "bfloat16"}),
    # 16 MP, Qwen3-VL's own largest image: written as a whole number, not 1.6777216e+07.
    ({"imageBudget": {"maxPixels": 16384 * 32 * 32}}, {"max_pixels": 16384 * 32 * 32}),
    ({"imageBudget": {"maxPixels": 2048 * 32 * 32, "minPixels": 256 * 32 * 32}},
     {"max_pixels": 2048 * 32 * 32, "min_pixels": 256 * 32 * 32}),
    ({"imageBudget": {"minPixels": 1024}}, {"min_pixels": 1024}),
    # No images at all is a valid choice (a text-only service), not "unset".
    ({"maxImagesPerRequest": 0}, {"max_images_per_request": 0}),
    ({"maxImagesPerRequest": 4}, {"max_images_per_request": 4}),
    ({"model": {"variant": "thinking"}}, {"variant": "thinking"}),
    # A named profile stays possible; variant belongs to auto only.
    ({"model": {"profile": "qwen3-vl-4b-instruct", "variant": "thinking"}}, {"model": "qwen3-vl-4b-instruct"}),
])
def test_each_engine_value_reaches_the_engine_settings_and_only_that(values: dict[str, Any],
                                                                      changed: dict[str, Any]) -> None:
    """Read as the engine pod reads its ConfigMap (Airlock's own settings model): the value arrives, the others stay
    left to the sizing. The image budget and max_num_seqs reach the gateway's settings too, the same on both sides."""
    documents = render({"engine": values})
    expected = {**sizing_of(engine_settings_of(render({})).engine), **changed}
    assert sizing_of(engine_settings_of(documents).engine) == expected
    budget = {name: changed[name] for name in ("max_pixels", "min_pixels", "max_num_seqs") if name in changed}
    gateway = gateway_settings_of(documents).get("engine", {})
    assert gateway == budget
    gateway_engine = EngineSettings(**gateway)
    assert {name: getattr(gateway_engine, name) for name in budget} == budget


def test_the_gateway_lets_through_no_more_images_than_the_engines_take() -> None:
    """engine.maxImagesPerRequest is the gateway's limit too (its own OpenAI-style refusal, before the engine's);
    a lower gateway limit stays, and unset, both sides keep their defaults."""
    def limit(values: dict[str, Any]) -> int:
        return gateway_policy(values).screening.max_images_per_request

    assert limit({"engine": {"maxImagesPerRequest": 3}}) == 3
    assert limit({"engine": {"maxImagesPerRequest": 0}}) == 0
    assert limit({"engine": {"maxImagesPerRequest": 3},
                  "gateway": {"settings": {"screening": {"max_images_per_request": 2, "max_tokens_limit": 2048}}}}) == 2
    assert limit({}) == Settings().screening.max_images_per_request


def gateway_policy(values: dict[str, Any]) -> Settings:
    """The gateway's airlock.yaml as Airlock's settings (credentials files not read: only the policy matters)."""
    return Settings(**gateway_settings_of(render(values)))


def test_the_engines_size_for_the_gateways_typical_request() -> None:
    """--max-num-seqs follows admission.expected_tokens_per_request: the engine pod gets the gateway's value."""
    assert engine_settings_of(render({})).admission.expected_tokens_per_request == \
        AdmissionSettings().expected_tokens_per_request
    documents = render({"gateway": {"settings": {"admission": {"expected_tokens_per_request": 8192}}}})
    assert engine_settings_of(documents).admission.expected_tokens_per_request == 8192


@pytest.mark.parametrize(("args", "value"), [
    (["--max-model-len", "32768"], "engine.maxModelLen"),
    (["--max_model_len=32768"], "engine.maxModelLen"),
    # argparse takes an unambiguous abbreviation (vLLM's parser keeps allow_abbrev).
    (["--max-model", "32768"], "engine.maxModelLen"),
    (["--enforce-eager", "--gpu-memory-utilization", "0.95"], "engine.gpuMemoryUtilization"),
    (["--max-num-seqs=8"], "engine.maxNumSeqs"),
    (["--stream-interval", "4"], "engine.streamInterval"),
    (["--stream_interval=4"], "engine.streamInterval"),
    (["--dtype", "half"], "engine.dtype"),
    (["--quantization=fp8"], "engine.quantization"),
    (["-q", "fp8"], "engine.quantization"),
    (["-qfp8"], "engine.quantization"),
    (["--mm-processor-kwargs", '{"max_pixels": 99999999}'], "engine.imageBudget.maxPixels"),
    (["--mm-processor-kwargs.max_pixels", "99999999"], "engine.imageBudget.maxPixels"),
    (["--mm_processor_kwargs={}"], "engine.imageBudget.maxPixels"),
    (["--limit-mm-per-prompt.image", "99"], "engine.maxImagesPerRequest"),
    (["-tp", "2"], "engine.tensorParallelSize"),
    (["-pp", "2"], "engine.tensorParallelSize"),
    (["--pipeline-parallel-size=2"], "engine.tensorParallelSize"),
    (["-dp2"], "engine.replicas"),
    (["--data-parallel-size", "2"], "engine.replicas"),
])
def test_extra_args_that_set_a_sized_flag_are_refused_naming_the_value(args: list[str], value: str) -> None:
    """vLLM keeps the last of a flag given twice: an extraArgs copy would silently replace the sizing."""
    with pytest.raises(helm.HelmError) as refused:
        helm.Chart.load(CHART).render({"engine": {"extraArgs": args}}, name=RELEASE, namespace="airlock")
    assert "engine.extraArgs" in str(refused.value) and value in str(refused.value)


def test_other_extra_args_pass_through() -> None:
    # --max-num-batched-tokens shares "--max-num" with --max-num-seqs; --quantization-config is another flag.
    args = ["--enforce-eager", "--max-num-batched-tokens", "8192", "--quantization-config", "{}", "--seed", "7"]
    assert engine_settings_of(render({"engine": {"extraArgs": args}})).engine.extra_args == args


def test_the_profile_values_are_the_shipped_profiles() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    profiles = schema["properties"]["engine"]["properties"]["model"]["properties"]["profile"]["enum"]
    assert set(profiles) == {"auto", *load_profiles()} - {DEMO_PROFILE}


def test_the_readme_names_the_directories_profile_auto_looks_for() -> None:
    """With profile auto the engine looks for the weights under their profile's directory name on the volume."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### 3b. Kubernetes (Helm)"):readme.index("## Configuration")]
    sized = [profile for profile in load_profiles().values() if profile.size is not None]
    assert len(sized) >= 4
    for profile in sized:
        assert f"`{profile.directory}`" in section, profile.name


def test_the_gateway_counts_requests_as_the_engines_were_sized() -> None:
    """The gateway's per-replica limit (KV cache / expected_tokens_per_request, at most the engines' --max-num-seqs)
    in the same terms as the engines' own plan: their max_num_seqs when set, Thinking's larger requests."""
    plain = gateway_settings_of(render({}))
    assert "expected_tokens_per_request" not in plain.get("admission", {})
    assert "max_num_seqs" not in plain.get("engine", {})
    thinking = render({"engine": {"model": {"variant": "thinking"}, "maxNumSeqs": 12}})
    gateway = Settings(**gateway_settings_of(thinking))
    assert gateway.admission.expected_tokens_per_request == 12288
    assert gateway.engine.max_num_seqs == engine_settings_of(thinking).engine.max_num_seqs == 12
    # An operator's own figure is kept.
    chosen = render({"engine": {"model": {"variant": "thinking"}},
                     "gateway": {"settings": {"admission": {"expected_tokens_per_request": 20000}}}})
    assert Settings(**gateway_settings_of(chosen)).admission.expected_tokens_per_request == 20000


def test_each_gateway_pod_sends_the_engines_its_share_of_their_slots() -> None:
    """Two gateway pods (the default) each give an engine half of what it holds, so together they never give it
    more (admission.gateway_replicas); with autoscaling, as many shares as pods may run."""
    assert Settings(**gateway_settings_of(render({}))).admission.gateway_replicas == 2
    three = render({"gateway": {"replicas": 3}, "engine": {"model": {"variant": "thinking"}}})
    admission = Settings(**gateway_settings_of(three)).admission
    assert (admission.gateway_replicas, admission.expected_tokens_per_request) == (3, 12288)
    scaled = render({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5},
                                 "settings": {"admission": {"reserved_slots_per_replica": 2}}}})
    admission = Settings(**gateway_settings_of(scaled)).admission
    assert (admission.gateway_replicas, admission.reserved_slots_per_replica) == (5, 2)
    # A rollout replaces one pod at a time: a surge pod would be one share too many.
    assert named(render({}), "Deployment", "airlock-gateway")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0, "maxUnavailable": 1}
    assert "strategy" not in named(render({"gateway": {"replicas": 1}}), "Deployment", "airlock-gateway")["spec"]
    with pytest.raises(helm.HelmError, match=r"gateway.settings.admission.gateway_replicas is set by the chart from "
                                             r"gateway.replicas"):
        helm.Chart.load(CHART).render({"gateway": {"settings": {"admission": {"gateway_replicas": 1}}}}, name=RELEASE,
                                      namespace="airlock")


def test_one_side_of_the_image_budget_is_checked_against_the_profiles_other() -> None:
    for budget in ({"minPixels": 5_000_000}, {"maxPixels": 32768}):
        with pytest.raises(helm.HelmError, match="minPixels must not be more than maxPixels"):
            helm.Chart.load(CHART).render({"engine": {"imageBudget": budget}}, name=RELEASE, namespace="airlock")


def test_a_named_instruct_profile_is_not_counted_as_thinking() -> None:
    # variant belongs to model: auto; a named profile says what it is.
    named = render({"engine": {"model": {"profile": "qwen3-vl-8b-instruct", "variant": "thinking"}}})
    assert "expected_tokens_per_request" not in gateway_settings_of(named).get("admission", {})
    thinking = render({"engine": {"model": {"profile": "qwen3-vl-4b-thinking-fp8"}}})
    assert gateway_settings_of(thinking)["admission"]["expected_tokens_per_request"] == 12288
