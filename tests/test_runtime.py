"""The gateway's allocator setting (``server.runtime``), in a process of its own: large buffers are reused rather
than faulted in anew, and the heap's free pages go back to the system once requests pause, not while they come."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT

SIZE = 1_300_000  # the base64 of a 1 MB JPEG
HELD = 20  # 26 MB: below the trim threshold (32 MiB), so free() alone hands none of it back

# argv: "faults" (allocate and free SIZE 200 times, as a request's steps do, and count the minor faults) or
# "held BUSY_S [LONGEST_S]" (hold HELD buffers, free them, count a request every 50 ms for BUSY_S seconds, then none;
# the RSS before, while held, at the end of the busy spell and once quiet).
PROBE = textwrap.dedent(f"""
    import resource, sys, time
    from server import runtime
    if not runtime.tune_malloc():
        print("not glibc")
        sys.exit()
    def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def rss_mb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 1e6
    bytearray({SIZE})
    if sys.argv[1] == "faults":
        before = faults()
        for _ in range(200):
            bytearray(b"x") * {SIZE}  # written in full: every page touched
        print(faults() - before)
        sys.exit()
    started = [0]
    if sys.argv[2] != "untrimmed":
        runtime.trim_heap_when_quiet(lambda: started[0], 0.2, float(sys.argv[3]) if len(sys.argv) > 3 else 60)
    base = rss_mb()
    started[0] += 1  # a request, whose buffers these are
    held = [bytearray(b"x") * {SIZE} for _ in range({HELD})]
    peak = rss_mb()
    del held
    busy_until = time.monotonic() + float(sys.argv[2] if sys.argv[2] != "untrimmed" else 0)
    while time.monotonic() < busy_until:
        started[0] += 1
        time.sleep(0.05)
    busy = rss_mb()
    time.sleep(1.0)
    print(base, peak, busy, rss_mb())
""")


def probe(*args: str) -> list[float]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    if done.stdout.strip() == "not glibc":
        pytest.skip("glibc's allocator only: this C library is not glibc")
    return [float(figure) for figure in done.stdout.split()]


def test_large_buffers_are_reused_not_faulted_in_each_time() -> None:
    [faults] = probe("faults")
    pages = 200 * SIZE // 4096
    # The fixed 128 KiB mmap threshold before 1 December gave 63,600 here: each buffer a fresh mapping.
    assert faults < pages // 10, f"{faults} minor faults for {pages} pages written: each buffer freshly mapped"


def test_freed_buffers_go_back_to_the_system_once_requests_pause() -> None:
    base, peak, _, quiet = probe("held", "0")
    assert peak - base > 20, (base, peak)  # 26 MB held: the probe sees what it should
    assert quiet - base < 5, f"RSS {base:.0f} MB before, {peak:.0f} MB held, {quiet:.0f} MB once freed and quiet"
    base, _, _, kept = probe("held", "untrimmed")
    # The contrast: without the trimming thread the heap keeps them.
    assert kept - base > 20, f"{kept:.0f} MB against {base:.0f}: kept without trimming, yet handed back"


def test_the_heap_is_not_trimmed_while_requests_keep_coming() -> None:
    base, peak, busy, quiet = probe("held", "1.5")  # 1.5 s of requests, 30 trimmer periods
    assert busy - base > 20, f"RSS {base:.0f} MB, {peak:.0f} held, {busy:.0f} while busy: trimmed under load"
    assert quiet - base < 5, f"RSS {base:.0f} MB before, {quiet:.0f} MB once quiet: not handed back"


def test_under_steady_load_the_heap_is_still_trimmed_now_and_then() -> None:
    base, peak, busy, _ = probe("held", "1.5", "0.5")  # requests for 1.5 s, a trim at least every 0.5 s
    assert peak - base > 20 and busy - base < 5, f"RSS {base:.0f} MB, {peak:.0f} held, {busy:.0f} while busy"
