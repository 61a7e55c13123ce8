"""The chart a cluster admin accepts: every pod meets the restricted Pod Security Standard (tests/pss.py), every image
comes from the site's registry (global.imageRegistry, bitnami's convention), the model is delivered from a claim the
chart can make or from an OCI image and verified, and the bitnami/prometheus-community extensibility values land where
they should; the README's Helm examples render as typed."""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from server.config import Settings

from .conftest import ROOT
from .pss import pod_templates, restricted_violations
from .test_helm_chart import (
    CHART,
    CUSTOM_KINDS,
    KUBE_VERSIONS,
    KUBERNETES,
    RELEASE,
    VALUE_SETS,
    merged,
    named,
    of_kind,
    render,
    render_files,
)

NODELOCAL = "169.254.20.10/32"


def refused(overrides: dict[str, Any], kubernetes: str = KUBERNETES) -> str:
    """The chart's refusal (schema or template) of these values, as text."""
    with pytest.raises(helm.HelmError) as error:
        render(overrides, kubernetes=kubernetes)
    return str(error.value)


def pod(documents: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = named(documents, "Deployment", name)["spec"]["template"]["spec"]
    return spec


# --- Pod Security Standards, restricted ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_pod_meets_the_restricted_pod_security_standard(name: str) -> None:
    """Every ci/*-values.yaml (they are VALUE_SETS, tests/test_helm_chart.py checks) as a namespace enforcing
    restricted would admit it."""
    version = KUBE_VERSIONS.get(name, KUBERNETES)
    templates = pod_templates(render(VALUE_SETS[name], kubernetes=version))
    assert len(templates) >= 2
    for workload, metadata, spec in templates:
        assert restricted_violations(metadata, spec, version) == [], workload
        # And as the newest policy version checks it (latest, the namespace label's default).
        assert restricted_violations(metadata, spec, "1.35") == [], workload


@pytest.mark.parametrize(("change", "control"), [
    (lambda s: s["volumes"].append({"name": "m", "hostPath": {"path": "/models"}}), "Volume Types"),
    (lambda s: s["volumes"].append({"name": "m", "nfs": {"server": "nfs", "path": "/"}}), "Volume Types"),
    (lambda s: s["volumes"].append({"name": "m", "image": {"reference": "r.corp/m:1"}}), "Volume Types"),
    (lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False), "Running as Non-root"),
    (lambda s: [s["securityContext"].pop("runAsNonRoot"), s["containers"][0]["securityContext"].pop("runAsNonRoot")],
     "Running as Non-root"),
    (lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "Privilege Escalation"),
    (lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}), "Capabilities"),
    (lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["CHOWN"]}),
     "Capabilities"),
    (lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}), "Seccomp"),
    (lambda s: s["securityContext"].update(runAsUser=0), "Running as Non-root user"),
    (lambda s: s.update(hostNetwork=True), "Host Namespaces"),
    (lambda s: s["containers"][0]["ports"].append({"containerPort": 80, "hostPort": 80}), "Host Ports"),
    (lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "Sysctls"),
    (lambda s: s["containers"][0]["securityContext"].update(seLinuxOptions={"type": "spc_t"}), "SELinux"),
])
def test_the_checker_catches_each_rule_it_implements(change: Any, control: str) -> None:
    """The checker is honest: the default gateway pod passes, and each single breach is named (an image volume only
    before v1.33)."""
    spec = copy.deepcopy(pod(render({}), f"{RELEASE}-gateway"))
    assert restricted_violations({}, spec) == []
    change(spec)
    assert any(problem.startswith(control) for problem in restricted_violations({}, spec)), control


@pytest.mark.parametrize(("change", "control", "allowed_from"), [
    (lambda s: s["volumes"].append({"name": "m", "image": {"reference": "r.corp/m:1"}}), "Volume Types", "1.33"),
    (lambda s: s["containers"][0]["securityContext"].update(seLinuxOptions={"type": "container_engine_t"}),
     "SELinux", "1.31"),
    (lambda s: s["securityContext"].update(sysctls=[{"name": "net.ipv4.tcp_rmem", "value": "4096 87380 6291456"}]),
     "Sysctls", "1.32"),
])
def test_what_later_kubernetes_versions_allow(change: Any, control: str, allowed_from: str) -> None:
    """k8s.io/pod-security-admission gates each check by version: refused before, allowed from that version."""
    spec = copy.deepcopy(pod(render({}), f"{RELEASE}-gateway"))
    change(spec)
    before = f"1.{int(allowed_from.split('.')[1]) - 1}"
    assert any(p.startswith(control) for p in restricted_violations({}, spec, before))
    assert restricted_violations({}, spec, allowed_from) == []


@pytest.mark.parametrize("handler", [
    lambda c: c["readinessProbe"]["httpGet"].update(host="169.254.169.254"),
    lambda c: c.update(startupProbe={"tcpSocket": {"port": 22, "host": "10.0.0.1"}}),
    lambda c: c.update(lifecycle={"preStop": {"httpGet": {"port": 80, "host": "metadata.internal"}}}),
])
def test_a_probe_or_hook_to_another_host_is_refused_from_kubernetes_1_34(handler: Any) -> None:
    """Baseline "Host Probes / Lifecycle Hooks" (v1.34+): the kubelet would reach another host for the pod."""
    spec = copy.deepcopy(pod(render({}), f"{RELEASE}-gateway"))
    handler(spec["containers"][0])
    assert restricted_violations({}, spec, "1.33") == []
    assert restricted_violations({}, spec, "1.34") == ["Host Probes / Lifecycle Hooks: gateway"]


