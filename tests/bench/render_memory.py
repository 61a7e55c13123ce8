"""The render workers' memory, for sizing the gateway's memory (helm/airlock/values.yaml, the README's deploy
sections): a real RenderPool (default DocumentSettings) renders a 10-page 300-dpi scanned contract and a 600-dpi
page, made with Pillow in a separate process (so that this one stays small), at the 8B profiles' image budget
(4,194,304 pixels a page) and at the demo's (1,048,576), and prints each worker's peak resident memory, an idle
worker's resident memory, and the time per page. Nothing is written to disk.

A worker's peak is its VmHWM (/proc/PID/status: the high-water mark of its own address space, which exec starts
afresh), sampled while it renders: the figure the pool reports, getrusage(2) ru_maxrss, is kept across execve
(getrusage(2), NOTES) and so starts at the gateway's own high-water mark, which it may not show past.

    .venv/bin/python -m tests.bench.render_memory [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from server.config import DocumentSettings
from server.render_pool import RenderJob, RenderPool

A4_300_DPI = (2480, 3508)
A4_600_DPI = (4960, 7016)
PAGES = 10
SAMPLE_S = 0.005
BUDGETS = {"8B profile (4,194,304 px a page)": 4096 * 32 * 32, "demo (1,048,576 px a page)": 1024 * 1024}


def scanned(pages: int = PAGES, size: tuple[int, int] = A4_300_DPI, seed: int = 0) -> bytes:
    """An image-only PDF as a scanner writes it: each page an A4 RGB JPEG with lines of text and a little noise
    (Pillow's PDF writer)."""
    rng = random.Random(seed)
    dpi = round(size[0] / 8.27)
    images = []
    for number in range(1, pages + 1):
        page = Image.effect_noise(size, 6).convert("RGB").point(lambda value: 235 + value // 16)
        draw = ImageDraw.Draw(page)
        for line, y in enumerate(range(size[1] // 14, size[1] * 13 // 14, size[1] // 50)):
            words = " ".join(rng.choice(("the", "party", "agrees", "contract", "clause", "term", "notice", "fee"))
                             for _ in range(14))
            draw.text((size[0] // 11, y), f"{number}.{line} {words}", fill=(25, 25, 25), font_size=dpi // 8)
        images.append(page)
    out = io.BytesIO()
    images[0].save(out, "PDF", resolution=dpi, save_all=True, append_images=images[1:], quality=80)
    return out.getvalue()


def made_elsewhere(pages: int, dpi: int) -> bytes:
    """The document from a child process: making it takes a few hundred MiB this process must not keep as its own
    high-water mark (the pool's workers start from it, see the module docstring)."""
    code = f"import sys; from tests.bench.render_memory import *; sys.stdout.buffer.write(scanned({pages}, " \
           f"A4_{dpi}_DPI))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def render_sampled(pool: RenderPool, job: RenderJob) -> tuple[float, int, int]:
    """Seconds a page, the busiest worker's VmHWM (KiB), and the pool's own figure."""
    started = time.perf_counter()
    task = asyncio.create_task(pool.render(job))
    peak = 0
    while not task.done():
        peak = max([peak, *(status_kib(pid, "VmHWM") for pid in pool.busy_pids)])
        await asyncio.sleep(SAMPLE_S)
    document = task.result()
    return (time.perf_counter() - started) / len(document.pages), peak, document.peak_rss_kib


async def measure(rounds: int) -> None:
    settings = DocumentSettings()
    documents = {"10-page A4 scan, 300 dpi": made_elsewhere(PAGES, 300),
                 "1-page A4 scan, 600 dpi": made_elsewhere(1, 600)}
    print(f"documents.workers {settings.workers}, worker_memory_mib {settings.worker_memory_mib} (RLIMIT_AS)")
    pool = RenderPool(settings)
    await pool.start()
    try:
        idle = [status_kib(pid, "VmRSS") for pid in pool.ready_pids]
        print(f"idle worker resident memory: {', '.join(f'{kib / 1024:.0f} MiB' for kib in idle)}; "
              f"start-up {min(pool.spawn_times):.2f}-{max(pool.spawn_times):.2f} s; this process's high-water mark "
              f"{status_kib(os.getpid(), 'VmHWM') / 1024:.0f} MiB")
        for name, data in documents.items():
            for label, pixels in BUDGETS.items():
                runs = [await render_sampled(pool, RenderJob(data, "pdf", None, settings.max_pages, pixels, 1024,
                                                             None, settings.text_layer)) for _ in range(rounds)]
                print(f"{name} ({len(data) / 1e6:.1f} MB), {label}: worker peak resident memory "
                      f"{max(run[1] for run in runs) / 1024:.0f} MiB (VmHWM; the pool's ru_maxrss "
                      f"{max(run[2] for run in runs) / 1024:.0f} MiB), "
                      f"{min(run[0] for run in runs) * 1000:.0f}-{max(run[0] for run in runs) * 1000:.0f} ms a page")
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(measure(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
