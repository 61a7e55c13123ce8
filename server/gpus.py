"""Which NVIDIA GPUs this host gives Airlock, and which replica runs on which of them.

What decides the GPUs, in order:

- **The container runtime.** Kubernetes' NVIDIA device plugin hands a pod the GPUs (or MIG slices) it was granted
  through ``NVIDIA_VISIBLE_DEVICES``, and NVIDIA's container runtime mounts only those devices into the container.
  ``nvidia-smi`` inside the container lists only them, numbered from 0: the indices it shows are the ones to use,
  and Airlock never reads ``NVIDIA_VISIBLE_DEVICES`` itself.
- **An existing ``CUDA_VISIBLE_DEVICES``** (GPUs reserved for others on a shared host). ``nvidia-smi`` ignores it
  (it talks to the driver through NVML, which CUDA's variable does not touch), so Airlock keeps only the devices it
  names, in its order: indices, ``GPU-`` UUIDs or unique prefixes of them, ``MIG-`` UUIDs. Each kept device's
  ``device`` is the name that variable used (a prefix is completed to the full UUID: vLLM 0.32 looks UUIDs up
  exactly, ``platforms/cuda.py`` ``NvmlCudaPlatform.device_control_id_to_physical_device_id``), so a replica's own
  ``CUDA_VISIBLE_DEVICES`` names the same physical GPU. As in CUDA, a negative index ends the list; empty, ``-1``,
  ``none`` or ``void`` (the spellings of NVIDIA's container runtime) mean no GPU. An entry that names nothing is a
  ``ConfigError``, where CUDA would silently hide it and every device after it.
- **MIG.** A GPU in MIG mode is not usable whole; each MIG slice listed by ``nvidia-smi -L`` is a device of its own,
  named by its ``MIG-`` UUID (what ``CUDA_VISIBLE_DEVICES`` takes). Inside a MIG container the driver will not say
  the memory ("[Insufficient Permissions]", NVIDIA/nvidia-container-toolkit#842, Stability-AI/StableSwarmUI#388), so a
  slice's memory comes from its profile name (``MIG_PROFILE_MIB``) and its free memory is ``None``.

Indices are nvidia-smi's, in PCI bus order; vLLM reads ``CUDA_VISIBLE_DEVICES`` indices as NVML (PCI) indices too
(``platforms/cuda.py``: "NVML is not affected by CUDA_VISIBLE_DEVICES"), while CUDA itself numbers fastest-first
unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: on a host with different GPU models, set that for the engines.

Log lines name only counts, GPU model names and memory figures: never UUIDs.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import ConfigError

log = logging.getLogger(__name__)

Run = Callable[[list[str]], str]

NVIDIA_SMI = "nvidia-smi"
# nvidia-smi can hang for minutes when the driver is wedged; the launcher must not.
NVIDIA_SMI_TIMEOUT_S = 15.0
QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "memory.free", "compute_cap")
# Fields a driver may not know: compute_cap arrived with R510 ('Field "compute_cap" is not a valid field to query.'
# from 470, huggingface/candle#733); without it the capability comes from the card's name.
OPTIONAL_FIELDS = frozenset({"compute_cap"})
_INVALID_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query')
# `nvidia-smi -L`:  "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-...)" then, per slice,
# "  MIG 3g.40gb     Device  0: (UUID: MIG-...)" (drivers >= R470; older ones print MIG-GPU-<uuid>/<gi>/<ci>).
_LIST_GPU = re.compile(r"^GPU \d+: .* \(UUID: (GPU-[^)\s]+)\)\s*$")
_LIST_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)\s]+)\)\s*$")

# Compute capability by model name, for drivers without compute_cap (NVIDIA's CUDA GPUs list,
# developer.nvidia.com/cuda-gpus). First match wins; the patterns are whole words, so A100 is not A10 and L40S not L4.
_CAPABILITY_BY_NAME: tuple[tuple[re.Pattern[str], tuple[int, int]], ...] = (
    (re.compile(r"\bT4\b"), (7, 5)),
    (re.compile(r"\bV100\b"), (7, 0)),
    (re.compile(r"\bA100\b|\bA30\b"), (8, 0)),
    (re.compile(r"\bA10G?\b|\bA40\b|\bRTX A\d{4}\b|\bRTX 30\d0\b"), (8, 6)),
    (re.compile(r"\bL4\b|\bL40S?\b|\bRTX 40\d0\b|\bRTX \d{4} Ada\b"), (8, 9)),
    (re.compile(r"\bG?H100\b|\bG?H200\b"), (9, 0)),
)

# Memory of a MIG slice by profile, MiB: what `nvidia-smi mig -lgip` prints (GiB, two decimals) x 1024, the smallest
# across the cards that share a profile name and the drivers seen (7g.80gb: 78.50 to 79.00 GiB by driver).
# Sources: A100-SXM4-40GB from NVIDIA's MIG user guide ("List GPU Instance Profiles"; 1g.5gb = 4864 MiB also in
# IDSIA/sacred#864); A100-SXM4-80GB from public -lgip outputs (2g.20gb = 19968 MiB also in XuehaiPan/nvitop#8);
# H100 80GB (jbarrow.ai/field_notes/nvidia-mig), H100 NVL (NVIDIA/gpu-operator#903), H200 (NVIDIA/mig-parted#120),
# GH200 (NVIDIA/mig-parted#139), B200 (NVIDIA/mig-parted#187), GB200 (NVIDIA/gpu-operator#1303).
_GIB = 1024
MIG_PROFILE_MIB: dict[str, int] = {
    "1g.5gb": int(4.75 * _GIB),     # A100 40GB
    "1g.10gb": int(9.50 * _GIB),    # A100 80GB 9.50, A100 40GB and H100 9.75
    "2g.10gb": int(9.75 * _GIB),    # A100 40GB
    "3g.20gb": int(19.62 * _GIB),   # A100 40GB
    "4g.20gb": int(19.62 * _GIB),   # A100 40GB
    "7g.40gb": int(39.50 * _GIB),   # A100 40GB
    "1g.20gb": int(19.50 * _GIB),   # A100 80GB 19.50, H100 19.62
    "2g.20gb": int(19.50 * _GIB),   # A100 80GB 19.50, H100 19.62
    "3g.40gb": int(39.25 * _GIB),   # A100 80GB 39.25, H100 39.50
    "4g.40gb": int(39.25 * _GIB),   # A100 80GB 39.25, H100 39.50
    "7g.80gb": int(78.50 * _GIB),   # A100 80GB 78.50-79.00, H100 79.25
    "1g.12gb": int(10.75 * _GIB),   # H100 NVL
    "1g.24gb": int(20.00 * _GIB),   # GB200 20.00, H100 NVL 21.62
    "2g.24gb": int(21.62 * _GIB),   # H100 NVL
    "1g.18gb": int(16.00 * _GIB),   # H200 16.00, GH200 17.50
    "1g.35gb": int(32.25 * _GIB),   # H200
    "3g.71gb": int(69.50 * _GIB),   # H200
    "4g.71gb": int(69.50 * _GIB),   # H200
    "7g.141gb": int(139.75 * _GIB),  # H200
    "1g.36gb": int(35.25 * _GIB),   # GH200
    "2g.36gb": int(35.25 * _GIB),   # GH200
    "1g.23gb": int(20.50 * _GIB),   # B200
    "1g.45gb": int(44.25 * _GIB),   # B200
    "2g.45gb": int(44.25 * _GIB),   # B200
    "1g.47gb": int(45.50 * _GIB),   # GB200
    "2g.47gb": int(45.50 * _GIB),   # GB200
}
# A profile not in the table: its nominal size ("3g.40gb": 40) x this, in GiB. Below every ratio in the table (the
# lowest is GB200's 1g.24gb, 20.00 GiB of a nominal 24), so a new card is never thought to hold more than it does.
MIG_UNKNOWN_PROFILE_FRACTION = 0.8
_PROFILE_SIZE = re.compile(r"(\d+)gb$")


@dataclass(frozen=True)
class Gpu:
    """One device a replica can be given: a whole GPU or a MIG slice."""

    device: str            # how CUDA_VISIBLE_DEVICES names it: "0", "GPU-<uuid>" or "MIG-<uuid>"
    name: str              # e.g. "NVIDIA L4", "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    total_mib: int
    free_mib: int | None   # None where the driver will not say (MIG in a container)
    compute_capability: tuple[int, int] | None

    @property
    def is_mig(self) -> bool:
        return self.device.startswith("MIG-")


class GpuList(list[Gpu]):
    """The devices Airlock may use, and how many more the host has that CUDA_VISIBLE_DEVICES left out."""

    hidden_by_cuda_visible_devices: int = 0


@dataclass(frozen=True)
class _HostDevice:
    """A usable device as nvidia-smi lists it, before CUDA_VISIBLE_DEVICES picks."""

    index: int             # nvidia-smi's index of the GPU (a MIG slice's: its parent's)
    uuid: str              # GPU-... or MIG-...
    parent_uuid: str       # the whole GPU's UUID (its own for a whole GPU)
    gpu: Gpu


def run_nvidia_smi(argv: list[str]) -> str:
    """Run nvidia-smi and return what it printed; it prints its errors on stdout too, with a non-zero status."""
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(argv[0])
    return subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False).stdout


def discover_gpus(environ: Mapping[str, str], run: Run | None = None) -> GpuList:
    """The GPUs (and MIG slices) this process may use, in the order replicas take them; empty without a driver.

    ``run`` runs an nvidia-smi command line and returns its output (tests pass recorded outputs). Raises
    ``ConfigError`` when ``CUDA_VISIBLE_DEVICES`` names a device nvidia-smi does not list, or a GPU in MIG mode.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() in ("", "-1", "none", "void"):
        # Said out loud: on a GPU host this usually means a mistake (engine.device auto then runs on CPU).
        log.warning("CUDA_VISIBLE_DEVICES gives this process no GPU")
        return GpuList()
    try:
        host = _host_devices(run or run_nvidia_smi)
    except (OSError, subprocess.SubprocessError) as exc:
        # No nvidia-smi, or it hung: no GPU to use (the type name only: the message may carry paths).
        log.info("nvidia-smi unavailable (%s): no GPU", type(exc).__name__)
        return GpuList()
    gpus = GpuList(device.gpu for device in host) if visible is None or not host else _select(host, visible)
    if visible is not None:
        gpus.hidden_by_cuda_visible_devices = len(host) - len(gpus)
    for gpu in gpus:
        log.info("GPU: %s, %d MiB%s", gpu.name, gpu.total_mib,
                 "" if gpu.free_mib is None else f" ({gpu.free_mib} MiB free)")
    if gpus.hidden_by_cuda_visible_devices:
        log.info("CUDA_VISIBLE_DEVICES leaves out %d of the host's %d GPU devices",
                 gpus.hidden_by_cuda_visible_devices, len(host))
    return gpus