# --- Images: global.imageRegistry, pull secrets, no silent docker.io ---------------------------------------------


def every_image(documents: list[dict[str, Any]]) -> list[str]:
    """Every image reference a pod pulls: containers, init containers and image volumes."""
    images = []
    for _, _, spec in pod_templates(documents):
        images += [c["image"] for c in spec["containers"] + spec.get("initContainers", [])]
        images += [v["image"]["reference"] for v in spec.get("volumes", []) if "image" in v]
    return images


@pytest.mark.parametrize("name", ["default", "model-image", "model-image-volume"])
def test_global_image_registry_reaches_every_image(name: str) -> None:
    values = merged(VALUE_SETS[name])
    values["global"]["imageRegistry"] = "harbor.corp:5000/mirror"
    images = every_image(render(values, kubernetes=KUBE_VERSIONS.get(name, KUBERNETES)))
    # The gateway, an engine and the limits server (the gateway's image), and the model images.
    assert len(images) >= 4 if "model" in name else len(images) == 3
    assert all(image.startswith("harbor.corp:5000/mirror/airlock/") for image in images), images


def test_an_image_registry_of_its_own_is_used_when_no_global_one_is_set() -> None:
    documents = render(VALUE_SETS["existing-secrets"])
    # The limits server runs the gateway's image.
    assert sorted(every_image(documents)) == ["registry.corp/airlock/engine:0.1.0",
                                              *["registry.corp/airlock/gateway@sha256:" + "a" * 64] * 2]
    # global wins over each image's registry (bitnami's rule).
    values = copy.deepcopy(VALUE_SETS["existing-secrets"])
    values["global"]["imageRegistry"] = "mirror.corp"
    assert "mirror.corp/airlock/engine:0.1.0" in every_image(render(values))


@pytest.mark.parametrize("repository", ["airlock/engine", "engine", "library/airlock"])
def test_an_image_without_a_registry_is_refused_not_pulled_from_docker_hub(repository: str) -> None:
    message = refused({"global": {"imageRegistry": ""}, "gateway": {"image": {"registry": "r.corp"}},
                       "engine": {"image": {"repository": repository}}})
    assert f"image {repository} names no registry" in message and "docker.io" in message


@pytest.mark.parametrize("repository", ["registry.corp/airlock/engine", "localhost/airlock/engine",
                                        "registry:5000/airlock/engine"])
def test_a_repository_naming_its_registry_needs_no_global_one(repository: str) -> None:
    documents = render({"global": {"imageRegistry": ""}, "gateway": {"image": {"registry": "r.corp"}},
                        "engine": {"image": {"repository": repository}}})
    assert f"{repository}:0.1.0" in every_image(documents)


def test_pull_secrets_global_first_then_the_charts_once_each() -> None:
    documents = render({"global": {"imagePullSecrets": ["corp", {"name": "shared"}]},
                        "imagePullSecrets": [{"name": "shared"}, "own"]})
    for _, _, spec in pod_templates(documents):
        assert spec["imagePullSecrets"] == [{"name": "corp"}, {"name": "shared"}, {"name": "own"}]
    assert all("imagePullSecrets" not in spec for _, _, spec in pod_templates(render({})))


# --- The model: a claim the chart makes, or an OCI image, verified ----------------------------------------------


@pytest.mark.parametrize("modes", [["ReadWriteOnce"], ["ReadWriteOncePod"]])
@pytest.mark.parametrize("source", ["created", "existing"])
def test_a_single_node_claim_for_two_engines_is_refused(modes: list[str], source: str) -> None:
    model: dict[str, Any] = {"persistence": {"accessModes": modes}}
    if source == "created":
        model |= {"existingClaim": "", "persistence": {"create": True, "accessModes": modes}}
    message = refused({"engine": {"replicas": 2, "model": model}})
    assert "engine.model.persistence.accessModes" in message and "2 engine replicas" in message
    assert "ReadOnlyMany or ReadWriteMany" in message
    # One engine may use it; two may share a ReadWriteMany or ReadOnlyMany claim, or an image.
    assert render({"engine": {"replicas": 1, "model": model}})


def test_the_created_claim_is_what_the_engines_mount() -> None:
    documents = render(VALUE_SETS["model-claim"])
    claim = named(documents, "PersistentVolumeClaim", f"{RELEASE}-models")
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
                             "storageClassName": "cephfs"}
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep", "corp.example/backup": "weekly"}
    for index in range(2):
        (volume,) = [v for v in pod(documents, f"{RELEASE}-engine-{index}")["volumes"] if v["name"] == "models"]
        assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": f"{RELEASE}-models",
                                                                      "readOnly": True}}
    assert not of_kind(documents, "PersistentVolume")


@pytest.mark.parametrize(("storage_class", "expected"), [(None, None), ("-", ""), ("fast", "fast")])
def test_the_storage_class_follows_the_bitnami_convention(storage_class: str | None, expected: str | None) -> None:
    documents = render({"engine": {"model": {"existingClaim": "", "persistence": {
        "create": True, "storageClass": storage_class}}}})
    claim = named(documents, "PersistentVolumeClaim", f"{RELEASE}-models")
    assert claim["spec"].get("storageClassName") == expected


