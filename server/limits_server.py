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
from pathlib import Path
from typing import Any

import orjson

from .config import ConfigError, Settings, SharedLimitsSettings
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


class LimitsServer:
    """The counts, and one task per connected gateway."""

    def __init__(self, settings: Settings) -> None:
        self.limits = UserLimits(settings.admission)
        self.connections = 0
        self._own = {"max_concurrent_per_user": settings.admission.max_concurrent_per_user,
                     "requests_per_minute_per_user": settings.admission.requests_per_minute_per_user}

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One gateway's connection: its requests, until it closes or breaks the protocol."""
        counted: dict[int, str] = {}
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
            log.warning("limits server: dropped a gateway's connection (%s); its %d requests are no longer counted",
                        type(exc).__name__, len(counted))
        finally:
            self.connections -= 1
            for user in counted.values():
                self.limits._leave(user)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

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
            log.warning("limits server: a gateway's settings differ (%s); this server's apply to all of its users. "
                        "Give the limits server the gateways' admission settings", "; ".join(differing))


def _request_id(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("a request id is a non-negative integer")
    return value


async def run_limits_server(settings: Settings, host: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, on ``admission.shared_limits.url`` (its port on ``host`` for tcp://).
    Raises ConfigError for a URL it cannot listen on or unusable TLS files."""
    from .runner import listen  # binds with the gateway's messages for a taken port or an unknown name

    shared = settings.admission.shared_limits
    if shared is None:
        raise ConfigError("admission.shared_limits: set url (unix:/path or tcp://host:port) and, for tcp://, tls")
    harden_process()
    server = LimitsServer(settings)
    path, address = shared.socket_path, shared.tcp_address
    reloader = None
    if path is not None:
        listener = await asyncio.start_unix_server(server.serve_connection, sock=_unix_socket(path),
                                                   limit=MAX_LINE_BYTES)
        where = f"unix:{path}"
    else:
        assert address is not None
        context, reloader = _server_tls(shared)
        bind = host if host is not None else address[0]
        listener = await asyncio.start_server(server.serve_connection, sock=listen(bind, address[1], "limits server"),
                                              ssl=context, limit=MAX_LINE_BYTES, ssl_handshake_timeout=10.0)
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
    """A socket only this user and its group may use (put it in a directory of the service's own)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()  # left by a server that was killed
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