def place_replicas(gpus: list[Gpu], replicas: int, tensor_parallel_size: int) -> list[list[Gpu]]:
    """Give each replica its own ``tensor_parallel_size`` devices: replica i takes the i-th run of them.

    No device serves two replicas. A group may mix GPU models or sizes; sizing then plans for its smallest member,
    as vLLM does (every rank holds an equal shard, and ``v1/core/kv_cache_utils.py`` ``get_kv_cache_configs`` gives
    every worker the number of KV cache blocks of the one with the least memory).

    Tensor parallelism over MIG slices is refused: a CUDA process enumerates at most one MIG device, and MIG mode has
    no GPU-to-GPU peer traffic over PCIe or NVLink (NVIDIA MIG user guide, "CUDA Device Enumeration" and "Deployment
    Considerations"), so NCCL, which vLLM's tensor parallelism runs on, cannot span slices; one replica per slice
    works.
    """
    if replicas < 1 or tensor_parallel_size < 1:
        raise ConfigError("engine.replicas and engine.tensor_parallel_size must be at least 1")
    needed = replicas * tensor_parallel_size
    if len(gpus) < needed:
        hidden = gpus.hidden_by_cuda_visible_devices if isinstance(gpus, GpuList) else 0
        limited = f" (CUDA_VISIBLE_DEVICES hides {hidden} more on this host)" if hidden else ""
        raise ConfigError(
            f"engine.replicas {replicas} x engine.tensor_parallel_size {tensor_parallel_size} need {needed} GPUs, "
            f"{len(gpus)} visible{limited}"
        )
    groups = [list(gpus[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]) for i in range(replicas)]
    if tensor_parallel_size > 1 and any(gpu.is_mig for group in groups for gpu in group):
        raise ConfigError(
            "tensor parallelism cannot span MIG slices (NCCL cannot connect MIG devices): set "
            "engine.tensor_parallel_size to 1 (one replica per slice) or give Airlock whole GPUs"
        )
    return groups