def test_nfs_becomes_a_persistent_volume_bound_to_the_claim_not_an_inline_volume() -> None:
    documents = render(VALUE_SETS["existing-secrets"])
    (volume,) = of_kind(documents, "PersistentVolume")
    claim = named(documents, "PersistentVolumeClaim", f"{RELEASE}-models")
    assert volume["spec"]["nfs"] == {"server": "nfs.internal", "path": "/models", "readOnly": True}
    assert volume["spec"]["claimRef"] == {"namespace": "airlock", "name": f"{RELEASE}-models"}
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain" and volume["spec"]["storageClassName"] == ""
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"] and claim["spec"]["storageClassName"] == ""
    assert all("nfs" not in v for _, _, spec in pod_templates(documents) for v in spec["volumes"])


def test_the_model_image_is_copied_by_an_init_container_into_the_pods_own_volume() -> None:
    documents = render(VALUE_SETS["model-image"])
    spec = pod(documents, f"{RELEASE}-engine-1")
    (init,) = spec["initContainers"]
    assert init["image"] == "registry.internal.example/airlock/models/qwen3-vl-8b-instruct:2026.11"
    # Containerfile.model: the model at /model; -T copies into the directory profile auto looks for.
    assert init["command"] == ["cp", "-R", "-f", "-T", "/model", "/models/Qwen3-VL-8B-Instruct"]
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    assert {v["name"]: v for v in spec["volumes"]}["models"]["emptyDir"] == {"sizeLimit": "40Gi"}
    (engine,) = spec["containers"]
    assert {m["name"]: m for m in engine["volumeMounts"]}["models"] == {"name": "models", "mountPath": "/models",
                                                                       "readOnly": True}
    # Verified against its manifest before vLLM loads it.
    config = yaml.safe_load(named(documents, "ConfigMap", f"{RELEASE}-engine")["data"]["airlock.yaml"])
    assert Settings(**config).engine.verify_model == "require"
    assert not of_kind(documents, "PersistentVolumeClaim")


def test_the_model_image_as_an_image_volume_needs_kubernetes_1_33() -> None:
    values = VALUE_SETS["model-image-volume"]
    message = refused(values, kubernetes="1.32.0")
    assert "imageVolume needs Kubernetes 1.33" in message and "initContainer" in message
    spec = pod(render(values, kubernetes="1.33.0"), f"{RELEASE}-engine-0")
    assert "initContainers" not in spec
    assert {v["name"]: v for v in spec["volumes"]}["models"]["image"] == {
        "reference": "registry.internal.example/airlock/models/qwen3-vl-4b-instruct@sha256:" + "b" * 64,
        "pullPolicy": "IfNotPresent"}


@pytest.mark.parametrize("source", ["configMap", "secret"])
def test_the_signers_public_key_is_mounted_and_named_in_the_engine_settings(source: str) -> None:
    documents = render({"engine": {"model": {"publicKey": {source: "airlock-signer", "key": "bundle.pub"}}}})
    spec = pod(documents, f"{RELEASE}-engine-0")
    volume = {v["name"]: v for v in spec["volumes"]}["model-key"]
    assert volume[source]["items"] == [{"key": "bundle.pub", "path": "airlock.pub"}]
    assert volume[source]["secretName" if source == "secret" else "name"] == "airlock-signer"
    (engine,) = spec["containers"]
    assert {m["name"]: m for m in engine["volumeMounts"]}["model-key"] == {
        "name": "model-key", "mountPath": "/etc/airlock/model-key", "readOnly": True}
    config = yaml.safe_load(named(documents, "ConfigMap", f"{RELEASE}-engine")["data"]["airlock.yaml"])
    assert config["engine"]["manifest_public_key"] == "/etc/airlock/model-key/airlock.pub"
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    if "manifest_public_key" not in Settings.model_fields["engine"].annotation.model_fields:  # type: ignore[union-attr]
        pytest.skip("engine.manifest_public_key arrives with the signed-bundle work (helper 'sign'): the engine's "
                    "settings cannot read it yet; the rendering above is checked")
    assert Settings(**config).engine.model_dump()["manifest_public_key"] is not None


@pytest.mark.parametrize(("model", "message"), [
    ({"publicKey": {"configMap": "a", "secret": "b"}}, "configMap or secret, not both"),
    ({"publicKey": {"configMap": "a"}, "verify": "off"}, "needs engine.model.verify"),
])
def test_a_public_key_that_would_check_nothing_is_refused(model: dict[str, Any], message: str) -> None:
    assert message in refused({"engine": {"model": model}})


# --- Extensibility ------------------------------------------------------------------------------------------------

# (value under gateway/engine, where it lands in the pod spec, the expected rendering)
POD_VALUES = [
    ("runtimeClassName", "nvidia", lambda spec, _: spec["runtimeClassName"]),
    ("priorityClassName", "airlock-critical", lambda spec, _: spec["priorityClassName"]),
    ("nodeSelector", {"pool": "gpu"}, lambda spec, _: spec["nodeSelector"]),
    ("tolerations", [{"key": "gpu", "operator": "Exists"}], lambda spec, _: spec["tolerations"]),
    ("affinity", {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["l40s"]}]}]}}},
     lambda spec, _: spec["affinity"]),
    ("topologySpreadConstraints", [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                                    "labelSelector": {"matchLabels": {"a": "b"}}}],
     lambda spec, _: spec["topologySpreadConstraints"]),
    ("extraEnv", [{"name": "TZ", "value": "UTC"}], lambda spec, _: spec["containers"][0]["env"][-1:]),
    ("extraVolumes", [{"name": "extra", "configMap": {"name": "x"}}], lambda spec, _: spec["volumes"][-1:]),
    ("extraVolumeMounts", [{"name": "tmp", "mountPath": "/scratch"}],
     lambda spec, _: spec["containers"][0]["volumeMounts"][-1:]),
    ("podAnnotations", {"team": "ml"}, lambda _, meta: {"team": meta["annotations"]["team"]}),
    ("podLabels", {"cost": "4711"}, lambda _, meta: {"cost": meta["labels"]["cost"]}),
]


