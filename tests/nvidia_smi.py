"""nvidia-smi as recorded, for tests on this machine, which has no GPU (the one fake in the GPU tests).

tests/data/nvidia-smi/<host>.txt is what `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free,compute_cap
--format=csv,noheader,nounits` prints on that host, <host>.L.txt what `nvidia-smi -L` prints, and
<host>.no-compute-cap.txt the query without compute_cap (asked only after a driver rejected that field). The files
follow, byte for byte, the format of public outputs (vLLM, NVIDIA and other projects' issues: the MIG listing from
NVIDIA/nvidia-container-toolkit#203 and DataDog/datadog-agent#33120, the permission errors inside a MIG container from
Stability-AI/StableSwarmUI#388, the old driver's refusal from huggingface/candle#733, the failing driver's message);
memory totals are the figures sizing's card table uses; UUIDs are made up. Cards (one GPU each): rtx-3060, rtx-a4000,
t4, v100-sxm2-32gb, l4, a10g, a10, rtx-4090, rtx-a5000, rtx-a6000, l40s, a100-sxm4-40gb, a100-sxm4-80gb,
h100-80gb-hbm3. Hosts: two-l4, h100x8, a100-80gb-mig (a container given a 3g.40gb and a 1g.10gb slice),
a100-80gb-mig-host (bare metal: GPU 0 in MIG mode, GPU 1 whole), old-driver (T4 on R470), no-driver.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).parent / "data" / "nvidia-smi"

CARDS = ("rtx-3060", "rtx-a4000", "t4", "v100-sxm2-32gb", "l4", "a10g", "a10", "rtx-4090", "rtx-a5000", "rtx-a6000",
         "l40s", "a100-sxm4-40gb", "a100-sxm4-80gb", "h100-80gb-hbm3")

# The command lines Airlock may run, spelled out here (not taken from server.gpus) so the tests check them.
_RECORDINGS = {
    ("nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free,compute_cap",
     "--format=csv,noheader,nounits"): ".txt",
    ("nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free", "--format=csv,noheader,nounits"):
        ".no-compute-cap.txt",
    ("nvidia-smi", "-L"): ".L.txt",
}


def recorded(host: str, calls: list[list[str]] | None = None) -> Callable[[list[str]], str]:
    """A `run` for server.gpus.discover_gpus answering from the host's recordings (and noting each call)."""

    def run(argv: list[str]) -> str:
        if calls is not None:
            calls.append(list(argv))
        suffix = _RECORDINGS.get(tuple(argv))
        assert suffix is not None, f"unexpected nvidia-smi command line: {argv}"
        return (DATA / f"{host}{suffix}").read_text()

    return run


def fake_nvidia_smi(directory: Path, host: str, exit_status: int = 0, sleep_s: float = 0) -> None:
    """An executable named nvidia-smi in ``directory`` printing the host's recordings, for the real subprocess path
    (put ``directory`` first on PATH)."""
    script = directory / "nvidia-smi"
    sleep, cat = shutil.which("sleep"), shutil.which("cat")  # PATH will hold only the fake
    hang = f"exec {sleep} {sleep_s}\n" if sleep_s else ""  # exec: the timeout's kill ends it, no orphan
    script.write_text(
        "#!/bin/sh\n"
        f"{hang}"
        f'case "$1" in -L) f="{DATA}/{host}.L.txt";; *compute_cap*) f="{DATA}/{host}.txt";; '
        f'*) f="{DATA}/{host}.no-compute-cap.txt";; esac\n'
        f'{cat} "$f"; exit {exit_status}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
