"""Run engine replicas as child processes: wait for health, restart crashes with back-off, stop without orphans.

A replica that ends ``engine.max_start_attempts`` times in a row before it ever answered its health check is not
started again: something no restart mends (not enough GPU memory, a broken model directory, a failed GPU) stops it.
The others keep serving; once none is left, the launcher ends with that said, instead of reloading the model
forever.

Each replica runs in its own process group, so stopping it also stops the engine-core processes vLLM starts.
Children die with the launcher even if it is killed outright (parent-death signal), and never dump core.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import ssl
import stat
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .config import EngineSettings
from .engine import ReplicaLaunch

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# A replica that stayed up this long has earned a fresh back-off.
STABLE_AFTER_S = 120.0


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: the child between fork and exec must not load libraries or allocate.
_PRCTL = _find_prctl()


def _prepare_child() -> None:
    """Runs in the child before exec: no core dumps, and die when the launcher dies."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineStartFailed(Exception):
    """Every replica was given up (see the module docstring): the launcher exits with status 3."""


@dataclass
class ReplicaState:
    launch: ReplicaLaunch
    process: asyncio.subprocess.Process | None = None
    healthy: asyncio.Event = field(default_factory=asyncio.Event)
    # Whether the current (or last) run answered its health check.
    was_healthy: bool = False
    # Not started again (see the module docstring).
    given_up: bool = False