@pytest.mark.parametrize("component", ["gateway", "engine"])
@pytest.mark.parametrize(("value", "setting", "where"), POD_VALUES, ids=[v[0] for v in POD_VALUES])
def test_each_pod_value_lands_in_the_pod(component: str, value: str, setting: Any, where: Any) -> None:
    documents = render({component: {value: setting}})
    deployment = named(documents, "Deployment", f"{RELEASE}-{component}-0" if component == "engine"
                       else f"{RELEASE}-gateway")
    template = deployment["spec"]["template"]
    assert where(template["spec"], template["metadata"]) == setting
    # Only that component's pods get it.
    other = named(documents, "Deployment", f"{RELEASE}-gateway" if component == "engine" else f"{RELEASE}-engine-0")
    with contextlib.suppress(KeyError):
        assert where(other["spec"]["template"]["spec"], other["spec"]["template"]["metadata"]) != setting
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_charts_own_labels_annotations_and_env_are_not_overridden() -> None:
    assert "is the chart's own label" in refused({"gateway": {"podLabels": {"app.kubernetes.io/component": "x"}}})
    assert "extraEnv: HOME is set by the chart" in refused({"engine": {"extraEnv": [{"name": "HOME", "value": "/"}]}})
    documents = render({"engine": {"podAnnotations": {"checksum/config": "mine"}}})
    annotations = named(documents, "Deployment", f"{RELEASE}-engine-0")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/config"] != "mine"


def test_affinity_and_spread_are_rendered_with_tpl() -> None:
    documents = render(VALUE_SETS["model-image"])
    for name in (f"{RELEASE}-gateway", f"{RELEASE}-engine-0"):
        term = pod(documents, name)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == {"app.kubernetes.io/instance": RELEASE}


def test_service_accounts_are_made_without_a_token_unless_asked() -> None:
    documents = render({})
    accounts = {a["metadata"]["name"]: a for a in of_kind(documents, "ServiceAccount")}
    assert set(accounts) == {f"{RELEASE}-gateway", f"{RELEASE}-engine", f"{RELEASE}-limits"}
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    assert pod(documents, f"{RELEASE}-gateway")["serviceAccountName"] == f"{RELEASE}-gateway"
    documents = render(VALUE_SETS["model-image"])
    assert [a["metadata"]["name"] for a in of_kind(documents, "ServiceAccount")] == [f"{RELEASE}-engine"]
    assert of_kind(documents, "ServiceAccount")[0]["metadata"]["annotations"] == {"corp.example/owner": "ml"}
    assert pod(documents, f"{RELEASE}-gateway")["serviceAccountName"] == "airlock-gateway-sa"
    documents = render({"engine": {"serviceAccount": {"create": False, "name": "",
                                                      "automountServiceAccountToken": True}}})
    assert pod(documents, f"{RELEASE}-engine-0")["serviceAccountName"] == "default"
    assert pod(documents, f"{RELEASE}-engine-0")["automountServiceAccountToken"] is True


def test_extra_objects_are_rendered_with_tpl() -> None:
    documents = render(VALUE_SETS["model-image"])
    note = named(documents, "ConfigMap", f"{RELEASE}-note")
    assert note["data"] == {"release": RELEASE}
    as_text = render({"extraObjects": ["apiVersion: v1\nkind: Secret\nmetadata:\n  name: '{{ .Release.Name }}-x'\n"
                                       "stringData: {a: b}\n"]})
    assert named(as_text, "Secret", f"{RELEASE}-x")["stringData"] == {"a": "b"}


def test_one_engine_budget_over_all_engines_never_blocks_a_drain_forever() -> None:
    documents = render({"engine": {"replicas": 3}})
    budget = named(documents, "PodDisruptionBudget", f"{RELEASE}-engine")["spec"]
    assert budget["maxUnavailable"] == 1 and budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # It selects every engine pod, across the three Deployments, and nothing else.
    assert budget["selector"]["matchLabels"] == {"app.kubernetes.io/name": "airlock",
                                                 "app.kubernetes.io/instance": RELEASE,
                                                 "app.kubernetes.io/component": "engine"}
    for index in range(3):
        labels = named(documents, "Deployment", f"{RELEASE}-engine-{index}")["spec"]["template"]["metadata"]["labels"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert not [b for b in of_kind(render({"engine": {"podDisruptionBudget": {"enabled": False, "maxUnavailable": 1}}}),
                                   "PodDisruptionBudget") if b["metadata"]["name"] == f"{RELEASE}-engine"]


# --- NetworkPolicy: DNS variants, the API's sources, extra rules -------------------------------------------------


def gateway_policy(values: dict[str, Any]) -> dict[str, Any]:
    policy: dict[str, Any] = named(render(values), "NetworkPolicy", f"{RELEASE}-gateway")["spec"]
    return policy


DNS_53 = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
OPENSHIFT_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}},
                 "podSelector": {"matchLabels": {"dns.operator.openshift.io/daemonset-dns": "default"}}}


