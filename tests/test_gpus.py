"""GPU discovery and replica placement, from recorded nvidia-smi outputs.

This machine has no GPU, so nvidia-smi is the one fake here: its recorded outputs (tests/nvidia_smi.py says where
their format comes from) are served by `recorded(host)`, and, to test the real subprocess path, by a small script
named nvidia-smi on PATH that prints the same files with nvidia-smi's exit statuses. What only a GPU host can confirm:
that the driver prints these figures for these cards, and that vLLM starts on the devices named here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from server import gpus as gpus_module
from server.config import ConfigError
from server.gpus import (
    MIG_PROFILE_MIB,
    MIG_UNKNOWN_PROFILE_FRACTION,
    Gpu,
    GpuList,
    capability_from_name,
    discover_gpus,
    mig_profile_mib,
    place_replicas,
)

from .nvidia_smi import CARDS, DATA, fake_nvidia_smi, recorded

# The card table sizing uses (name as nvidia-smi prints it, total MiB, compute capability).
EXPECTED = {
    "rtx-3060": ("NVIDIA GeForce RTX 3060", 12288, (8, 6)),
    "rtx-a4000": ("NVIDIA RTX A4000", 16376, (8, 6)),
    "t4": ("Tesla T4", 15360, (7, 5)),
    "v100-sxm2-32gb": ("Tesla V100-SXM2-32GB", 32768, (7, 0)),
    "l4": ("NVIDIA L4", 23034, (8, 9)),
    "a10g": ("NVIDIA A10G", 23028, (8, 6)),
    "a10": ("NVIDIA A10", 23028, (8, 6)),
    "rtx-4090": ("NVIDIA GeForce RTX 4090", 24564, (8, 9)),
    "rtx-a5000": ("NVIDIA RTX A5000", 24564, (8, 6)),
    "rtx-a6000": ("NVIDIA RTX A6000", 49140, (8, 6)),
    "l40s": ("NVIDIA L40S", 46068, (8, 9)),
    "a100-sxm4-40gb": ("NVIDIA A100-SXM4-40GB", 40960, (8, 0)),
    "a100-sxm4-80gb": ("NVIDIA A100-SXM4-80GB", 81920, (8, 0)),
    "h100-80gb-hbm3": ("NVIDIA H100 80GB HBM3", 81559, (9, 0)),
}
QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free,compute_cap",
         "--format=csv,noheader,nounits"]


def uuids(host: str) -> list[str]:
    """The UUIDs in a host's `nvidia-smi -L` recording, in order (GPU- and MIG-)."""
    return [line.split("(UUID: ")[1].rstrip(")") for line in (DATA / f"{host}.L.txt").read_text().splitlines()]


def devices(gpus: list[Gpu]) -> list[str]:
    return [gpu.device for gpu in gpus]


# --- each recording parsed right ---------------------------------------------------------------------------------

def test_every_card_has_an_expectation() -> None:
    assert set(CARDS) == set(EXPECTED)


@pytest.mark.parametrize("card", CARDS)
def test_each_card_is_read_as_nvidia_smi_prints_it(card: str) -> None:
    calls: list[list[str]] = []
    (gpu,) = discover_gpus({}, recorded(card, calls))
    name, total, capability = EXPECTED[card]
    assert (gpu.device, gpu.name, gpu.total_mib, gpu.compute_capability) == ("0", name, total, capability)
    assert gpu.free_mib is not None and 0 < total - gpu.free_mib < 1024
    assert not gpu.is_mig
    assert calls == [QUERY, ["nvidia-smi", "-L"]]


@pytest.mark.parametrize("card", CARDS)
def test_the_name_table_agrees_with_the_driver(card: str) -> None:
    # What an old driver (no compute_cap) falls back on must say what a new one says.
    name, _, capability = EXPECTED[card]
    assert capability_from_name(name) == capability


@pytest.mark.parametrize(("name", "capability"), [
    ("NVIDIA A30", (8, 0)), ("NVIDIA A40", (8, 6)), ("NVIDIA GeForce RTX 3090 Ti", (8, 6)),
    ("NVIDIA L40", (8, 9)), ("NVIDIA RTX 6000 Ada Generation", (8, 9)), ("NVIDIA H200", (9, 0)),
    ("NVIDIA GH200 480GB", (9, 0)), ("NVIDIA H100 PCIe", (9, 0)), ("NVIDIA GeForce GTX 1080", None),
])
def test_names_outside_the_recordings(name: str, capability: tuple[int, int] | None) -> None:
    assert capability_from_name(name) == capability


