"""What the host (the hypervisor, on a virtual machine) takes from this machine's cores.

A virtual machine's cores are lent by the hypervisor: while it runs another guest on one, whatever this guest had
there stands still, and Linux counts that time per core as "steal" (/proc/stat, psutil's per-CPU ``steal``). The
benchmarks print it next to latency and CPU figures: on this project's 2-core development machine it ranged from 2%
to 44% of a core within one hour, and the same work's added TTFT p99 followed it from a few ms to a third of a
second (README, Performance, "The host's share").
"""

from __future__ import annotations

import platform
from pathlib import Path

import psutil


def _chosen(cores: set[int] | None, present: int) -> list[int]:
    """The cores of ``cores`` (None or empty: every core) that psutil's per-CPU list has."""
    return [core for core in sorted(cores) if core < present] if cores else list(range(present))


def stolen_s(cores: set[int] | None) -> float:
    """Seconds the hypervisor has taken from ``cores`` (None or empty: every core) since boot, summed over them; 0
    where the kernel does not count steal (bare metal, other systems), which the reports then show as 0%."""
    per_cpu = psutil.cpu_times(percpu=True)
    return sum(float(getattr(per_cpu[core], "steal", 0.0)) for core in _chosen(cores, len(per_cpu)))


def core_count(cores: set[int] | None) -> int:
    """How many cores ``stolen_s(cores)`` sums over, to turn it into a share of their time (at least 1)."""
    return max(1, len(_chosen(cores, len(psutil.cpu_times(percpu=True)))))


def cpu_model() -> str:
    """The processor's name as the kernel reports it (/proc/cpuinfo's "model name"; else ``platform``'s answer): the
    same guest has run on an AMD EPYC host one day and an Intel Xeon at 2.0 GHz another, with the gateway's CPU a
    chunk twice as high on the latter, so every printed figure says which."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    # A virtual machine's name can be as plain as "Intel(R) Xeon(R) Processor": its clock tells two hosts apart.
    return f"{model}, {float(fields['cpu MHz']):.0f} MHz" if fields.get("cpu MHz") else model