@pytest.mark.parametrize(("dns", "rule"), [
    ({}, {"to": [KUBE_DNS], "ports": DNS_53}),
    # NodeLocal DNSCache answers on a link-local address of each node; kube-dns stays its upstream.
    ({"to": [{"ipBlock": {"cidr": NODELOCAL}}, KUBE_DNS]}, {"to": [{"ipBlock": {"cidr": NODELOCAL}}, KUBE_DNS],
                                                           "ports": DNS_53}),
    # OpenShift's DNS pods listen on 5353 (the Service maps 53 to it; policies see the pod's port).
    ({"to": [OPENSHIFT_DNS], "ports": [{"port": 5353, "protocol": "UDP"}, {"port": 5353, "protocol": "TCP"}]},
     {"to": [OPENSHIFT_DNS], "ports": [{"port": 5353, "protocol": "UDP"}, {"port": 5353, "protocol": "TCP"}]}),
    ({"enabled": False}, None),
])
def test_the_dns_rule_variants(dns: dict[str, Any], rule: dict[str, Any] | None) -> None:
    policy = gateway_policy({"networkPolicy": {"dns": dns}})
    dns_rules = [r for r in policy["egress"] if any(p.get("port") in (53, 5353) for p in r.get("ports", []))]
    assert dns_rules == ([rule] if rule else [])
    # Without a DNS rule only the engines and the limits server remain (no provider configured).
    assert len(policy["egress"]) == (3 if rule else 2)


def test_the_api_is_open_only_to_the_named_sources() -> None:
    (api,) = [r for r in gateway_policy({})["ingress"] if r["ports"] == [{"port": 8000, "protocol": "TCP"}]]
    assert api["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert "gatewayFrom" in refused({"networkPolicy": {"gatewayFrom": []}})
    anyone = [{"namespaceSelector": {}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]
    (api,) = [r for r in gateway_policy({"networkPolicy": {"gatewayFrom": anyone}})["ingress"]
              if r["ports"][0]["port"] == 8000]
    assert api["from"] == anyone


@pytest.mark.parametrize("component", ["gateway", "engine"])
def test_extra_ingress_and_egress_rules_are_added_to_each_policy(component: str) -> None:
    ingress = {"from": [{"podSelector": {"matchLabels": {"app": "{{ .Release.Name }}-probe"}}}],
               "ports": [{"port": 8100, "protocol": "TCP"}]}
    egress = {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    documents = render({"networkPolicy": {component: {"extraIngress": [ingress], "extraEgress": [egress]}}})
    policy = named(documents, "NetworkPolicy", f"{RELEASE}-{component}")["spec"]
    assert policy["ingress"][-1]["from"][0]["podSelector"]["matchLabels"] == {"app": f"{RELEASE}-probe"}
    assert policy["egress"][-1] == egress
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


# --- The schema -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "where"), [
    ({"imageRegistry": "registry.corp"}, "imageRegistry"),
    ({"extraObject": []}, "extraObject"),
    ({"gateway": {"serviceAccount": {"create": True, "name": "", "automountServiceAccountToken": False,
                                     "token": True}}}, "token"),
    ({"engine": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}}}, "maxUnavailable"),
    ({"engine": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": 1, "minAvailable": 1}}}, "minAvailable"),
    ({"engine": {"model": {"hostPath": "/models"}}}, "hostPath"),
    ({"engine": {"model": {"nfs": {"server": "a", "path": "/b"}}}}, "nfs"),
    ({"engine": {"model": {"persistence": {"accessModes": ["ReadAlways"]}}}}, "accessModes"),
    ({"engine": {"model": {"persistence": {"storageclass": "x"}}}}, "storageclass"),
    ({"engine": {"model": {"image": {"repository": "airlock/models/Qwen3-VL-8B-Instruct"}}}}, "repository"),
    ({"engine": {"model": {"image": {"delivery": "csi"}}}}, "delivery"),
    ({"engine": {"model": {"image": {"directory": "../etc"}}}}, "directory"),
    ({"engine": {"model": {"publicKey": {"file": "/k"}}}}, "file"),
    ({"engine": {"runtimeClassName": "NVIDIA"}}, "runtimeClassName"),
    ({"gateway": {"podLabels": {"a": 1}}}, "podLabels"),
    ({"gateway": {"extraEnv": [{"value": "x"}]}}, "name"),
    ({"networkPolicy": {"dns": {"ports": [{"port": 53, "protocol": "ICMP"}]}}}, "protocol"),
    ({"networkPolicy": {"dns": {"to": [{"ipBlock": {"cidr": "anywhere"}}]}}}, "cidr"),
    ({"networkPolicy": {"dns": {"to": [{"serviceSelector": {}}]}}}, "serviceSelector"),
    ({"networkPolicy": {"gateway": {"extraIngres": []}}}, "extraIngres"),
    ({"networkPolicy": {"gatewayFrom": []}}, "gatewayFrom"),
    ({"global": {"imagePullSecrets": [{"nme": "x"}]}}, "imagePullSecrets"),
])
def test_the_schema_refuses_unknown_keys_and_bad_new_values(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmError) as error:
        helm.Chart.load(CHART).validate_schema(merged(overrides))
    assert where in str(error.value)


# --- The README's Kubernetes examples, as typed --------------------------------------------------------------------


def readme_values() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML values example of the README's Kubernetes section: blocks whose first line names a values file."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### 3b. Kubernetes (Helm)"):readme.index("## Configuration")]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    found = [(block.splitlines()[0], yaml.safe_load(block)) for block in blocks
             if re.match(r"# [a-z0-9-]+-values\.yaml\n", block.lstrip() + "\n")]
    assert len(found) >= 4
    return found