def test_two_gpu_host() -> None:
    gpus = discover_gpus({}, recorded("two-l4"))
    assert devices(gpus) == ["0", "1"]
    assert {gpu.name for gpu in gpus} == {"NVIDIA L4"}


def test_eight_gpu_host() -> None:
    gpus = discover_gpus({}, recorded("h100x8"))
    assert devices(gpus) == [str(i) for i in range(8)]
    assert all(gpu.total_mib == 81559 and gpu.compute_capability == (9, 0) for gpu in gpus)


def test_mig_slices_inside_a_container_are_the_devices() -> None:
    # The query answers "[Insufficient Permissions]" for memory; -L lists the slices.
    _, slice_3g, slice_1g = uuids("a100-80gb-mig")
    gpus = discover_gpus({}, recorded("a100-80gb-mig"))
    assert gpus == [
        Gpu(slice_3g, "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192, None, (8, 0)),
        Gpu(slice_1g, "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9728, None, (8, 0)),
    ]
    assert all(gpu.is_mig for gpu in gpus)


def test_a_gpu_in_mig_mode_is_not_used_whole() -> None:
    # Bare metal: GPU 0's memory is readable, but its slices are what CUDA can use; GPU 1 is whole.
    _, slice_3g, slice_1g, _ = uuids("a100-80gb-mig-host")
    gpus = discover_gpus({}, recorded("a100-80gb-mig-host"))
    assert devices(gpus) == [slice_3g, slice_1g, "1"]
    assert gpus[2].total_mib == 81920


def test_old_driver_without_compute_cap() -> None:
    calls: list[list[str]] = []
    (gpu,) = discover_gpus({}, recorded("old-driver", calls))
    assert (gpu.name, gpu.total_mib, gpu.free_mib, gpu.compute_capability) == ("Tesla T4", 15360, 15101, (7, 5))
    assert calls == [QUERY, ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free", QUERY[2]],
                     ["nvidia-smi", "-L"]]


def test_no_driver_means_no_gpu() -> None:
    assert discover_gpus({}, recorded("no-driver")) == []
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "0"}, recorded("no-driver")) == []


@pytest.mark.parametrize("row", [
    "0, GPU-0, NVIDIA L4, [N/A], [N/A], [N/A]",
    "0, GPU-0, NVIDIA L4, [Insufficient Permissions], [Insufficient Permissions], [Insufficient Permissions]",
    "0, GPU-0, NVIDIA L4, [Not Supported], 22563, 8.9",
    "[N/A], [N/A], [N/A], [N/A], [N/A], [N/A]",
    "No devices were found",
    "",
])
def test_unreadable_values_never_crash(row: str) -> None:
    # A GPU whose memory is unknown and that has no MIG slice cannot be sized: it is left out, nothing raises.
    def run(argv: list[str]) -> str:
        return "GPU 0: NVIDIA L4 (UUID: GPU-0)\n" if argv[1] == "-L" else row + "\n"

    assert discover_gpus({}, run) == []


def test_unknown_capability_and_free_memory_are_none_not_a_guess() -> None:
    def run(argv: list[str]) -> str:
        if argv[1] == "-L":
            return "GPU 0: NVIDIA L4 (UUID: GPU-0)\nGPU 1: NVIDIA Future 96GB (UUID: GPU-1)\n"
        return "0, GPU-0, NVIDIA L4, 23034, [N/A], [N/A]\n1, GPU-1, NVIDIA Future 96GB, 98304, 97900, [N/A]\n"

    l4, future = discover_gpus({}, run)
    assert (l4.free_mib, l4.compute_capability) == (None, (8, 9))
    assert (future.total_mib, future.compute_capability) == (98304, None)


# --- CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------------------------

def test_cuda_visible_devices_by_index_keeps_its_order() -> None:
    gpus = discover_gpus({"CUDA_VISIBLE_DEVICES": "5, 2"}, recorded("h100x8"))
    assert devices(gpus) == ["5", "2"]
    assert isinstance(gpus, GpuList) and gpus.hidden_by_cuda_visible_devices == 6


