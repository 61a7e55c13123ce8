"""TLS contexts built from PEM files, and renewed files picked up without a restart.

Both hops use these: the gateway's listener (``server_context``) and the gateway's connections to engines served
over TCP (``client_context``: it verifies the engine against a private CA and presents the gateway's own
certificate). Settings follow Mozilla's "intermediate" profile: TLS 1.2 or newer, forward-secret AEAD ciphers only
(https://wiki.mozilla.org/Security/Server_Side_TLS); TLS 1.3's suites are OpenSSL's defaults, all AEAD.

A context's certificate can be replaced in place (``SSLContext.load_cert_chain`` again): connections opened
afterwards get the new one, connections already open keep theirs, so a renewal drops no stream. vLLM's
``--enable-ssl-refresh`` does the same on the engine side (``vllm/entrypoints/ssl.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("airlock.tls")

# Mozilla intermediate, TLS 1.2 part (TLS 1.3 suites are not set by a cipher string).
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
# How often certificate files are looked at for a change.
RELOAD_INTERVAL_S = 2.0


class TlsFileError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file, never its contents."""


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate chain (leaf first, intermediates after it, or in ``chain_file``) and its private key."""

    cert_file: Path
    key_file: Path
    chain_file: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.chain_file) if p is not None)

    def load_into(self, context: ssl.SSLContext) -> None:
        """Install this certificate in ``context`` (replacing the one it had). Raises TlsFileError."""
        certfile = self.cert_file
        try:
            if self.chain_file is None:
                context.load_cert_chain(certfile=certfile, keyfile=self.key_file)
                return
            # ssl takes leaf + chain from one file: join them in an anonymous in-memory file (memfd), not on disk.
            pem = certfile.read_bytes().rstrip(b"\n") + b"\n" + self.chain_file.read_bytes()
            joined = os.memfd_create("airlock-cert-chain", os.MFD_CLOEXEC)
            try:
                os.write(joined, pem)
                context.load_cert_chain(certfile=f"/proc/self/fd/{joined}", keyfile=self.key_file)
            finally:
                os.close(joined)
        except FileNotFoundError as exc:
            raise TlsFileError(f"{self._culprit(exc)}: no such file") from exc
        except PermissionError as exc:
            raise TlsFileError(
                f"{self._culprit(exc)}: permission denied (is it readable by the service's user?)"
            ) from exc
        except ssl.SSLError as exc:
            raise TlsFileError(
                f"{self.cert_file} / {self.key_file}: not a PEM certificate and its matching private key "
                f"({exc.reason or 'unreadable'})"
            ) from exc
        except OSError as exc:
            raise TlsFileError(f"{self.cert_file}: cannot be read ({exc.strerror})") from exc


    def _culprit(self, exc: OSError) -> object:
        """The file an error is about: ``load_cert_chain`` raises without naming it (exc.filename is None)."""
        if exc.filename is not None:
            return exc.filename
        unreadable = (path for path in self.paths if not os.access(path, os.R_OK))
        return next(unreadable, self.cert_file)


def server_context(certificate: CertificateFiles, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """A listener's context; with ``client_ca_file``, clients must present a certificate that CA signed."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    certificate.load_into(context)
    if client_ca_file is not None:
        _load_ca(context, client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca_file: Path | None, certificate: CertificateFiles | None = None) -> ssl.SSLContext:
    """A client's context: the peer is verified (host name included) against ``ca_file`` (default: the system's
    CAs), and ``certificate`` is presented when the server asks for one."""
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    if ca_file is not None:
        _load_ca(context, ca_file)
    if certificate is not None:
        certificate.load_into(context)
    return context


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError as exc:
        raise TlsFileError(f"{ca_file}: no such file") from exc
    except PermissionError as exc:
        raise TlsFileError(f"{ca_file}: permission denied") from exc
    except ssl.SSLError as exc:
        raise TlsFileError(f"{ca_file}: not a PEM CA certificate bundle") from exc


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int, int, int], ...]:
    """What changes when a file is rewritten or replaced (renamed over, or a Kubernetes Secret's symlink swap)."""
    stamps = []
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            stamps.append((0, 0, 0, 0))
            continue
        stamps.append((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(stamps)


@dataclass
class CertificateReloader:
    """Keeps the certificate in ``contexts`` in step with its files: looked at every ``interval_s``; a new pair
    that does not load (half written, key and certificate not matching yet) leaves the old one in place and is tried
    again at the next look."""

    certificate: CertificateFiles
    contexts: Sequence[ssl.SSLContext]
    interval_s: float = RELOAD_INTERVAL_S
    reloads: int = 0
    _stamp: tuple[tuple[int, int, int, int], ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self._stamp = _stamp(self.certificate.paths)

    def check(self) -> bool:
        """Reload if the files changed since the last successful load; True when a new certificate went in."""
        stamp = _stamp(self.certificate.paths)
        if stamp == self._stamp:
            return False
        try:
            for context in self.contexts:
                self.certificate.load_into(context)
        except TlsFileError as exc:
            log.warning("a changed certificate could not be loaded; the previous one stays in use: %s", exc)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("certificate reloaded from %s", self.certificate.cert_file)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()


@contextlib.asynccontextmanager
async def reloading(reloaders: Sequence[CertificateReloader]) -> AsyncIterator[None]:
    """Run the reloaders in the background for the duration of the block."""
    tasks = [asyncio.create_task(reloader.run()) for reloader in reloaders]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