def test_the_readme_helm_examples_render_as_typed() -> None:
    for title, values in readme_values():
        version = "1.34.0" if "imageVolume" in str(values) else KUBERNETES
        documents = render(values, kubernetes=version)
        for document in documents:
            if document["kind"] not in {"ServiceMonitor", "Certificate", "Issuer"}:
                kubernetes_validate.validate(document, version, strict=True)
        for workload, metadata, spec in pod_templates(documents):
            assert restricted_violations(metadata, spec, version) == [], (title, workload)


def test_the_readme_model_image_build_command_names_a_valid_reference() -> None:
    """OCI repository names are lowercase (podman refuses Qwen3-VL-8B-Instruct as a repository)."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"podman build (?:--network none )?-f deploy/containers/Containerfile\.model -t (\S+)",
                          readme)
    assert commands
    for reference in commands:
        repository = reference.rsplit(":", 1)[0]
        assert repository == repository.lower(), reference


def test_render_files_uses_the_kubernetes_version_asked() -> None:
    text = render_files({"extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "v"},
                                            "data": {"v": "{{ .Capabilities.KubeVersion.Version }}"}}]},
                        kubernetes="1.33.0")["airlock/templates/extra-objects.yaml"]
    assert "v1.33.0" in text


# --- Hostile values, long names -------------------------------------------------------------------------------------

# Each string a template writes unquoted (a name, a key, an image reference): a value with a newline, a quote or a
# brace must be refused by the schema, never change the manifest's structure. Found by setting every string value of
# the ci sets to each of these (the review of issue 18): these were accepted and broke or rewrote the YAML.
INJECTIONS = ["x\ninjected: 1", "x\n  injected: 1", "x', injected: '1", 'x", injected: "1', "x}, injected: {a: 1"]
NAMED_STRINGS: list[tuple[str, Any]] = [
    ("nameOverride", lambda v: {"nameOverride": v}),
    ("fullnameOverride", lambda v: {"fullnameOverride": v}),
    ("gateway.image.repository", lambda v: {"gateway": {"image": {"repository": v}}}),
    ("gateway.image.tag", lambda v: {"gateway": {"image": {"tag": v}}}),
    ("engine.image.repository", lambda v: {"engine": {"image": {"repository": v}}}),
    ("engine.image.tag", lambda v: {"engine": {"image": {"tag": v}}}),
    ("engine.model.image.tag", lambda v: {"engine": {"model": {"existingClaim": "", "image": {
        "repository": "airlock/models/m", "tag": v, "directory": "M"}}}}),
    ("engine.model.existingClaim", lambda v: {"engine": {"model": {"existingClaim": v}}}),
    ("engine.model.persistence.storageClass", lambda v: {"engine": {"model": {"existingClaim": "", "persistence": {
        "create": True, "storageClass": v}}}}),
    ("privacy.saltSecret.existingSecret", lambda v: {"privacy": {"saltSecret": {"existingSecret": v}}}),
    ("privacy.saltSecret.key", lambda v: {"privacy": {"saltSecret": {"key": v}}}),
    ("global.imagePullSecrets", lambda v: {"global": {"imagePullSecrets": [v]}}),
    ("imagePullSecrets[].name", lambda v: {"imagePullSecrets": [{"name": v}]}),
    ("gateway.podLabels", lambda v: {"gateway": {"podLabels": {"corp.example/team": v}}}),
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize(("where", "values"), NAMED_STRINGS, ids=[n for n, _ in NAMED_STRINGS])
def test_a_string_that_would_rewrite_the_manifest_is_refused(where: str, values: Any, value: str) -> None:
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).validate_schema(merged(values(value)))


@pytest.mark.parametrize(("where", "values"), NAMED_STRINGS, ids=[n for n, _ in NAMED_STRINGS])
def test_the_named_strings_still_take_ordinary_names(where: str, values: Any) -> None:
    ordinary = {"gateway.image.repository": "registry.corp:5000/airlock/gateway", "engine.image.tag": "0.1.0-rc.1_b2",
                "engine.model.persistence.storageClass": "-", "nameOverride": "corp-airlock-x1",
                "fullnameOverride": "corp-airlock-x1"}.get(where, "corp-airlock.x1")
    for document in render(values(ordinary)):
        if document["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_long_names_stay_within_the_kubernetes_limits() -> None:
    """A 63-character fullnameOverride, twelve engines, cert-manager: every Service name is a DNS label (63), every
    label value at most 63, and every certificate's commonName at most 64 characters (RFC 5280 ub-common-name;
    cert-manager's webhook refuses a longer one)."""
    long_name = "a" * 60 + "-zz"
    documents = render({"fullnameOverride": long_name, "engine": {"replicas": 12, "model": {
        "persistence": {"accessModes": ["ReadOnlyMany"]}}}, "tls": {"source": "certManager"}})
    for service in of_kind(documents, "Service"):
        assert len(service["metadata"]["name"]) <= 63, service["metadata"]["name"]
    for document in documents:
        labels = dict(document["metadata"].get("labels") or {})
        for _, metadata, _ in pod_templates([document]):
            labels |= metadata.get("labels") or {}
        assert all(len(str(value)) <= 63 for value in labels.values()), labels
    common_names = [c["spec"]["commonName"] for c in of_kind(documents, "Certificate")]
    assert len(common_names) == 12 + 2 + 3 + 1  # engines, gateway client and server, 3 CAs, the limits Service
    assert all(len(name) <= 64 for name in common_names), [n for n in common_names if len(n) > 64]
    assert len(set(common_names)) == len(common_names)


