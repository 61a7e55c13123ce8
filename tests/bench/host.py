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


def stolen_s(cores: set[int] | None) -> float:
    """Seconds the hypervisor has taken from ``cores`` (None: every core) since boot, summed over them; 0 where the
    kernel does not count steal (bare metal, other systems)."""
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = range(len(per_cpu)) if cores is None else [core for core in cores if core < len(per_cpu)]
    return sum(float(getattr(per_cpu[core], "steal", 0.0)) for core in chosen)


def core_count(cores: set[int] | None) -> int:
    """How many cores ``cores`` names (None: every core), to turn ``stolen_s`` into a share of their time."""
    return len(psutil.cpu_times(percpu=True)) if cores is None else len(cores)


def cpu_model() -> str:
    """The processor's name as the kernel reports it (/proc/cpuinfo's "model name"; else ``platform``'s answer): the
    same guest has run on an AMD EPYC host one day and an Intel Xeon at 2.0 GHz another, with the gateway's CPU a
    chunk twice as high on the latter, so every printed figure says which."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
