"""The Pod Security Standards' "restricted" profile, as a checker over rendered pod templates.

Why here: no well-kept Python, npm or Debian tool checks manifests against the Pod Security Standards offline (the
reference implementation is the Go package k8s.io/pod-security-admission, which would need a Go build step; checkov
and kube-linter check their own rule sets, not the standard's). Each rule below is one control of
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (restricted includes baseline), as it stands for
Kubernetes v1.30, with the field paths the document lists. The changes of later versions are modelled by `version`
(the cluster's; the reference implementation k8s.io/pod-security-admission/policy gates each check by version), since
the chart can render for newer clusters: SELinux type container_engine_t allowed from v1.31 (check_seLinuxOptions.go),
sysctls net.ipv4.tcp_rmem and tcp_wmem from v1.32 (check_sysctls.go, sysctlsAllowedV1Dot32), `image` volumes allowed
by restricted from v1.33 (kubernetes/kubernetes PR #130394, "Allow ImageVolume for Restricted PSA profiles"), and the
baseline control "Host Probes / Lifecycle Hooks" from v1.34 (check_hostProbesAndhostLifecycle.go: no `host` in a
probe's or lifecycle handler's httpGet or tcpSocket). Windows-only and optional controls that the chart never sets are
still checked (hostProcess, AppArmor, SELinux, procMount, sysctls), so an extraVolumes or podAnnotations value cannot
sneak one in. Where a later version only relaxes a control for pods the chart never renders (v1.35's procMount for
user-namespaced pods), the stricter rule stays.
"""

from __future__ import annotations

from typing import Any