@pytest.mark.parametrize("name", ["AIRLOCK_ENGINE__VERIFY_MODEL", "airlock_engine__manifest_public_key",
                                  "Airlock_Gateway__Host"])
@pytest.mark.parametrize("component", ["gateway", "engine"])
def test_extra_env_cannot_override_the_settings_the_chart_writes(component: str, name: str) -> None:
    """Airlock reads AIRLOCK_* variables (pydantic-settings, case-insensitive) over its airlock.yaml
    (server/config.py, settings_customise_sources): one in extraEnv would silently undo what the chart set (the
    model check, the listening address, the certificates)."""
    message = refused({component: {"extraEnv": [{"name": name, "value": "off"}]}})
    assert f"{component}.extraEnv: {name}" in message and "AIRLOCK_" in message


@pytest.mark.parametrize("component", ["gateway", "engine"])
def test_topology_spread_without_a_selector_spreads_the_components_pods(component: str) -> None:
    """A constraint without labelSelector counts no pod at all (Kubernetes API, TopologySpreadConstraint: "used to
    find matching pods"), so it would silently spread nothing: the chart fills in the component's selector labels."""
    constraint = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    documents = render({component: {"topologySpreadConstraints": [constraint]}})
    name = f"{RELEASE}-engine-0" if component == "engine" else f"{RELEASE}-gateway"
    (rendered,) = pod(documents, name)["topologySpreadConstraints"]
    assert rendered == constraint | {"labelSelector": {"matchLabels": {
        "app.kubernetes.io/name": "airlock", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component}}}
    # One given is kept as it is.
    own = constraint | {"labelSelector": {"matchLabels": {"team": "ml"}}}
    assert pod(render({component: {"topologySpreadConstraints": [own]}}), name)["topologySpreadConstraints"] == [own]


def test_the_model_copy_is_counted_by_the_scheduler_and_survives_a_rerun() -> None:
    """An emptyDir's sizeLimit only evicts; the scheduler places pods by their ephemeral-storage requests (Kubernetes
    docs, "Local ephemeral storage"). The init container asks for copySizeLimit, so the pod's effective request
    (the larger of the init containers' and the sum of the app containers', "Init containers: resource sharing")
    holds the copy for the pod's life. A restarted pod runs its init containers again over the copy already there
    ("Init Containers", "Pod restart reasons"): -f replaces a read-only file instead of failing on it."""
    spec = pod(render(VALUE_SETS["model-image"]), f"{RELEASE}-engine-0")
    (init,) = spec["initContainers"]
    assert init["resources"]["requests"]["ephemeral-storage"] == "40Gi"
    assert "ephemeral-storage" not in init["resources"].get("limits", {})
    assert init["command"][:2] == ["cp", "-R"] and "-f" in init["command"]


# --- Peer lists that would open everything (newcomer review of issue 18) -------------------------------------------
# A NetworkPolicy rule with an empty or missing peer list matches every peer, and one with no ports every port
# (Kubernetes API, NetworkPolicyEgressRule.to / NetworkPolicyIngressRule.from / .ports: "If this field is empty or
# missing, this rule matches all destinations/sources/ports"). Every peer list the values hold is refused empty.

