"""What rendering documents costs: time per page, worker start-up, and the render pool's memory, with real worker
processes (server/render_pool.py) at the default document settings. Run: ``make bench-documents``.

Two 10-page documents: a scanned contract (image-only A4 pages at 300 dpi, grey with a paper-like texture and lines
of dark marks, stored as JPEG inside the PDF as scanners store them) and a digital contract (reportlab: full pages
of text). Each at the 8B profile's image budget (4,194,304 pixels a page) and at a budget shared by 10 pages in a
32,768-token context (32 x 32 pixels a token: 3,355,443 pixels a page).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from pathlib import Path

from PIL import Image, ImageDraw
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from server.config import DocumentSettings
from server.render_pool import RenderedDocument, RenderJob, RenderPool

PAGES = 10
BUDGETS = {"8B profile (4,194,304 px a page)": (4_194_304, None),
           "32,768-token context shared by 10 pages": (4_194_304, 32_768 * 32 * 32)}


def scanned_contract(pages: int = PAGES) -> bytes:
    frames = []
    for number in range(pages):
        page = Image.effect_noise((2480 // 4, 3508 // 4), 12).resize((2480, 3508), Image.Resampling.BICUBIC)
        page = page.point(lambda value: min(255, value + 120))
        draw = ImageDraw.Draw(page)
        for line in range(60):
            y = 300 + line * 50
            draw.rectangle((250, y, 2230 - (line * 37 + number * 11) % 600, y + 22), fill=40)
        frames.append(page)
    out = io.BytesIO()
    frames[0].save(out, "PDF", resolution=300.0, save_all=True, append_images=frames[1:], quality=85)
    return out.getvalue()


def digital_contract(pages: int = PAGES) -> bytes:
    out = io.BytesIO()
    drawing = canvas.Canvas(out, pagesize=A4)
    for number in range(1, pages + 1):
        drawing.setFont("Helvetica-Bold", 14)
        drawing.drawString(56, 790, f"Service agreement, page {number}")
        drawing.setFont("Helvetica", 10)
        for line in range(60):
            drawing.drawString(56, 760 - line * 12, f"{number}.{line} The supplier shall deliver the services "
                                                    f"described in schedule {line % 7} within the agreed period.")
        drawing.showPage()
    drawing.save()
    return out.getvalue()


def job(data: bytes, max_pixels: int, total: int | None) -> RenderJob:
    return RenderJob(data=data, kind="pdf", pages=None, max_pages=16, max_pixels_per_page=max_pixels,
                     min_pixels_per_page=56 * 56, total_pixels=total, text_layer=True)


def rss_kib(pid: int) -> tuple[int, int]:
    """Resident and proportional set size (shared pages split between the processes sharing them), proc(5)."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    pss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
               if line.startswith("Pss:"))
    return rss, pss


async def measure(rounds: int) -> None:
    settings = DocumentSettings()
    pool = RenderPool(settings)
    await pool.start()
    try:
        await pool.render(job(digital_contract(1), 4_194_304, None))  # warm: the first render's imports
        documents = {"scanned contract (10 A4 pages, 300 dpi images)": scanned_contract(),
                     "digital contract (10 A4 pages of text)": digital_contract()}
        print(f"Render time per page (median of {rounds} renders of the whole document, a ready worker each; "
              f"{settings.page_format} at quality {settings.jpeg_quality}, text layer on):\n")
        print("| document | PDF KB | budget | page pixels | ms per page | JPEG KB per page | worker peak RSS MB |")
        print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
        peaks: list[int] = []
        for name, data in documents.items():
            for budget, (max_pixels, total) in BUDGETS.items():
                times: list[float] = []
                document: RenderedDocument | None = None
                for _ in range(rounds):
                    await asyncio.sleep(1.0)  # the replacement worker is ready: only the render is timed
                    started = time.perf_counter()
                    document = await pool.render(job(data, max_pixels, total))
                    times.append(time.perf_counter() - started)
                assert document is not None and len(document.pages) == PAGES
                peaks.append(document.peak_rss_kib)
                first = document.pages[0]
                size_kb = statistics.mean(len(page.image) for page in document.pages) / 1024
                print(f"| {name} | {len(data) / 1024:,.0f} | {budget} | {first.width}x{first.height} | "
                      f"{statistics.median(times) / PAGES * 1000:.0f} | {size_kb:.0f} | "
                      f"{document.peak_rss_kib / 1024:.0f} |")

        await asyncio.sleep(1.0)
        idle = [rss_kib(pid) for pid in pool.ready_pids]
        spawn = RenderPool(settings)
        for _ in range(rounds * 2):  # one at a time, on a quiet pool
            worker = await spawn._spawn()
            worker.kill()
            await worker.reap()
        print(f"\nWorker start-up (exec to ready: Python, PDFium, Pillow, a warm-up render, the limits), "
              f"{len(spawn.spawn_times)} one at a time: median {statistics.median(spawn.spawn_times) * 1000:.0f} ms, "
              f"max {max(spawn.spawn_times) * 1000:.0f} ms")
        idle_rss = statistics.mean(rss for rss, _ in idle) / 1024
        idle_pss = statistics.mean(pss for _, pss in idle) / 1024
        peak = max(peaks) / 1024
        print(f"One idle worker: RSS {idle_rss:.0f} MB (PSS {idle_pss:.0f} MB: the libraries' pages are shared)")
        print(f"Peak RSS of a worker during the renders above: {peak:.0f} MB "
              f"(address space limit: worker_memory_mib = {settings.worker_memory_mib})")
        print(f"The pool at the default settings (workers = {settings.workers}): idle {settings.workers} x "
              f"{idle_rss:.0f} = {settings.workers * idle_rss:.0f} MB RSS; all busy, {settings.workers} rendering "
              f"+ {settings.workers} ready replacements: at most {settings.workers * (peak + idle_rss):.0f} MB")
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(measure(args.rounds))


if __name__ == "__main__":
    main()