# Baseline "Capabilities": what may be added at all (the default set of container runtimes).
BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
# Baseline "Sysctls": the safe set (v1.29 added the tcp_keepalive/fin_timeout ones).
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes"})
SAFE_SYSCTLS_1_32 = SAFE_SYSCTLS | {"net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}
# Baseline "SELinux": the types a container may ask for (container_engine_t from v1.31).
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
SELINUX_TYPES_1_31 = SELINUX_TYPES | {"container_engine_t"}
# Restricted "Volume Types": the only volume sources allowed (plus `image` from v1.33, see the module docstring).
RESTRICTED_VOLUMES = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"})


def _minor(version: str) -> int:
    major, minor = version.lstrip("v").split(".")[:2]
    assert major == "1"
    return int(minor)


def restricted_violations(metadata: dict[str, Any], spec: dict[str, Any], version: str = "1.30") -> list[str]:
    """Every restricted-profile rule the pod (its template's metadata and spec) breaks, by control name; [] if none."""
    problems: list[str] = []
    pod_security = spec.get("securityContext") or {}
    containers = [*spec.get("containers", []), *spec.get("initContainers", []), *spec.get("ephemeralContainers", [])]
    contexts = [(c["name"], c.get("securityContext") or {}) for c in containers]
    annotations = metadata.get("annotations") or {}

    # Baseline, HostProcess: spec.securityContext.windowsOptions.hostProcess and the containers' (false or unset).
    for where, context in [("pod", pod_security), *contexts]:
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"HostProcess: {where}")
    # Baseline, Host Namespaces: spec.hostNetwork, spec.hostPID, spec.hostIPC (false or unset).
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"Host Namespaces: {field}")
    for name, context in contexts:
        # Baseline, Privileged Containers: securityContext.privileged (false or unset).
        if context.get("privileged"):
            problems.append(f"Privileged Containers: {name}")
        # Baseline, Capabilities: capabilities.add within the default set. Restricted, Capabilities: drop must
        # include ALL, add at most NET_BIND_SERVICE.
        capabilities = context.get("capabilities") or {}
        added = set(capabilities.get("add") or [])
        if added - BASELINE_CAPABILITIES or added - {"NET_BIND_SERVICE"}:
            problems.append(f"Capabilities: {name} adds {sorted(added)}")
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"Capabilities: {name} does not drop ALL")
        # Baseline, /proc Mount Type: procMount Default or unset.
        if context.get("procMount", "Default") != "Default":
            problems.append(f"/proc Mount Type: {name}")
        # Restricted, Privilege Escalation: allowPrivilegeEscalation must be false (v1.8+).
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"Privilege Escalation: {name}")
    # Baseline, Host Ports: ports[*].hostPort (0 or unset).
    for container in containers:
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"Host Ports: {container['name']}")
    # Baseline, AppArmor: appArmorProfile.type (pod and containers) and the beta annotations: RuntimeDefault,
    # Localhost or unset.
    for where, context in [("pod", pod_security), *contexts]:
        if (context.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"AppArmor: {where}")
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            problems.append(f"AppArmor: annotation {key}")
    # Baseline, SELinux: seLinuxOptions.type within the allowed types; user and role unset.
    selinux_types = SELINUX_TYPES_1_31 if _minor(version) >= 31 else SELINUX_TYPES
    for where, context in [("pod", pod_security), *contexts]:
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in selinux_types or options.get("user") or options.get("role"):
            problems.append(f"SELinux: {where}")
    # Baseline, Sysctls: spec.securityContext.sysctls[*].name within the safe set.
    for sysctl in pod_security.get("sysctls") or []:
        if sysctl["name"] not in (SAFE_SYSCTLS_1_32 if _minor(version) >= 32 else SAFE_SYSCTLS):
            problems.append(f"Sysctls: {sysctl['name']}")
    # Baseline, Host Probes / Lifecycle Hooks (v1.34+): no host in a probe's or a lifecycle handler's httpGet or
    # tcpSocket ("" or unset), which would let the kubelet reach another host for the pod.
    if _minor(version) >= 34:
        for container in containers:
            handlers = [container.get(probe) or {} for probe in ("livenessProbe", "readinessProbe", "startupProbe")]
            handlers += [(container.get("lifecycle") or {}).get(hook) or {} for hook in ("postStart", "preStop")]
            if any((handler.get(action) or {}).get("host") for handler in handlers
                   for action in ("httpGet", "tcpSocket")):
                problems.append(f"Host Probes / Lifecycle Hooks: {container['name']}")
    # Baseline, HostPath Volumes and restricted, Volume Types: only the listed sources.
    allowed = RESTRICTED_VOLUMES | ({"image"} if _minor(version) >= 33 else set())
    for volume in spec.get("volumes", []):
        sources = set(volume) - {"name"}
        if not sources <= allowed:
            problems.append(f"Volume Types: {volume['name']} uses {sorted(sources - allowed)}")
    # Restricted, Running as Non-root: runAsNonRoot true on the pod, or on every container; never false.
    pod_non_root = pod_security.get("runAsNonRoot")
    for name, context in contexts:
        own = context.get("runAsNonRoot")
        if own is False or (own is None and pod_non_root is not True):
            problems.append(f"Running as Non-root: {name}")
    # Restricted, Running as Non-root user (v1.23+): runAsUser never 0.
    for where, context in [("pod", pod_security), *contexts]:
        if context.get("runAsUser") == 0:
            problems.append(f"Running as Non-root user: {where}")
    # Restricted, Seccomp (v1.19+): RuntimeDefault or Localhost on the pod, or on every container; never Unconfined.
    pod_seccomp = (pod_security.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in {None, "RuntimeDefault", "Localhost"}:
        problems.append("Seccomp: pod")
    for name, context in contexts:
        own = (context.get("seccompProfile") or {}).get("type")
        if own not in {None, "RuntimeDefault", "Localhost"} or (own is None and pod_seccomp is None):
            problems.append(f"Seccomp: {name}")
    return problems


def pod_templates(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, template metadata, pod spec) of every workload rendered: pods, and templates in controllers."""
    found = []
    for document in documents:
        name = f"{document['kind']}/{document['metadata']['name']}"
        if document["kind"] == "Pod":
            found.append((name, document["metadata"], document["spec"]))
        elif document["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            template = document["spec"]["template"]
            found.append((name, template.get("metadata") or {}, template["spec"]))
        elif document["kind"] == "CronJob":
            template = document["spec"]["jobTemplate"]["spec"]["template"]
            found.append((name, template.get("metadata") or {}, template["spec"]))
    return found
