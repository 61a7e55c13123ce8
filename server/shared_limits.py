"""A gateway's side of the shared per-user limits: each request of a signed-in user is counted by one
``airlock limits-server`` (``limits_server``) for every gateway, instead of by this process alone.

The wire is one connection a gateway keeps open, newline-delimited JSON, one small object a line:

    gateway -> server   {"hello": {"max_concurrent_per_user": 32, "requests_per_minute_per_user": 600}}
                                                              first: the gateway's own limits (the server's apply)
    server -> gateway   {"ready": true}                          the connection is served
    gateway -> server   {"enter": 7, "user": "<pseudonym>"}      count request 7 of this user, or refuse it
    server -> gateway   {"id": 7}                                 counted
                        {"id": 7, "refused": {"message": "...", "code": "...", "retry_after_s": 1}}
    gateway -> server   {"leave": 7}                              request 7 has ended

A user is known to the server by a pseudonym only: the HMAC-SHA256 of their key under the gateways' shared secret
(``privacy.salt_secret_file``), so the server holds no name, and the gateways agree on who is who. Everything the
server counted for a connection ends with it, so a gateway that dies leaves no request counted for ever.

While the server cannot be reached (not started yet, restarting, a network fault) or is slower than
``timeout_s``, the gateway counts the request itself (``limits.UserLimits``): the limits then hold per gateway, as
without a server, and nobody is refused for the server's sake. A request counted that way is never moved to the
server later, so for at most the length of the requests under way a user may have a little more than their limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import ssl
from typing import Any

import orjson

from .config import ConfigError, Settings, SharedLimitsSettings
from .errors import RateLimited
from .limits import UserLimits
from .tenancy import read_secret
from .tls import CertificateFiles, CertificateReloader, TlsFileError, client_context

log = logging.getLogger("airlock.shared_limits")

# Pseudonyms kept once computed (an HMAC per request would cost as much as a short request's screening).
PSEUDONYMS_KEPT = 4096
# A line from the server longer than this is not ours: the connection is dropped.
MAX_LINE_BYTES = 4096
# Past this many bytes not yet taken by the server, it is too slow to wait for: count requests here.
MAX_UNSENT_BYTES = 1024 * 1024
X509_V_ERR_HOSTNAME_MISMATCH = 62  # OpenSSL's x509_vfy.h


class ServerUnavailable(Exception):
    """The limits server did not answer (in time): count the request here."""


class SharedLimitsClient:
    """The connection to the limits server, kept open and re-made ``reconnect_interval_s`` after it is lost."""

    @classmethod
    def for_gateway(cls, config: Settings) -> SharedLimitsClient | None:
        """The client ``admission.shared_limits`` asks for, if any. Raises ConfigError without a common secret."""
        shared = config.admission.shared_limits
        if shared is None:
            return None
        if config.privacy.salt_secret_file is None:
            raise ConfigError(
                "admission.shared_limits needs privacy.salt_secret_file, the same file for every gateway: users are "
                "known to the limits server by a pseudonym keyed with it (never by their names), and the gateways "
                "must agree on it")
        limits = config.admission
        return cls(shared, read_secret(config.privacy),
                   {"max_concurrent_per_user": limits.max_concurrent_per_user,
                    "requests_per_minute_per_user": limits.requests_per_minute_per_user})

    def __init__(self, settings: SharedLimitsSettings, secret: bytes, limits: dict[str, int] | None = None) -> None:
        """``secret``: the gateways' common one (``tenancy.read_secret``); ``limits``: this gateway's own, which the
        server compares with its own (it warns when they differ). Raises ConfigError for unusable TLS files, naming
        the file."""
        self._settings = settings
        self._hello = orjson.dumps({"hello": limits or {}}) + b"\n"
        self._secret = secret
        self._pseudonyms: dict[str, str] = {}
        self._ssl: ssl.SSLContext | None = None
        # The client certificate, looked at again before each connection (a renewal is used from the next one).
        self.reloader: CertificateReloader | None = None
        if settings.tls is not None:
            certificate = CertificateFiles(settings.tls.cert_file, settings.tls.key_file)
            try:
                self._ssl = client_context(settings.tls.ca_file, certificate)
            except TlsFileError as exc:
                raise ConfigError(f"admission.shared_limits.tls: {exc}") from exc
            self.reloader = CertificateReloader(certificate, [self._ssl])
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._late: set[int] = set()  # entered requests whose answer came after the gateway stopped waiting
        self._next_id = 0
        self._connection = 0  # which connection an id was counted on: a leave goes only to that one
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self._timed_out = False  # the last connection was dropped for not answering (already logged)
        self._heard = 0  # lines read from the server so far
        self._checking: asyncio.Task[None] | None = None  # is the server silent? (``_suspect``)

    async def start(self) -> None:
        """Connect in the background: the gateway starts whether or not the server is up."""
        self._task = asyncio.create_task(self._keep_connected())

    async def close(self) -> None:
        for task in (self._task, self._checking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def pseudonym(self, user_key: str) -> str:
        name = self._pseudonyms.get(user_key)
        if name is None:
            if len(self._pseudonyms) >= PSEUDONYMS_KEPT:
                self._pseudonyms.clear()
            name = hmac.new(self._secret, b"shared-limits\0" + user_key.encode(), hashlib.sha256).hexdigest()
            self._pseudonyms[user_key] = name
        return name

    async def enter(self, user_key: str) -> tuple[int, int]:
        """Count a request of ``user_key`` at the server: (connection, id) to give back to ``leave``. Raises
        RateLimited when the server refuses it (over a limit), ServerUnavailable when it cannot say in time."""
        writer = self._writer
        if writer is None or not self.connected or writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            raise ServerUnavailable
        self._next_id += 1
        request_id, connection = self._next_id, self._connection
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        heard = self._heard
        writer.write(orjson.dumps({"enter": request_id, "user": self.pseudonym(user_key)}) + b"\n")
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                reply = await answer
        except TimeoutError:
            self._late.add(request_id)
            self._suspect(writer, heard)
            raise ServerUnavailable from None
        except ServerUnavailable:
            raise
        except BaseException:  # the client went away while waiting: give the count back when it comes
            self._late.add(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
        refused = reply.get("refused")
        if isinstance(refused, dict):
            raise RateLimited(str(refused.get("message", "over your limit")),
                              code=str(refused.get("code", "rate_limit_exceeded")),
                              retry_after_s=int(refused.get("retry_after_s", 1)))
        return connection, request_id

    def _suspect(self, writer: asyncio.StreamWriter, heard: int) -> None:
        """A request was not answered in time. That may be this gateway's own event loop, stalled past
        ``timeout_s`` with the answer already in the socket: the connection is given up only if nothing at all
        has come from the server since the request was sent (``heard``: lines read then), ``timeout_s`` later."""
        if self._heard == heard and self._checking is None and writer is self._writer and self.connected:
            self._checking = asyncio.create_task(self._give_up_if_silent(writer, heard))

    async def _give_up_if_silent(self, writer: asyncio.StreamWriter, heard: int) -> None:
        try:
            await asyncio.sleep(self._settings.timeout_s)
            if self._heard == heard:
                self._give_up(writer)
        finally:
            self._checking = None

    def _give_up(self, writer: asyncio.StreamWriter) -> None:
        """The server did not answer at all (hung, its host cut off without a reset, starved of CPU): drop the
        connection, so that every request is counted here at once instead of each waiting ``timeout_s``. The
        next connection must answer its hello in time before requests go there again."""
        if writer is not self._writer or not self.connected:
            return
        self.connected = False
        self._timed_out = True
        log.warning("shared limits: the limits server did not answer within %g s; counting this gateway's requests "
                    "here until it answers again", self._settings.timeout_s)
        writer.transport.abort()

    def leave(self, counted: tuple[int, int]) -> None:
        """The request has ended. Nothing to do if its connection is gone: the server let go of it then."""
        connection, request_id = counted
        if connection == self._connection and self._writer is not None and self.connected:
            self._writer.write(b'{"leave":%d}\n' % request_id)

    async def _keep_connected(self) -> None:
        settings = self._settings
        lost_logged = False
        while True:
            try:
                reader, writer = await self._open()
            except (OSError, TimeoutError, ValueError) as exc:
                if not lost_logged:
                    log.warning("shared limits: cannot reach the limits server (%s); each gateway counts its own "
                                "requests until it can, trying every %g s", _reason(exc), settings.reconnect_interval_s)
                    lost_logged = True
                await asyncio.sleep(settings.reconnect_interval_s)
                continue
            self._connection += 1
            self._writer, self.connected, self._timed_out = writer, True, False
            log.info("shared limits: connected to the limits server; users' limits are counted for every gateway")
            lost_logged = False
            try:
                await self._read(reader)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if not self._timed_out:
                    log.warning("shared limits: lost the limits server (%s); counting this gateway's requests here "
                                "until it is back", _reason(exc))
            else:
                if not self._timed_out:
                    log.warning("shared limits: the limits server closed the connection; counting this gateway's "
                                "requests here until it is back")
            finally:
                self._disconnected(writer)
            lost_logged = True
            await asyncio.sleep(settings.reconnect_interval_s)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection the server has said it serves (its "ready" to this gateway's hello): with TLS 1.3 a server
        refuses a client certificate only after the client's side of the handshake, so a connection is not taken
        for working before that answer. Raises OSError (TLS errors too), TimeoutError or ValueError."""
        settings = self._settings
        async with asyncio.timeout(max(settings.timeout_s, 5.0)):
            path, address = settings.socket_path, settings.tcp_address
            if path is not None:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
            else:
                assert address is not None
                if self.reloader is not None:
                    self.reloader.check()
                reader, writer = await asyncio.open_connection(address[0], address[1], ssl=self._ssl,
                                                               limit=MAX_LINE_BYTES)
            try:
                writer.write(self._hello)
                answer = await reader.readline()
                if not answer:
                    raise ConnectionResetError(errno.ECONNRESET, "it closed the connection before answering (was "
                                                                 "this gateway's certificate refused?)")
                if orjson.loads(answer) != {"ready": True}:
                    raise ValueError("not a limits server")
            except BaseException:
                writer.close()
                raise
            return reader, writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self._heard += 1
            reply = orjson.loads(line)
            request_id = reply["id"]
            answer = self._pending.get(request_id)
            if answer is not None and not answer.done():
                answer.set_result(reply)
            elif request_id in self._late or answer is not None:  # answered after its wait ended: give it back
                self._late.discard(request_id)
                if "refused" not in reply and self._writer is not None:
                    self._writer.write(b'{"leave":%d}\n' % request_id)

    def _disconnected(self, writer: asyncio.StreamWriter) -> None:
        self.connected, self._writer = False, None
        writer.close()
        self._late.clear()  # the server let go of everything this connection held
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ServerUnavailable())
        self._pending.clear()