class Supervisor:
    """Keeps every replica running until ``stop`` is called."""

    def __init__(self, launches: Sequence[ReplicaLaunch], settings: EngineSettings) -> None:
        self.replicas = [ReplicaState(launch) for launch in launches]
        self._settings = settings
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Set when every replica is given up (see the module docstring), with why, for the launcher.
        self.gave_up = asyncio.Event()
        self.failure: str | None = None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep_running(replica), name=f"airlock-replica-{replica.launch.index}")
            for replica in self.replicas
        ]

    @contextlib.asynccontextmanager
    async def stopping_on_failure(self, stop: asyncio.Event) -> AsyncIterator[None]:
        """Within it, a replica given up sets ``stop`` (the launcher's own shutdown); on leaving, that failure is
        raised as EngineStartFailed."""
        async def relay() -> None:
            await self.gave_up.wait()
            stop.set()

        relaying = asyncio.create_task(relay())
        try:
            yield
        finally:
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying
        if self.failure is not None:
            raise EngineStartFailed(self.failure)

    async def wait_healthy(self, timeout: float | None = None) -> bool:
        """True once every replica has answered its health check (False on timeout)."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(replica.healthy.wait() for replica in self.replicas)), timeout
            )
        except TimeoutError:
            return False
        return True

    async def _keep_running(self, replica: ReplicaState) -> None:
        backoff = self._settings.restart_backoff_initial_s
        index = replica.launch.index
        failed_starts = 0
        try:
            while not self._stopping:
                replica.healthy.clear()
                _remove_stale_socket(replica.launch.url)
                started = time.monotonic()
                code = await self._run_once(replica)
                if self._stopping:
                    break
                failed_starts = 0 if replica.was_healthy else failed_starts + 1
                if failed_starts >= self._settings.max_start_attempts:
                    self._give_up(replica, code, failed_starts)
                    return
                if time.monotonic() - started > STABLE_AFTER_S:
                    backoff = self._settings.restart_backoff_initial_s
                log.warning("replica %d exited with status %s; restarting in %.0f s", index, code, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.restart_backoff_max_s)
        finally:
            # However this ends (stop, cancellation, a bug), no engine process outlives it.
            replica.healthy.clear()
            if replica.process is not None and replica.process.returncode is None:
                await asyncio.shield(self._kill_group(replica.process))

    def _give_up(self, replica: ReplicaState, code: int | str, attempts: int) -> None:
        replica.given_up = True
        failure = (
            f"replica {replica.launch.index} ended {attempts} times in a row before it became healthy (last status "
            f"{code}); not starting it again. Its log above says why (for example: not enough GPU memory for the "
            "model and context, or a broken model directory); `airlock engine --dry-run` shows what was planned"
        )
        log.error("%s", failure)
        if all(other.given_up for other in self.replicas):
            self.failure = failure if len(self.replicas) == 1 else f"every replica was given up; the last: {failure}"
            self.gave_up.set()

    async def _run_once(self, replica: ReplicaState) -> int | str:
        """Start the replica and wait for it to end; its exit status, or why it could not start."""
        replica.was_healthy = False
        try:
            replica.process = await asyncio.create_subprocess_exec(
                *replica.launch.argv,
                env=replica.launch.env,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_prepare_child,
            )
        except OSError as exc:
            log.error("replica %d could not be started: %s", replica.launch.index, exc.strerror)
            return "not started"
        log.info("replica %d started (pid %d)", replica.launch.index, replica.process.pid)
        if self._stopping:  # stop() ran while this one was being spawned
            return "stopped"
        watcher = asyncio.create_task(self._watch_health(replica))
        try:
            code = await replica.process.wait()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        replica.healthy.clear()
        if not self._stopping:
            await self._kill_group(replica.process)  # reap engine-core children the crash left behind
        return code

    async def _watch_health(self, replica: ReplicaState) -> None:
        url = replica.launch.url
        if url.startswith("unix:"):
            client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:")),
                base_url="http://engine", trust_env=False,
            )
        else:
            client = httpx.AsyncClient(base_url=url, trust_env=False)
        deadline = time.monotonic() + self._settings.startup_timeout_s
        async with client:
            while time.monotonic() < deadline:
                if await (_serves_tls(url) if url.startswith("https://") else _healthy(client)):
                    log.info("replica %d is healthy", replica.launch.index)
                    replica.was_healthy = True
                    replica.healthy.set()
                    return
                await asyncio.sleep(1.0)
        log.error("replica %d did not become healthy within %.0f s; restarting it",
                  replica.launch.index, self._settings.startup_timeout_s)
        if replica.process is not None:
            await self._kill_group(replica.process)

    async def stop(self) -> None:
        """Stop every replica: SIGTERM to each process group, SIGKILL after the grace period."""
        self._stopping = True
        await asyncio.gather(*(
            self._kill_group(r.process) for r in self.replicas
            if r.process is not None and r.process.returncode is None
        ))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _kill_group(self, process: asyncio.subprocess.Process) -> None:
        pgid = process.pid  # start_new_session=True: the child leads its own group
        _signal_group(pgid, signal.SIGTERM)
        if process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), self._settings.stop_timeout_s)
            except TimeoutError:
                log.warning("a replica did not stop within %.0f s; killing it", self._settings.stop_timeout_s)
        # Whatever is left of the group (engine-core workers) goes now.
        await _wait_group_gone(pgid, self._settings.stop_timeout_s)
        _signal_group(pgid, signal.SIGKILL)
        if process.returncode is None:
            await process.wait()


async def _healthy(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/health", timeout=2.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def _serves_tls(url: str) -> bool:
    """Whether a TLS engine has started serving. The launcher holds no client certificate (only the gateway does),
    so it cannot ask ``/health``; but vLLM answers a TLS handshake only once the model is loaded and its server
    runs (the port is bound earlier, and connections wait unanswered until then). The engine's answer (a completed
    handshake, or a refusal for want of a client certificate) is the sign; nothing is sent over the connection,
    so its certificate needs no checking here: the gateway checks it."""
    parts = urlsplit(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port, ssl=context), 2.0)
    except ssl.SSLEOFError:
        return False  # closed without a word: not an answer
    except ssl.SSLError:
        return True  # refused us by a TLS alert: serving
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


def _remove_stale_socket(url: str) -> None:
    """A socket left by a replica that died hard would make its successor fail with 'address in use'."""
    if not url.startswith("unix:"):
        return
    path = Path(url.removeprefix("unix:"))
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.2)
