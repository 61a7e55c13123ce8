"""``airlock limits-server``: counts every gateway's requests against each user's own limits
(``admission.max_concurrent_per_user``, ``admission.requests_per_minute_per_user``), so that they hold for a user
whichever gateway process or pod their requests reach. The wire is described in ``shared_limits``.

It knows users by pseudonym only, keeps everything in memory (``limits.UserLimits``: bounded), and writes nothing
about a request anywhere: not a log line, not a metric. What a connection counted ends with the connection, so a
gateway that dies or is cut off gives back its requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import orjson

from .config import ConfigError, Settings, SharedLimitsSettings, is_loopback_host
from .errors import RateLimited
from .limits import UserLimits
from .privacy import harden_process
from .tls import CertificateFiles, CertificateReloader, TlsFileError, reloading, server_context

log = logging.getLogger("airlock.limits_server")

MAX_LINE_BYTES = 512  # {"enter": <id>, "user": <64 hex>} is under 100
# A gateway has at most its queue and its engines' slots in progress (admission.max_queued 1024 by default); far
# more is not a gateway following the wire, and would only grow this process.
MAX_COUNTED_PER_CONNECTION = 100_000
# Answers a gateway has not read yet: past this it is not reading, and its connection is dropped.
MAX_UNREAD_BYTES = 1024 * 1024
PSEUDONYM_LENGTH = 64  # hex of an HMAC-SHA256
# Gateways connected at once: a deployment has a handful (one connection each); past this, a connection is closed at
# once, so that a flood of them cannot take every file descriptor and lock the gateways out.
MAX_CONNECTIONS = 256
# Warnings about peers, at most one per this many seconds each (with a count of those not logged).
WARNING_INTERVAL_S = 60.0


class _Throttled:
    """A warning a peer can cause, logged at most once per ``WARNING_INTERVAL_S``: a misbehaving peer must not be
    able to flood the log."""

    def __init__(self) -> None:
        self._last = -WARNING_INTERVAL_S
        self._skipped = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < WARNING_INTERVAL_S:
            self._skipped += 1
            return
        skipped, self._skipped, self._last = self._skipped, 0, now
        log.warning(message + (f" ({skipped} more like it not logged)" if skipped else ""), *args)


class LimitsServer:
    """The counts, and one task per connected gateway."""

    def __init__(self, settings: Settings) -> None:
        self.limits = UserLimits(settings.admission)
        self.connections = 0
        self._dropped, self._differ, self._full = _Throttled(), _Throttled(), _Throttled()
        self._own = {"max_concurrent_per_user": settings.admission.max_concurrent_per_user,
                     "requests_per_minute_per_user": settings.admission.requests_per_minute_per_user}

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One gateway's connection: its requests, until it closes or breaks the protocol."""
        counted: dict[int, str] = {}
        if self.connections >= MAX_CONNECTIONS:
            self._full.warn("limits server: %d connections open, the most it takes; closed a new one",
                            MAX_CONNECTIONS)
            writer.transport.abort()
            return
        self.connections += 1
        try:
            while line := await reader.readline():
                reply = self._handle(line, counted)
                if reply is not None:
                    if writer.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
                        raise ValueError("a gateway that does not read its answers")
                    writer.write(reply)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A broken line or connection: no peer's bytes are logged, only what kind of fault it was.
            self._dropped.warn("limits server: dropped a connection that broke the wire (%s); its %d requests are no "
                               "longer counted", type(exc).__name__, len(counted))
        finally:
            self.connections -= 1
            for user in counted.values():
                self.limits._leave(user)
            # At once, whatever is unsent: a peer that does not read would otherwise keep its buffer and descriptor.
            writer.transport.abort()

    def _handle(self, line: bytes, counted: dict[int, str]) -> bytes | None:
        message: dict[str, Any] = orjson.loads(line)
        if "hello" in message:
            self._compare(message["hello"])
            return b'{"ready":true}\n'
        if "leave" in message:
            user = counted.pop(_request_id(message["leave"]), None)
            if user is not None:
                self.limits._leave(user)
            return None
        request_id, user = _request_id(message["enter"]), message["user"]
        if not isinstance(user, str) or len(user) != PSEUDONYM_LENGTH or request_id in counted \
                or len(counted) >= MAX_COUNTED_PER_CONNECTION:
            raise ValueError("not a request this server counts")
        try:
            self.limits._enter(user)
        except RateLimited as refused:
            retry_after = int(refused.headers.get("retry-after", "1"))
            return orjson.dumps({"id": request_id, "refused": {
                "message": refused.message, "code": refused.code, "retry_after_s": retry_after}}) + b"\n"
        counted[request_id] = user
        return b'{"id":%d}\n' % request_id

    def _compare(self, theirs: object) -> None:
        """Warn when a gateway was set up with other limits: this server's apply, which may surprise its operator."""
        if not isinstance(theirs, dict):
            raise ValueError("not a gateway's hello")
        differing = [f"{name} {theirs.get(name)!r} there, {mine} here" for name, mine in self._own.items()
                     if theirs.get(name) != mine and isinstance(theirs.get(name), (int, type(None)))]
        if differing:
            self._differ.warn("limits server: a gateway's settings differ (%s); this server's apply to all of its "
                              "users. Give the limits server the gateways' admission settings", "; ".join(differing))