class SharedUserLimits:
    """``Admission.user_limits`` with a limits server: counted there while it answers, here otherwise."""

    def __init__(self, client: SharedLimitsClient, local: UserLimits) -> None:
        self.client = client
        self.local = local

    def admit(self, user_key: str) -> _SharedAdmitted:
        return _SharedAdmitted(self, user_key)


class _SharedAdmitted:
    """``async with``: the request is counted, at the server or here, until the block ends, whatever ends it."""

    __slots__ = ("_counted", "_limits", "_local", "_user")

    def __init__(self, limits: SharedUserLimits, user_key: str) -> None:
        self._limits, self._user = limits, user_key
        self._counted: tuple[int, int] | None = None
        self._local = False

    async def __aenter__(self) -> None:
        limits = self._limits
        if limits.client.connected:
            try:
                self._counted = await limits.client.enter(self._user)
                return
            except ServerUnavailable:
                pass
        limits.local._enter(self._user)
        self._local = True

    async def __aexit__(self, *_: object) -> None:
        if self._counted is not None:
            self._limits.client.leave(self._counted)
        elif self._local:
            self._limits.local._leave(self._user)


def _reason(exc: BaseException) -> str:
    """What went wrong, without anything a peer sent or any address: the system's text for the error number, or a
    fixed text."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            return "its certificate does not name the host of admission.shared_limits.url"
        return f"its certificate was not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"  # OpenSSL's reason, e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED
    if isinstance(exc, ConnectionResetError) and exc.strerror and exc.strerror.startswith("it closed"):
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own text names the address ("Connect call failed (...)")
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return type(exc).__name__
