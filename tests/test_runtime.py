"""The gateway's allocator setting (``server.runtime``): large buffers are reused rather than faulted in anew, and the
heap's free pages go back to the system once requests pause (in a process of its own); and when the trimmer trims
(``HeapTrimmer`` on a clock of the test's)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from server import runtime

from .conftest import ROOT

SIZE = 1_300_000  # the base64 of a 1 MB JPEG
HELD = 20  # 26 MB: below the trim threshold (32 MiB), so free() alone hands none of it back

# argv: "faults" (allocate and free SIZE 200 times, as a request's steps do, and count the minor faults) or "held"
# / "untrimmed" (a request's HELD buffers held and freed, with the trimming thread ticking every 0.2 s or without it;
# the RSS before, while held, and 2 s later).
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
    requests = [0]
    if sys.argv[1] == "held":
        runtime.trim_heap_when_quiet(lambda: requests[0], 0.2)
    base = rss_mb()
    requests[0] += 1  # a request started, whose buffers these are
    held = [bytearray(b"x") * {SIZE} for _ in range({HELD})]
    peak = rss_mb()
    del held
    requests[0] += 1  # and finished
    time.sleep(2.0)
    print(base, peak, rss_mb())
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
    base, peak, quiet = probe("held")
    assert peak - base > 20, (base, peak)  # 26 MB held: the probe sees what it should
    assert quiet - base < 5, f"RSS {base:.0f} MB before, {peak:.0f} MB held, {quiet:.0f} MB once freed and quiet"
    base, _, kept = probe("untrimmed")
    # The contrast: without the trimming thread the heap keeps them.
    assert kept - base > 20, f"{kept:.0f} MB against {base:.0f}: kept without trimming, yet handed back"


class Ticking:
    """``HeapTrimmer`` on a clock of its own: one tick a second, the activity count set by the test."""

    def __init__(self) -> None:
        self.now, self.activity = 0.0, 0
        self.trims: list[float] = []  # when it trimmed
        self.trimmer = runtime.HeapTrimmer(lambda: self.activity, lambda: self.trims.append(self.now),
                                           lambda: self.now, longest_s=60)

    def run(self, seconds: int, requests_per_tick: int = 0) -> None:
        for _ in range(seconds):
            self.now += 1
            self.activity += requests_per_tick
            self.trimmer.tick()


def test_idle_it_never_trims() -> None:
    ticking = Ticking()
    ticking.run(600)
    assert ticking.trims == []


def test_a_burst_is_trimmed_once_in_the_pause_after_it() -> None:
    ticking = Ticking()
    ticking.run(10)
    ticking.run(5, requests_per_tick=3)
    ticking.run(600)
    assert ticking.trims == [16.0]  # the first tick with nothing started or finished


def test_steady_load_is_trimmed_once_a_minute_and_once_after() -> None:
    ticking = Ticking()
    ticking.run(600)  # a long idle spell first: the minute counts from the load's start, not from the last trim
    ticking.run(150, requests_per_tick=1)
    ticking.run(30)
    assert ticking.trims == [661.0, 721.0, 751.0]  # the load from 601 to 750


def test_a_request_that_finishes_long_after_the_pause_is_trimmed_after_it() -> None:
    ticking = Ticking()
    ticking.run(1, requests_per_tick=1)  # it starts
    ticking.run(30)  # it streams (or waits in the queue), holding its body
    ticking.run(1, requests_per_tick=1)  # it finishes
    ticking.run(30)
    assert ticking.trims == [2.0, 33.0]
