"""The chart's gateway memory holds the document render workers (rendered by the real Helm engine, helpers in
test_helm_chart.py): the default resources follow the arithmetic in values.yaml, and a memory limit that cannot hold
documents.workers x documents.worker_memory_mib plus the gateway itself is refused, in every quantity form
Kubernetes takes."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from server.config import DocumentSettings

from .test_helm_chart import RELEASE, named, render

MIB = 1024 * 1024
# What the chart counts for the gateway process itself (helm/airlock/templates/_helpers.tpl, checkGatewayMemory).
GATEWAY_OWN_MIB = 512


def gateway_resources(values: dict[str, Any]) -> dict[str, Any]:
    (container,) = named(render(values), "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["containers"]
    resources: dict[str, Any] = container["resources"]
    return resources


def with_limit(memory: object, documents: dict[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {"gateway": {"resources": {"limits": {"cpu": "2", "memory": memory}}}}
    if documents is not None:
        values["gateway"]["settings"] = {"documents": documents}
    return values


def refusal(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as refused:
        render(values)
    return str(refused.value)


def test_the_default_resources_hold_the_default_workers_as_values_yaml_works_it_out() -> None:
    defaults = DocumentSettings()
    resources = gateway_resources({})
    # values.yaml: request 512Mi + 2 workers x 256Mi = 1Gi; limit 2Gi + 2 workers x 1Gi (their RLIMIT_AS) = 4Gi.
    assert resources["requests"]["memory"] == f"{(512 + defaults.workers * 256) // 1024}Gi" == "1Gi"
    assert resources["limits"]["memory"] == f"{2 + defaults.workers * defaults.worker_memory_mib // 1024}Gi" == "4Gi"


def test_the_chart_counts_airlocks_own_document_defaults() -> None:
    """Unset, the chart takes DocumentSettings' defaults: the limit that holds them exactly passes, a MiB less not."""
    defaults = DocumentSettings()
    need = defaults.workers * defaults.worker_memory_mib + GATEWAY_OWN_MIB
    assert gateway_resources(with_limit(f"{need}Mi"))["limits"]["memory"] == f"{need}Mi"
    message = refusal(with_limit(f"{need - 1}Mi"))
    assert (f"gateway.resources.limits.memory ({need - 1}Mi) cannot hold the document render workers: "
            f"gateway.settings.documents.workers ({defaults.workers}) x documents.worker_memory_mib "
            f"({defaults.worker_memory_mib} MiB, each worker's address-space limit) + {GATEWAY_OWN_MIB} MiB for the "
            f"gateway itself = {need} MiB") in message
    assert "kill the whole container" in message


@pytest.mark.parametrize(("memory", "documents", "holds"), [
    # 4 workers x 1024 + 512 = 4,608 MiB: the default 4Gi is too little.
    ("4Gi", {"workers": 4}, False),
    ("4608Mi", {"workers": 4}, True),
    ("4.5Gi", {"workers": 4}, True),
    # 2 x 768 + 512 = 2,048 MiB.
    ("2Gi", {"worker_memory_mib": 768}, True),
    ("2047Mi", {"worker_memory_mib": 768}, False),
    # Powers of 1000: 2,147,483,648 bytes is 2,048 MiB; 2.1G (2,002.7 MiB) is not.
    ("2147483648", {"worker_memory_mib": 768}, True),
    (2147483648, {"worker_memory_mib": 768}, True),
    (2147483647, {"worker_memory_mib": 768}, False),
    ("2.1G", {"worker_memory_mib": 768}, False),
    ("2200M", {"worker_memory_mib": 768}, True),
    ("2147484k", {"worker_memory_mib": 768}, True),
    ("2097152k", {"worker_memory_mib": 768}, False),
    ("2097152Ki", {"worker_memory_mib": 768}, True),
    ("2097151Ki", {"worker_memory_mib": 768}, False),
    # One large worker: 1 x 3072 + 512.
    ("3.5Gi", {"workers": 1, "worker_memory_mib": 3072}, True),
    ("3Gi", {"workers": 1, "worker_memory_mib": 3072}, False),
    # Documents off: no worker runs, any limit will do.
    ("256Mi", {"enabled": False, "workers": 64}, True),
])
def test_a_limit_is_checked_against_the_workers_in_every_quantity_form(memory: object, documents: dict[str, Any],
                                                                       holds: bool) -> None:
    values = with_limit(memory, documents)
    if holds:
        assert gateway_resources(values)["limits"]["memory"] == memory
    else:
        assert "cannot hold the document render workers" in refusal(values)


def test_the_gateway_always_has_a_memory_limit_to_check() -> None:
    """values.schema.json requires gateway.resources.limits.memory: the check above always applies."""
    values = {"gateway": {"resources": {"limits": {"memory": None}}, "settings": {"documents": {"workers": 64}}}}
    assert "missing property 'memory'" in refusal(values)