def test_cuda_visible_devices_by_uuid_and_by_prefix() -> None:
    all_uuids = uuids("h100x8")
    gpus = discover_gpus({"CUDA_VISIBLE_DEVICES": f"{all_uuids[6]},{all_uuids[1][:10]}"}, recorded("h100x8"))
    # A prefix becomes the full UUID: vLLM 0.32 looks UUIDs up exactly.
    assert devices(gpus) == [all_uuids[6], all_uuids[1]]
    assert all(gpu.name == "NVIDIA H100 80GB HBM3" for gpu in gpus)


def test_cuda_visible_devices_by_mig_uuid() -> None:
    _, slice_3g, slice_1g, _ = uuids("a100-80gb-mig-host")
    gpus = discover_gpus({"CUDA_VISIBLE_DEVICES": f"{slice_1g},1"}, recorded("a100-80gb-mig-host"))
    assert devices(gpus) == [slice_1g, "1"]
    assert gpus[0].name == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    assert gpus.hidden_by_cuda_visible_devices == 1
    (prefixed,) = discover_gpus({"CUDA_VISIBLE_DEVICES": slice_3g[:12]}, recorded("a100-80gb-mig-host"))
    assert prefixed.device == slice_3g


@pytest.mark.parametrize("value", ["", " ", "-1", "none", "void", "NoNe"])
def test_cuda_visible_devices_that_hide_every_gpu(value: str) -> None:
    calls: list[list[str]] = []
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": value}, recorded("h100x8", calls)) == []
    assert calls == []  # nothing to ask nvidia-smi


def test_a_negative_index_ends_the_list_as_in_cuda() -> None:
    assert devices(discover_gpus({"CUDA_VISIBLE_DEVICES": "3,-1,4"}, recorded("h100x8"))) == ["3"]


@pytest.mark.parametrize(("value", "message"), [
    ("8", "entry 1 of 1 names no device nvidia-smi lists (8 usable here)"),
    ("0,GPU-ffffffff", "entry 2 of 2 names no device"),
    ("GPU-1", "entry 1 of 1 is a UUID prefix shared by 3 devices"),
    ("1,1", "entry 2 of 2 names a device already named before it"),
    ("gpu0", "entry 1 of 1 is not a GPU index, GPU- UUID or MIG- UUID"),
])
def test_cuda_visible_devices_that_name_nothing_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        discover_gpus({"CUDA_VISIBLE_DEVICES": value}, recorded("h100x8"))
    assert "ffffffff" not in str(caught.value)


@pytest.mark.parametrize("which", ["index", "uuid"])
def test_naming_a_gpu_in_mig_mode_whole_is_refused(which: str) -> None:
    parent = "0" if which == "index" else uuids("a100-80gb-mig-host")[0]
    with pytest.raises(ConfigError, match="names a GPU in MIG mode: name its MIG slices"):
        discover_gpus({"CUDA_VISIBLE_DEVICES": parent}, recorded("a100-80gb-mig-host"))


def test_logs_carry_counts_names_and_memory_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="server.gpus")
    _, slice_3g, _, _ = uuids("a100-80gb-mig-host")
    discover_gpus({"CUDA_VISIBLE_DEVICES": slice_3g}, recorded("a100-80gb-mig-host"))
    discover_gpus({}, recorded("a100-80gb-mig"))
    assert "NVIDIA A100-SXM4-80GB MIG 3g.40gb, 40192 MiB" in caplog.text
    assert "leaves out 2 of the host's 3" in caplog.text
    assert "GPU-" not in caplog.text and "MIG-" not in caplog.text


# --- the real subprocess path, with nvidia-smi replaced by a script printing the recordings ------------------------

def test_the_real_runner_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, "two-l4")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert devices(discover_gpus({"CUDA_VISIBLE_DEVICES": "1"})) == ["1"]


def test_the_real_runner_with_an_old_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, "old-driver", exit_status=2)  # nvidia-smi's status for an invalid field
    monkeypatch.setenv("PATH", str(tmp_path))
    (gpu,) = discover_gpus({})
    assert gpu.compute_capability == (7, 5)


def test_the_real_runner_without_a_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, "no-driver", exit_status=9)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert discover_gpus({}) == []


def test_no_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert discover_gpus({}) == []


