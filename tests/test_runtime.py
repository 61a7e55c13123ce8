"""The gateway's allocator setting (``server.runtime``), in a process of its own: large buffers are reused rather
than faulted in anew, and the heap's free pages go back to the system once trimmed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT

# Allocates and frees a 1.3 MB buffer (the base64 of a 1 MB JPEG) 200 times, as a request's steps do, counting the
# minor faults; then holds 64 such buffers, frees them, and reads the RSS before, while held and once trimmed.
PROBE = textwrap.dedent("""
    import resource, sys, time
    from server import runtime
    trim = runtime.tune_malloc()
    assert trim is not None, "not glibc"
    if sys.argv[1] == "trimmed":
        runtime.start_trimming(trim, 0.2)
    def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def rss_mb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 1e6
    size = 1_300_000
    bytearray(size)
    before = faults()
    for _ in range(200):
        bytearray(b"x") * size  # written in full: every page touched
    print(faults() - before)
    base = rss_mb()
    held = [bytearray(b"x") * size for _ in range(64)]
    peak = rss_mb()
    del held
    time.sleep(1.0)
    print(base, peak, rss_mb())
""")


def probe(mode: str) -> tuple[int, float, float, float]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    faults, sizes = done.stdout.splitlines()
    base, peak, after = map(float, sizes.split())
    return int(faults), base, peak, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_large_buffers_are_reused_not_faulted_in_each_time() -> None:
    faults, *_ = probe("trimmed")
    pages = 200 * 1_300_000 // 4096
    assert faults < pages // 10, f"{faults} minor faults for {pages} pages written: each buffer freshly mapped"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_buffers_go_back_to_the_system_once_trimmed() -> None:
    _, base, peak, after = probe("trimmed")
    assert peak - base > 60, (base, peak)  # 83 MB held: the probe measures what it should
    assert after - base < 10, f"RSS {base:.0f} MB before, {peak:.0f} MB held, {after:.0f} MB once freed and trimmed"
    _, base, _, kept = probe("untrimmed")
    # The contrast: without the trimming thread the heap keeps what free() did not trim (up to its threshold).
    assert kept - base > after - base + 5, f"{kept:.0f} MB against {base:.0f}: the thread made no difference"