ANY_DESTINATION = [{"namespaceSelector": {}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]


@pytest.mark.parametrize(("overrides", "where"), [
    # {to: [], ports: [53]}: any server on port 53, a way out for data through DNS.
    ({"networkPolicy": {"dns": {"to": []}}}, "networkPolicy.dns.to"),
    ({"networkPolicy": {"dns": {"to": None}}}, "networkPolicy.dns.to"),
    ({"networkPolicy": {"dns": {"ports": []}}}, "networkPolicy.dns.ports"),
    # An empty peer is no peer (the API server refuses it; the schema says where).
    ({"networkPolicy": {"dns": {"to": [{}]}}}, "to"),
    ({"networkPolicy": {"gatewayFrom": [{}]}}, "gatewayFrom"),
    ({"networkPolicy": {"metricsFrom": [{}]}}, "metricsFrom"),
    # The identity provider's addresses on no port at all: every port.
    ({"networkPolicy": {"identityProvider": {"cidrs": ["10.20.0.5/32"], "ports": []}}}, "ports"),
    # Extra rules must name their peers; "anywhere" is written out (ANY_DESTINATION).
    ({"networkPolicy": {"gateway": {"extraEgress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}}}, "to"),
    ({"networkPolicy": {"engine": {"extraEgress": [{"to": [], "ports": [{"port": 443}]}]}}}, "to"),
    ({"networkPolicy": {"gateway": {"extraIngress": [{"ports": [{"port": 8000}]}]}}}, "from"),
    ({"networkPolicy": {"engine": {"extraIngress": [{"from": [{}]}]}}}, "from"),
])
def test_a_peer_list_that_would_match_everything_is_refused(overrides: dict[str, Any], where: str) -> None:
    assert where in refused(overrides)


def test_dns_may_name_no_peer_only_when_its_rule_is_off() -> None:
    policy = gateway_policy({"networkPolicy": {"dns": {"enabled": False, "to": [], "ports": []}}})
    assert all(rule["to"] for rule in policy["egress"]) and len(policy["egress"]) == 2  # engines, limits server


def test_an_extra_rule_to_anywhere_is_written_out() -> None:
    rule = {"to": ANY_DESTINATION, "ports": [{"port": 443, "protocol": "TCP"}]}
    assert gateway_policy({"networkPolicy": {"gateway": {"extraEgress": [rule]}}})["egress"][-1] == rule


# --- The README's Kubernetes steps make every object the example values name ---------------------------------------


def readme_value(title: str) -> dict[str, Any]:
    (values,) = [values for found, values in readme_values() if found.strip() == title]
    return values


def kubernetes_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("### 3b. Kubernetes (Helm)"):readme.index("## Configuration")]


def test_the_readme_creates_what_the_values_name_before_helm_install() -> None:
    section = kubernetes_section()
    install = section.index("helm install airlock")
    before = section[:install]
    values = readme_value("# airlock-values.yaml")
    commands = [
        "kubectl create namespace airlock",
        "kubectl label namespace airlock pod-security.kubernetes.io/enforce=restricted",
        # airlock keygen --out-public ~/airlock-signing.pub (section 1), under the key the values name.
        "kubectl -n airlock create configmap airlock-signer "
        f"--from-file={values['engine']['model']['publicKey']['key']}=$HOME/airlock-signing.pub",
        f"kubectl -n airlock create configmap {values['auth']['oidc']['caConfigMap']} --from-file=ca.crt=",
        f"kubectl -n airlock create secret tls {values['ingress']['tls']['secretName']} ",
        "podman push registry.internal.example/airlock/gateway:0.1.0",
        "podman push registry.internal.example/airlock/engine:0.1.0",
    ]
    for command in commands:
        assert command in before, command
    assert values["engine"]["model"]["publicKey"]["configMap"] == "airlock-signer"
    assert "airlock keygen --out-key ~/airlock-signing.key --out-public ~/airlock-signing.pub" in (
        ROOT / "README.md").read_text()
    # The namespace is made (and labelled) first, so helm must not be asked to make it.
    assert before.index("kubectl create namespace airlock") < before.index("kubectl -n airlock create")
    assert "--create-namespace" not in section[install:section.index("```", install)]
    # A claim of your own: the command that makes it, with the name the chart's default expects.
    assert "name: airlock-models" in before and "kind: PersistentVolumeClaim" in before


def test_the_readme_values_trust_the_ingress_controllers_forwarded_address() -> None:
    """Behind the Ingress every connection comes from a controller pod: without trusted_proxies (and
    tls_terminated_by_proxy, which makes the gateway read X-Forwarded-For: server/runner.py) failed sign-ins would
    be counted per controller pod, not per client."""
    values = readme_value("# airlock-values.yaml")
    gateway = values["gateway"]["settings"]["gateway"]
    assert gateway["tls_terminated_by_proxy"] is True and gateway["trusted_proxies"]
    documents = render(values)
    settings = yaml.safe_load(named(documents, "ConfigMap", f"{RELEASE}-gateway")["data"]["airlock.yaml"])
    loaded = Settings.model_validate(settings)
    assert loaded.gateway.trusted_proxies == gateway["trusted_proxies"] and loaded.gateway.tls.enabled
    example = kubernetes_section()
    assert "CHANGE" in example[example.index("trusted_proxies"):][:200]


def test_the_readme_says_where_the_cpu_engine_image_belongs_and_openshift_scrapes_from_its_namespace() -> None:
    section = kubernetes_section()
    assert "Containerfile.engine-cpu" in section[section.index("2. The model"):]
    values = readme_value("# openshift-values.yaml")
    assert values["networkPolicy"]["metricsFrom"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "openshift-user-workload-monitoring"}}}]


@pytest.mark.parametrize(("settings", "path", "instead"), [
    ({"gateway": {"port": 8443}}, "gateway.port", "8000 in the pod"),
    ({"gateway": {"tls": {"cert_file": "/x.crt"}}}, "gateway.tls.cert_file", "tls.gateway"),
    ({"upstreams": [{"url": "https://elsewhere:8100"}]}, "upstreams", "engine.replicas"),
    ({"privacy": {"tenant": "shared"}}, "privacy.tenant", "privacy.tenant"),
    ({"auth": {"local_groups": {"ops": ["alice"]}}}, "auth.local_groups.ops", "auth.localGroups"),
    ({"engine": {"max_num_seqs": 8}}, "engine.max_num_seqs", "engine.maxNumSeqs"),
])
def test_every_gateway_setting_the_chart_writes_is_refused_in_gateway_settings(settings: dict[str, Any], path: str,
                                                                               instead: str) -> None:
    """The chart's airlock.yaml wins over gateway.settings (mustMergeOverwrite): a setting in both would be lost."""
    message = refused({"gateway": {"settings": settings}, "engine": {"maxNumSeqs": 16},
                       "auth": {"localGroups": {"ops": ["bob"]}}})
    assert f"gateway.settings.{path} is set by the chart from" in message and instead in message


def test_gateway_settings_the_chart_leaves_alone_are_merged() -> None:
    values = {"gateway": {"settings": {"gateway": {"read_timeout_s": 900}, "auth": {"realm": "Corp"},
                                       "screening": {"max_tokens_limit": 2048}}}}
    settings = yaml.safe_load(named(render(values), "ConfigMap", f"{RELEASE}-gateway")["data"]["airlock.yaml"])
    assert settings["gateway"]["read_timeout_s"] == 900 and settings["gateway"]["port"] == 8000
    assert settings["auth"]["realm"] == "Corp" and settings["screening"]["max_tokens_limit"] == 2048