def _request_id(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("a request id is a non-negative integer")
    return value


async def run_limits_server(settings: Settings, host: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, on ``admission.shared_limits.url`` (its port on ``host`` for tcp://).
    Raises ConfigError for a URL it cannot listen on or unusable TLS files."""
    from .runner import listen  # the gateway's own binding, with its messages
    shared = settings.admission.shared_limits
    if shared is None:
        raise ConfigError("admission.shared_limits: set url (unix:/path or tcp://host:port) and, for tcp://, tls")
    harden_process()
    server = LimitsServer(settings)
    path, address = shared.socket_path, shared.tcp_address
    reloader = None
    if path is not None:
        if host is not None:
            raise ConfigError("--host applies to a tcp:// admission.shared_limits.url; this one is a unix socket")
        listener = await asyncio.start_unix_server(server.serve_connection, sock=_unix_socket(path),
                                                   limit=MAX_LINE_BYTES)
        where = f"unix:{path}"
    else:
        assert address is not None
        context, reloader = _server_tls(shared)
        bind = host if host is not None else address[0]
        if context is None and not is_loopback_host(bind):
            raise ConfigError(f"refusing to listen on {bind!r} without TLS: set admission.shared_limits.tls, or "
                              "listen on loopback only")
        tls_options: dict[str, Any] = {"ssl": context, "ssl_handshake_timeout": 10.0} if context is not None else {}
        sock = listen(bind, address[1], "admission.shared_limits.url", "admission.shared_limits.url (or --host)")
        listener = await asyncio.start_server(server.serve_connection, sock=sock, limit=MAX_LINE_BYTES, **tls_options)
        where = f"tcp://{bind}:{address[1]}" + (" (mutual TLS)" if context is not None else "")
    admission = settings.admission
    log.info("limits server on %s: %s requests at once and %s a minute per user", where,
             admission.max_concurrent_per_user or "any number of",
             admission.requests_per_minute_per_user or "any number of")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with listener, reloading([reloader] if reloader is not None else []):
        await stop.wait()
    log.info("limits server stopped")
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _server_tls(shared: SharedLimitsSettings) -> tuple[ssl.SSLContext | None, CertificateReloader | None]:
    """The listener's context (clients must present a certificate ``ca_file`` signed), and its reloader: a renewed
    certificate is used for new connections."""
    if shared.tls is None:
        return None, None
    certificate = CertificateFiles(shared.tls.cert_file, shared.tls.key_file)
    try:
        context = server_context(certificate, shared.tls.ca_file)
    except TlsFileError as exc:
        raise ConfigError(f"admission.shared_limits.tls: {exc}") from exc
    return context, CertificateReloader(certificate, [context])


def _unix_socket(path: Path) -> socket.socket:
    """A socket only this user and its group may use (put it in a directory of the service's own). One left by a
    server that was killed is replaced; one a running server answers on is not."""
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody answers: left behind
        else:
            raise ConfigError(f"admission.shared_limits.url: another limits server is listening on unix:{path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"admission.shared_limits.url: cannot listen on unix:{path} ({exc.strerror})") from exc
    finally:
        os.umask(old_umask)
    return sock
