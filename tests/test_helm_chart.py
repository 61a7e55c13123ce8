"""The Helm chart, rendered by the real Helm engine (PyPI helm-python-sdk bundles it) for several sets of values:
every manifest validates against the Kubernetes schemas (kubernetes-validate), lint passes, values.schema.json
refuses bad values, and policy holds over what is rendered (restricted security, limits, pinned images, engines
reachable only from the gateway, egress only to configured targets)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from server.config import Settings, load_settings

from .conftest import ROOT

CHART = ROOT / "helm" / "airlock"
KUBERNETES = "1.30.0"
RELEASE = "airlock"
# Kinds that are custom resources: no Kubernetes schema to validate them against (checked by hand below).
CUSTOM_KINDS = {"ServiceMonitor"}
IDP_CIDR = "10.20.0.5/32"

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
                         "imageRegistry": "", "gateway": {"image": {"repository": "registry.corp/airlock/gateway",
                                                                    "digest": "sha256:" + "a" * 64}}},
}


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    def merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        for key, value in extra.items():
            into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) and value else value
        return into
    return merge(copy.deepcopy(helm.Chart.load(CHART).values), overrides)


def render(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = helm.Chart.load(CHART).render(overrides, name=RELEASE, namespace="airlock", is_install=True)
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
    assert [u.url for u in settings.upstreams] == [f"http://{RELEASE}-engine-{i}:8100" for i in range(replicas)]
    assert settings.metrics.listener == "separate" and settings.log_format == "json"
    assert settings.privacy.salt_secret_file is not None


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
    (gateway,) = [d for d in of_kind(documents, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-gateway"]
    spec = gateway["spec"]["template"]["spec"]
    used = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    env = {e["name"]: e for e in spec["containers"][0].get("env", [])}
    if name == "existing-secrets":
        assert made == set()
        assert used == {"airlock-users", "airlock-keys", "airlock-salt"}
        assert env["AIRLOCK_AUTH__OIDC__ISSUER"]["valueFrom"]["secretKeyRef"] == {"name": "airlock-oidc",
                                                                                 "key": "issuer"}
    else:
        assert f"{RELEASE}-salt" in made and f"{RELEASE}-salt" in used
        assert used <= made


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
        if path.split(".")[0] not in defaults:
            continue
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"the README names {path}, which the chart lacks"
            node = node[part]
        checked += 1
    assert checked >= 12
