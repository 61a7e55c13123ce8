"""A probe of the gateway's event loop for the department benchmark (``--stall-probe``), never part of the product:
this directory goes on the gateway's PYTHONPATH only there, and Python imports this module at start-up.

What it records, for issue 20's added-TTFT p99: a callback every 1 ms on the event loop notes how late it ran (a
late beat is a loop iteration that held the loop that long) and how much CPU the loop's thread used meanwhile
(little CPU: the process waited for a core; much: its own work), and every garbage collection in the event loop's
thread, its generation and CPU time (``gc.callbacks``; the screening threads' collections are not recorded). Beats
later than 3 ms and every collection are written as JSON to ``$BENCH_STALL_PROBE`` every 2 s and at exit. Only
timings: nothing of any request.
"""

from __future__ import annotations

import os
import sys

_OUT = os.environ.get("BENCH_STALL_PROBE")

if _OUT and sys.argv[1:2] == ["gateway"]:
    import asyncio
    import atexit
    import gc
    import json
    import threading
    import time
    from typing import Any

    import uvloop

    LATE_S = 0.003
    _state: dict[str, Any] = {"beats": 0, "late": [], "gc": [], "beat": 0.0, "cpu": 0.0, "gc_start": (0.0, 0.0)}

    def _beat(loop: asyncio.AbstractEventLoop) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        late, used = now - _state["beat"], cpu - _state["cpu"]
        _state["beat"], _state["cpu"] = now, cpu
        _state["beats"] += 1
        if late > LATE_S:
            _state["late"].append((time.time(), late, used))
        loop.call_later(0.001, _beat, loop)

    _run = uvloop.run

    def _probed_run(main: Any, **options: Any) -> Any:
        async def probed() -> Any:
            loop = asyncio.get_running_loop()
            _state["beat"], _state["cpu"] = time.perf_counter(), time.thread_time()
            loop.call_later(0.001, _beat, loop)
            return await main
        return _run(probed(), **options)

    uvloop.run = _probed_run  # server.runtime.run() looks it up when it is called

    import server.runtime

    _settle = server.runtime.settle_heap

    def _settle_and_note() -> None:
        """Collections before this are start-up's (server.runner imports settle_heap after this module ran)."""
        _settle()
        _state["settled"] = time.time()

    server.runtime.settle_heap = _settle_and_note

    def _collection(phase: str, info: dict[str, int]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            _state["gc_start"] = (time.perf_counter(), time.thread_time())
        else:
            wall, cpu = _state["gc_start"]
            _state["gc"].append((time.time(), info["generation"], time.perf_counter() - wall,
                                 time.thread_time() - cpu, info["collected"]))

    gc.callbacks.append(_collection)

    def _dump() -> None:
        data = {"settled": _state.get("settled", 0.0), "beats": _state["beats"], "late": list(_state["late"]),
                "gc": list(_state["gc"])}
        with open(_OUT + ".part", "w") as out:
            json.dump(data, out)
        os.replace(_OUT + ".part", _OUT)

    def _dumping() -> None:
        while True:
            time.sleep(2)
            _dump()

    threading.Thread(target=_dumping, name="stall-probe", daemon=True).start()
    atexit.register(_dump)