def capability_from_name(name: str) -> tuple[int, int] | None:
    """Compute capability of a known card, for drivers whose nvidia-smi cannot say it."""
    for pattern, capability in _CAPABILITY_BY_NAME:
        if pattern.search(name):
            return capability
    return None


def mig_profile_mib(profile: str) -> int | None:
    """Memory of a MIG slice from its profile name ("3g.40gb", "1g.10gb+me"); None when the name has no size."""
    base = profile.split("+", 1)[0]
    if base in MIG_PROFILE_MIB:
        return MIG_PROFILE_MIB[base]
    size = _PROFILE_SIZE.search(base)
    return int(int(size.group(1)) * MIG_UNKNOWN_PROFILE_FRACTION * _GIB) if size else None


def _host_devices(run: Run) -> list[_HostDevice]:
    rows = _query(run)
    if not rows:
        return []
    slices = _mig_slices(run)
    devices: list[_HostDevice] = []
    for row in rows:
        index, uuid, name = int(row["index"]), row["uuid"], row["name"]
        capability = _capability(row.get("compute_cap")) or capability_from_name(name)
        if uuid in slices:
            # MIG mode: the slices are the devices; the GPU itself is not usable whole.
            for profile, mig_uuid in slices[uuid]:
                total = mig_profile_mib(profile)
                if total is None:
                    log.warning("MIG slice of %s with profile %s: size unknown, skipped", name, profile)
                    continue
                devices.append(_HostDevice(index, mig_uuid, uuid, Gpu(mig_uuid, f"{name} MIG {profile}", total,
                                                                      None, capability)))
            continue
        total, free = _mib(row["memory.total"]), _mib(row["memory.free"])
        if total is None:
            log.warning("%s: nvidia-smi does not give its memory and lists no MIG slice of it; skipped", name)
            continue
        devices.append(_HostDevice(index, uuid, uuid, Gpu(str(index), name, total, free, capability)))
    return devices