def test_a_hung_nvidia_smi_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, "l4", sleep_s=30)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(gpus_module, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    assert discover_gpus({}) == []


# --- MIG slice sizes ----------------------------------------------------------------------------------------------

def test_mig_profile_sizes() -> None:
    assert mig_profile_mib("3g.40gb") == 40192
    assert mig_profile_mib("1g.10gb+me") == mig_profile_mib("1g.10gb") == 9728
    assert mig_profile_mib("1g.6gb") == int(6 * MIG_UNKNOWN_PROFILE_FRACTION * 1024)
    assert mig_profile_mib("weird") is None


def test_an_unknown_profile_is_never_given_more_than_any_known_card_gives() -> None:
    for profile, mib in MIG_PROFILE_MIB.items():
        nominal_mib = int(profile.rsplit(".", 1)[1].removesuffix("gb")) * 1024
        assert MIG_UNKNOWN_PROFILE_FRACTION * nominal_mib <= mib <= nominal_mib, profile


# --- placement ----------------------------------------------------------------------------------------------------

def test_each_replica_gets_its_own_gpus() -> None:
    groups = place_replicas(discover_gpus({}, recorded("h100x8")), replicas=8, tensor_parallel_size=1)
    assert [devices(group) for group in groups] == [[str(i)] for i in range(8)]


def test_tensor_parallel_groups_are_consecutive_runs() -> None:
    gpus = discover_gpus({"CUDA_VISIBLE_DEVICES": "7,6,5,4,3,2"}, recorded("h100x8"))
    groups = place_replicas(gpus, replicas=3, tensor_parallel_size=2)
    assert [devices(group) for group in groups] == [["7", "6"], ["5", "4"], ["3", "2"]]


def test_spare_gpus_are_left_alone() -> None:
    groups = place_replicas(discover_gpus({}, recorded("h100x8")), replicas=1, tensor_parallel_size=4)
    assert [devices(group) for group in groups] == [["0", "1", "2", "3"]]


def test_too_few_gpus() -> None:
    with pytest.raises(ConfigError, match=r"engine.replicas 3 x engine.tensor_parallel_size 1 need 3 GPUs, 2 visible$"):
        place_replicas(discover_gpus({}, recorded("two-l4")), replicas=3, tensor_parallel_size=1)


def test_too_few_gpus_says_when_cuda_visible_devices_limited_them() -> None:
    gpus = discover_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, recorded("h100x8"))
    with pytest.raises(ConfigError, match=r"need 4 GPUs, 2 visible \(CUDA_VISIBLE_DEVICES hides 6 more on this host\)"):
        place_replicas(gpus, replicas=2, tensor_parallel_size=2)


def test_one_replica_per_mig_slice() -> None:
    gpus = discover_gpus({}, recorded("a100-80gb-mig"))
    groups = place_replicas(gpus, replicas=2, tensor_parallel_size=1)
    assert [devices(group) for group in groups] == [[gpus[0].device], [gpus[1].device]]


def test_tensor_parallel_over_mig_slices_is_refused() -> None:
    with pytest.raises(ConfigError, match="tensor parallelism cannot span MIG slices"):
        place_replicas(discover_gpus({}, recorded("a100-80gb-mig")), replicas=1, tensor_parallel_size=2)


def test_a_group_may_mix_models() -> None:
    # Allowed; sizing plans for the smallest member.
    mixed = [Gpu("0", "NVIDIA GeForce RTX 4090", 24564, 24208, (8, 9)),
             Gpu("1", "NVIDIA GeForce RTX 3060", 12288, 12057, (8, 6))]
    assert place_replicas(mixed, replicas=1, tensor_parallel_size=2) == [mixed]


@pytest.mark.parametrize(("replicas", "tensor_parallel_size"), [(0, 1), (1, 0)])
def test_placement_needs_at_least_one(replicas: int, tensor_parallel_size: int) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        place_replicas([Gpu("0", "NVIDIA L4", 23034, 22563, (8, 9))], replicas, tensor_parallel_size)


def test_the_readme_states_the_mig_size_airlock_uses() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Which GPUs Airlock uses", 1)[1].split("\n### ", 1)[0]
    assert f"`3g.40gb` on an A100 80GB: {MIG_PROFILE_MIB['3g.40gb'] / 1024:.2f} GiB" in section
