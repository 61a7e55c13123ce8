"""The department benchmark (tests/bench/department.py) runs end to end at a tiny scale, so that `make
bench-department` is known to work on a fresh machine: the real `airlock gateway` in front of two paced stand-in
replicas, the same arrivals straight to them and through it. No speed is asserted here (the benchmark prints it);
what is asserted is that every stream was served along both paths and that the figures count what was sent."""

from __future__ import annotations

import math
from pathlib import Path

from tests.bench.department import Scale, arrivals, department
from tests.bench.run import Layout
from tests.servers import free_port

TINY = Scale(replicas=2, streams_per_replica=3, tokens=12, interval_ms=10.0, duration_s=1.5, image_share=0.5,
             users=3, rounds=1)


def test_department_harness_serves_every_stream_and_counts_every_token(tmp_path: Path) -> None:
    expected = arrivals(TINY, seed=0)
    assert len(expected) > 5 and any(arrival.image for arrival in expected)
    result = department(TINY, Layout(None, None), tmp_path, port=free_port())
    figures = result.figures()
    for path in ("direct", "gateway"):
        assert figures[f"requests_{path}"] == len(expected), path
        assert figures[f"errors_{path}"] == 0, path
        # Every token the stand-ins sent reached the client as one counted event, along both paths.
        assert figures[f"{path}_token_events_sent"] == len(expected) * TINY.tokens, path
        assert figures[f"{path}_token_events_counted"] == figures[f"{path}_token_events_sent"], path
        assert figures[f"{path}_chunks_per_s"] > 0, path
        assert figures[f"{path}_streams_open_max"] >= 1, path
    assert sum(sample.image for run in result.gateway for sample in run.samples) == sum(
        arrival.image for arrival in expected)
    # The gateway did the relaying: it used CPU in its own run, and every latency figure is a number.
    assert figures["gateway_cpu_percent"] > 0
    for name in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"):
        assert math.isfinite(figures[f"added_{name}_ms"]), name
        assert figures[f"gateway_{name}_ms"] > 0, name
    # Paced: no stream ended before its tokens' time had passed (less one interval: timers fire to the millisecond).
    assert all(sample.e2e_s >= TINY.stream_s - TINY.interval_ms / 1000
               for run in [*result.direct, *result.gateway] for sample in run.samples)