def _query(run: Run) -> list[dict[str, str]]:
    """nvidia-smi's GPU list as rows of QUERY_FIELDS; empty when it gives none (no driver, no device)."""
    fields = list(QUERY_FIELDS)
    while True:
        output = run([NVIDIA_SMI, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
        rejected = _INVALID_FIELD.search(output)
        if rejected is None:
            break
        if rejected.group(1) not in OPTIONAL_FIELDS or rejected.group(1) not in fields:
            log.warning("this nvidia-smi rejects the GPU query: no GPU")
            return []
        fields.remove(rejected.group(1))
    rows = [row for row in csv.reader(io.StringIO(output), skipinitialspace=True) if row]
    if not rows or any(len(row) != len(fields) or not row[0].strip().isdigit() for row in rows):
        # "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver...", "No devices were found".
        log.info("nvidia-smi lists no GPU (no driver, or no device)")
        return []
    return [dict(zip(fields, (value.strip() for value in row), strict=True)) for row in rows]


def _mig_slices(run: Run) -> dict[str, list[tuple[str, str]]]:
    """MIG slices per parent GPU UUID, from `nvidia-smi -L`: (profile, MIG UUID) in the order listed."""
    try:
        output = run([NVIDIA_SMI, "-L"])
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed (%s): MIG slices unknown", type(exc).__name__)
        return {}
    slices: dict[str, list[tuple[str, str]]] = {}
    parent: str | None = None
    for line in output.splitlines():
        if gpu := _LIST_GPU.match(line):
            parent = gpu.group(1)
        elif (mig := _LIST_MIG.match(line)) and parent is not None:
            slices.setdefault(parent, []).append((mig.group(1), mig.group(2)))
    return slices


def _select(host: list[_HostDevice], visible: str) -> GpuList:
    """The devices CUDA_VISIBLE_DEVICES names, in its order, each named as it names them."""
    chosen = GpuList()
    taken: set[str] = set()
    entries = [entry.strip() for entry in visible.split(",")]
    for position, entry in enumerate(entries, start=1):
        where = f"CUDA_VISIBLE_DEVICES entry {position} of {len(entries)}"
        if re.fullmatch(r"-\d+", entry):
            break  # CUDA: a negative index ends the list
        if entry.isdigit():
            matches = [d for d in host if d.index == int(entry) and not d.gpu.is_mig]
            if not matches and any(d.index == int(entry) for d in host):
                raise ConfigError(f"{where} names a GPU in MIG mode: name its MIG slices by their MIG- UUIDs "
                                  "(nvidia-smi -L)")
            device = entry
        elif entry.startswith(("GPU-", "MIG-")):
            matches = [d for d in host if d.uuid.startswith(entry)]
            if not matches and any(d.parent_uuid.startswith(entry) for d in host):
                raise ConfigError(f"{where} names a GPU in MIG mode: name its MIG slices by their MIG- UUIDs "
                                  "(nvidia-smi -L)")
            device = matches[0].uuid if len(matches) == 1 else entry
        else:
            raise ConfigError(f"{where} is not a GPU index, GPU- UUID or MIG- UUID")
        if not matches:
            raise ConfigError(f"{where} names no device nvidia-smi lists ({len(host)} usable here)")
        if len(matches) > 1:
            raise ConfigError(f"{where} is a UUID prefix shared by {len(matches)} devices")
        (match,) = matches
        if match.uuid in taken:
            raise ConfigError(f"{where} names a device already named before it")
        taken.add(match.uuid)
        chosen.append(Gpu(device, match.gpu.name, match.gpu.total_mib, match.gpu.free_mib,
                          match.gpu.compute_capability))
    return chosen


def _mib(value: str | None) -> int | None:
    """A memory figure, or None for "[N/A]", "[Insufficient Permissions]" and the like."""
    return int(value) if value is not None and value.isdigit() else None


def _capability(value: str | None) -> tuple[int, int] | None:
    """ "8.6" -> (8, 6); None for "[N/A]" or a missing field."""
    match = re.fullmatch(r"(\d+)\.(\d+)", value or "")
    return (int(match.group(1)), int(match.group(2))) if match else None
