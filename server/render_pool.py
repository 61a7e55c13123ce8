"""Documents rendered in isolation: a pool of single-use worker processes (``server.render_worker``).

PDFs and TIFFs are an attack surface (PDFium and libtiff parse them in C), so no document is ever opened in the
gateway's own process. Each document goes to a fresh worker that renders it and exits: nothing of one user's document
stays in memory for the next one, and a worker a hostile file corrupted is gone with it. ``settings.workers`` workers
wait ready (started ahead, each replaced in the background as it is taken: a spawn costs a Python start-up and the
imports of PDFium and Pillow), and at most ``settings.workers`` documents render at once; a request that waits longer
than ``queue_timeout_s`` for its turn gets ``Overloaded``.

A worker is a plain child process, not ``multiprocessing``: that needs POSIX semaphores in /dev/shm, and the gateway
may run on a read-only root. ``python -I`` (isolated: no environment variables, no user site, no current directory
on the import path; python(1)) finds ``server`` through site-packages, in an editable install (its ``.pth``) as in an
installed wheel. The worker gets an empty environment (the gateway's may hold secrets), "/" as its working directory,
and no file descriptor but its three standard streams; it limits itself before it reads the document (see
``render_worker.harden``), and the pool kills it after ``render_timeout_s`` of wall time.

    render(job) -> RenderedDocument
      raises InvalidRequest         invalid_document, document_encrypted, too_many_pages, invalid_pages
             UnprocessableDocument  the worker ran out of memory or CPU time, crashed, passed render_timeout_s, or
                                    answered nonsense (it is killed; the next document gets another)
             Overloaded             no turn within queue_timeout_s (Retry-After)

Messages are written here from a code and numbers: nothing a worker sends is shown as text, and nothing of the
document is logged (at most one line per failure, naming what happened to the worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from .config import DocumentSettings
from .errors import InvalidRequest, Overloaded, UnprocessableDocument
from .render_worker import EXIT_LIMITS, EXIT_MEMORY, MAX_HEADER_BYTES

log = logging.getLogger("airlock")

_LENGTH = struct.Struct(">I")
# A refused turn: about one document's render later.
RETRY_AFTER_S = 5
# A worker that is not ready this long after its start is broken (a normal start takes well under a second).
SPAWN_TIMEOUT_S = 30.0
# After a failed spawn, the next try waits this long (a broken install must not spin).
RESPAWN_BACKOFF_S = 1.0
# ... doubling after each failure up to this, so a start that stays broken logs a line a minute, not every second.
RESPAWN_BACKOFF_MAX_S = 60.0
# close() lets a worker being started finish this long before it cancels the start.
CLOSE_GRACE_S = 5.0
MEDIA_TYPES = frozenset({"image/jpeg", "image/png"})


@dataclass(frozen=True)
class RenderJob:
    data: bytes  # the document's bytes (already decoded from base64, within max_bytes)
    kind: Literal["pdf", "tiff"]
    pages: tuple[int, ...] | None  # 1-based page numbers, in the order given; None: every page
    max_pages: int  # more pages to render than this: InvalidRequest code "too_many_pages"
    max_pixels_per_page: int  # each page scaled (aspect kept) to fill this area, never above it ...
    min_pixels_per_page: int  # ... nor below this one (a tiny page is scaled up) ...
    total_pixels: int | None  # ... and when set, the pages share this many pixels (each gets total / n,
    #                           clamped to [min, max]); always also capped by settings.max_dpi
    text_layer: bool  # extract each page's text (PDF only; capped at max_text_chars_per_page)
    thumbnail: bool = False  # small JPEG previews for the console: settings.thumbnail_pixels, no text; with
    #                          pages=None, the first max_pages pages (page_count tells whether there are more)


@dataclass(frozen=True)
class RenderedPage:
    number: int  # 1-based page number in the document
    image: bytes  # encoded page (settings.page_format; thumbnails JPEG)
    media_type: str  # "image/jpeg" or "image/png"
    width: int
    height: int
    text: str | None  # the text layer, None when not asked for or none there


@dataclass(frozen=True)
class RenderedDocument:
    page_count: int  # pages in the whole document
    pages: tuple[RenderedPage, ...]
    peak_rss_kib: int = 0  # the worker's peak resident memory (VmHWM, proc(5)), for the figures


class _WorkerFailed(Exception):
    """The worker died or answered nonsense: the user is told the document could not be rendered."""

    def __init__(self, message: str, log_line: str) -> None:
        super().__init__(log_line)
        self.message = message
        self.log_line = log_line


@dataclass(eq=False)
class _Worker:
    process: asyncio.subprocess.Process
    spawn_s: float  # from exec to ready

    @property
    def stdin(self) -> asyncio.StreamWriter:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def reap(self) -> None:
        """Wait for the (killed) process and close its pipes."""
        await self.process.wait()
        self.stdin.close()


class RenderPool:
    """Single-use render workers, ``settings.workers`` kept ready; see the module docstring."""

    def __init__(self, settings: DocumentSettings) -> None:
        self._settings = settings
        self._turns = asyncio.Semaphore(settings.workers)
        # None, put there by close(), tells every request waiting for a worker that none will come.
        self._ready: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._spawning: set[asyncio.Task[None]] = set()
        self._busy: set[_Worker] = set()
        self._started = False
        self._closed = False
        self.spawn_times: list[float] = []  # seconds from exec to ready, for the figures

    async def start(self) -> None:
        """Start ``settings.workers`` workers and wait until they are ready (a broken install fails here, at start)."""
        if self._started:
            return
        self._started = True
        started = await asyncio.gather(*(self._spawn() for _ in range(self._settings.workers)),
                                       return_exceptions=True)
        workers = [worker for worker in started if isinstance(worker, _Worker)]
        for worker in workers:
            self._ready.put_nowait(worker)
        failed = next((error for error in started if isinstance(error, BaseException)), None)
        if failed is not None:
            await self.close()
            reason = failed.log_line if isinstance(failed, _WorkerFailed) else repr(failed)
            raise RuntimeError(f"the document render workers could not start: {reason} "
                               f"({sys.executable} -I -m server.render_worker)")

    async def close(self) -> None:
        """Kill every worker, ready or busy (a render in progress fails)."""
        self._closed = True
        # A worker being started is let finish (and then killed): cancelling the start itself could leave its pipes
        # open. One stuck past the grace is cancelled all the same.
        if self._spawning:
            _, stuck = await asyncio.wait(list(self._spawning), timeout=CLOSE_GRACE_S)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        workers = list(self._busy)
        while not self._ready.empty():
            waiting = self._ready.get_nowait()
            if waiting is not None:
                workers.append(waiting)
        self._ready.put_nowait(None)
        for worker in workers:
            worker.kill()
        for worker in workers:
            await worker.reap()

    @property
    def ready_pids(self) -> list[int]:
        """Process ids of the workers waiting for a document (for tests and figures)."""
        return [worker.process.pid for worker in list(self._ready._queue) if worker]  # type: ignore[attr-defined]

    @property
    def busy_pids(self) -> list[int]:
        """Process ids of the workers rendering a document now."""
        return [worker.process.pid for worker in self._busy]

    async def render(self, job: RenderJob) -> RenderedDocument:
        if self._closed:
            raise _closing()
        if not self._started:
            await self.start()
        worker = await self._take()
        try:
            return await self._run(worker, job)
        finally:
            worker.kill()
            self._busy.discard(worker)
            self._turns.release()
            # Shielded: a second cancellation (the client left, then the server shuts down) must not leave a zombie.
            await asyncio.shield(worker.reap())

    async def _take(self) -> _Worker:
        """A turn and a ready worker, within queue_timeout_s; a replacement starts at once."""
        timeout = self._settings.queue_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._turns.acquire()
                try:
                    worker = await self._ready_worker()
                except BaseException:
                    self._turns.release()
                    raise
        except TimeoutError:
            raise Overloaded(
                f"waited {timeout:g} s for a free document renderer; the server is busy, try again shortly",
                code="documents_busy", retry_after_s=RETRY_AFTER_S,
            ) from None
        self._busy.add(worker)
        self._replace()
        return worker

    async def _ready_worker(self) -> _Worker:
        """The next ready worker that is still alive. One that died while it waited (the kernel's out-of-memory
        killer, an operator's kill) is replaced and not given the document: a good document must not fail for it.
        After close(), the request waiting here hears so at once, not after queue_timeout_s."""
        while True:
            worker = await self._ready.get()
            if worker is None:
                self._ready.put_nowait(None)  # for the next one waiting
                raise _closing()
            if worker.process.returncode is None:
                return worker
            log.warning("a waiting document worker had exited (status %d) and is replaced", worker.process.returncode)
            self._replace()
            await asyncio.shield(worker.reap())

    def _replace(self) -> None:
        task = asyncio.create_task(self._respawn())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _respawn(self) -> None:
        backoff = RESPAWN_BACKOFF_S
        while not self._closed:
            try:
                worker = await self._spawn()
            except (_WorkerFailed, OSError) as failure:
                why = failure.log_line if isinstance(failure, _WorkerFailed) else (
                    f"a document worker could not be started ({failure.strerror})")
                log.warning("%s; trying again in %.0f s", why, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESPAWN_BACKOFF_MAX_S)
                continue
            if self._closed:
                worker.kill()
                await worker.reap()
                return
            self._ready.put_nowait(worker)
            return

    async def _spawn(self) -> _Worker:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-B", "-m", "server.render_worker", str(self._settings.worker_memory_mib),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={}, close_fds=True, start_new_session=True, cwd="/",
        )
        worker = _Worker(process, 0.0)
        try:
            async with asyncio.timeout(SPAWN_TIMEOUT_S):
                ready = await _read_header(worker.stdout, 1024)
            if ready != {"ready": True}:
                raise _garbage()
        except BaseException as error:  # cancelled (the pool closing) too: no worker is left behind
            if isinstance(error, asyncio.IncompleteReadError):  # it exited: let it say why (its exit status)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.shield(process.wait())
            worker.kill()
            await asyncio.shield(worker.reap())
            if isinstance(error, TimeoutError | _WorkerFailed | asyncio.IncompleteReadError):
                raise _WorkerFailed("", _not_started(process.returncode, self._settings)) from None
            raise
        worker.spawn_s = time.perf_counter() - started
        self.spawn_times.append(worker.spawn_s)
        return worker

    async def _run(self, worker: _Worker, job: RenderJob) -> RenderedDocument:
        settings = self._settings
        try:
            async with asyncio.timeout(settings.render_timeout_s):
                return await self._exchange(worker, job)
        except TimeoutError:
            worker.kill()
            log.warning("a document worker passed documents.render_timeout_s and was killed")
            raise UnprocessableDocument(
                f"the document takes longer to render than this server allows for one document "
                f"(documents.render_timeout_s = {settings.render_timeout_s:g})"
            ) from None
        except _WorkerFailed as failure:
            worker.kill()
            if self._closed:  # close() killed it: the document is not to blame
                raise _closing() from None
            log.warning("%s", failure.log_line)
            raise UnprocessableDocument(failure.message) from None

    async def _exchange(self, worker: _Worker, job: RenderJob) -> RenderedDocument:
        settings = self._settings
        # A choice longer than max_pages is refused whatever follows: the worker gets one page past the limit and the
        # length, so a long list (every page of a 100,000-page file) cannot outgrow the job's header (MAX_HEADER_BYTES).
        chosen = list(job.pages[: job.max_pages + 1]) if job.pages is not None else None
        header = {"job": {
            "kind": job.kind, "pages": chosen, "chosen": len(job.pages) if job.pages is not None else None,
            "max_pages": job.max_pages, "max_pixels_per_page": job.max_pixels_per_page,
            "min_pixels_per_page": job.min_pixels_per_page, "total_pixels": job.total_pixels,
            "text_layer": job.text_layer, "thumbnail": job.thumbnail,
            "thumbnail_pixels": settings.thumbnail_pixels, "max_dpi": settings.max_dpi,
            "page_format": settings.page_format, "jpeg_quality": settings.jpeg_quality,
            "max_text_chars_per_page": settings.max_text_chars_per_page, "cpu_s": settings.worker_cpu_s,
        }, "size": len(job.data)}
        body = json.dumps(header).encode()
        try:
            worker.stdin.write(_LENGTH.pack(len(body)) + body)
            worker.stdin.write(job.data)
            await worker.stdin.drain()
            worker.stdin.close()
            answer = await _read_header(worker.stdout, self._max_answer_header(job))
            if "error" in answer:
                raise self._refusal(answer)
            return await self._document(worker, job, answer)
        except (ConnectionError, asyncio.IncompleteReadError):
            raise await self._death(worker) from None

    async def _document(self, worker: _Worker, job: RenderJob, answer: dict[str, Any]) -> RenderedDocument:
        """The rendered pages, each checked to be what was asked for (a worker is not trusted to be sane)."""
        pages_in = answer.get("pages")
        count = answer.get("page_count")
        if not (isinstance(pages_in, list) and _is_int(count) and len(pages_in) <= job.max_pages):
            raise _garbage()
        # The area this job's pages get at most (render_worker.target_area), not the largest any job could.
        largest = self._settings.thumbnail_pixels if job.thumbnail \
            else max(job.max_pixels_per_page, job.min_pixels_per_page)
        pages: list[RenderedPage] = []
        for entry in pages_in:
            if not isinstance(entry, dict):
                raise _garbage()
            number, width, height, size = (entry.get(key) for key in ("number", "width", "height", "size"))
            media_type, text = entry.get("media_type"), entry.get("text")
            if not (_is_int(number) and _is_int(width) and _is_int(height) and _is_int(size)
                    and media_type in MEDIA_TYPES and (text is None or isinstance(text, str))
                    and 1 <= number <= count and width >= 1 and height >= 1 and width * height <= largest
                    and 0 < size <= width * height * 4 + 65536):
                raise _garbage()
            image = await worker.stdout.readexactly(size)
            pages.append(RenderedPage(number, image, str(media_type), width, height, text))
        peak = answer.get("peak_rss_kib")
        return RenderedDocument(count, tuple(pages), peak if _is_int(peak) else 0)

    def _max_answer_header(self, job: RenderJob) -> int:
        # JSON escapes one character of text in at most 12 bytes ("\ud83d\ude00" for two UTF-16 units).
        return MAX_HEADER_BYTES + job.max_pages * (self._settings.max_text_chars_per_page * 12 + 1024)

    def _refusal(self, answer: dict[str, Any]) -> Exception:
        """The user's message for a refusal the worker recognised: words from here, numbers from the worker."""
        code = answer.get("error")
        numbers = {key: value for key, value in answer.items() if _is_int(value)}
        count, limit = numbers.get("page_count"), numbers.get("limit")
        if code == "invalid_document":
            return InvalidRequest("the document could not be read: it is damaged, truncated, or not a PDF or TIFF",
                                  code="invalid_document")
        if code == "document_encrypted":
            return InvalidRequest("the document is password-protected; send it without a password",
                                  code="document_encrypted")
        if code == "too_many_pages" and count is not None and limit is not None:
            chosen = numbers.get("chosen")
            told = f"{chosen} pages were chosen from a document of {count}" if chosen is not None \
                else f"the document has {count} pages"
            most = f"at most {limit} page{'' if limit == 1 else 's'}"
            choice = "1" if limit == 1 else f"1-{limit}"
            return InvalidRequest(f"{told}; this request may send {most} (pages count as images, and the server "
                                  f"limits both): choose pages (\"pages\": \"{choice}\")", code="too_many_pages")
        if code == "invalid_pages" and count is not None and numbers.get("page") is not None:
            return InvalidRequest(f"page {numbers['page']} was chosen, but the document has {count} pages",
                                  code="invalid_pages")
        if code == "frame_too_large" and limit is not None:
            log.warning("a document worker refused a TIFF page larger than its memory allows")
            return UnprocessableDocument(
                f"a page of the TIFF is larger than this server renders ({limit} pixels, from "
                f"documents.worker_memory_mib = {self._settings.worker_memory_mib})"
            )
        return _WorkerFailed(_FAILED, "a document worker answered with an unknown refusal")

    async def _death(self, worker: _Worker) -> _WorkerFailed:
        """Why a worker stopped answering, in the user's words and in one log line without content."""
        try:
            async with asyncio.timeout(2.0):
                status = await worker.process.wait()
        except TimeoutError:
            return _garbage()
        settings = self._settings
        memory = (f"the document needs more memory than this server allows for one document "
                  f"(documents.worker_memory_mib = {settings.worker_memory_mib})")
        if status == EXIT_MEMORY:
            return _WorkerFailed(memory, "a document worker ran out of memory")
        if status == -signal.SIGXCPU:
            return _WorkerFailed(
                f"the document needs more CPU time than this server allows for one document "
                f"(documents.worker_cpu_s = {settings.worker_cpu_s})",
                "a document worker ran out of CPU time (SIGXCPU)",
            )
        if status < 0:
            # SIGKILL is also what the kernel's out-of-memory killer sends; SIGSEGV/SIGABRT a crash in the parser,
            # often an allocation that failed under RLIMIT_AS.
            return _WorkerFailed(
                f"{_FAILED}; it may need more memory or time than this server allows for one document "
                f"(documents.worker_memory_mib = {settings.worker_memory_mib}, "
                f"documents.worker_cpu_s = {settings.worker_cpu_s})",
                f"a document worker was killed by signal {-status} ({_signal_name(-status)})",
            )
        return _WorkerFailed(_FAILED, f"a document worker exited with status {status}")


_FAILED = "the document renderer failed on this document"


def _closing() -> Overloaded:
    return Overloaded("the document renderer is shutting down; try again shortly", code="documents_closed",
                      retry_after_s=RETRY_AFTER_S)


def _garbage() -> _WorkerFailed:
    return _WorkerFailed(_FAILED, "a document worker gave an answer that makes no sense and was killed")


def _not_started(status: int | None, settings: DocumentSettings) -> str:
    if status == EXIT_LIMITS:
        return (f"a document worker could not limit its memory to documents.worker_memory_mib = "
                f"{settings.worker_memory_mib}: the gateway's own hard address-space limit (RLIMIT_AS; systemd's "
                f"LimitAS=, ulimit -v) is lower, and only a privileged process can raise it; lower "
                f"documents.worker_memory_mib or raise that limit")
    return f"a document worker did not start (exit status {status})"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


async def _read_header(stream: asyncio.StreamReader, limit: int) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(await stream.readexactly(_LENGTH.size))
    if length > limit:
        raise _garbage()
    try:
        value = json.loads(await stream.readexactly(length))
    except (ValueError, UnicodeDecodeError):
        raise _garbage() from None
    if not isinstance(value, dict):
        raise _garbage()
    return value

