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
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

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
# A served certificate this close to its end is warned about at start and at every reload.
EXPIRY_WARNING_DAYS = 14
# Where systemd puts the copies LoadCredential= makes (also named by $CREDENTIALS_DIRECTORY).
SYSTEMD_CREDENTIALS = Path("/run/credentials")
PERMISSION_DENIED = "permission denied (is it readable by the service's user?)"


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

    def load_into(self, context: ssl.SSLContext) -> datetime | None:
        """Install this certificate in ``context`` (replacing the one it had), and warn about a key others can read
        or a certificate out of (or close to the end of) its validity. Returns the leaf's notAfter (None if it
        could not be read). Raises TlsFileError naming the file at fault.

        The files are read once, and the pair is first loaded into a throwaway context: OpenSSL installs a new
        certificate before it finds that the key does not match, and then drops the old key, so a failed load
        into a context in use would leave it with no usable certificate. Only a pair that loads goes in."""
        pem = self._read(self.cert_file)
        if self.chain_file is not None:
            chain = self._read(self.chain_file)
            if not _certificates(chain):
                raise TlsFileError(f"{self.chain_file}: holds no PEM certificate (a chain_file lists intermediates)")
            pem = pem.rstrip(b"\n") + b"\n" + chain
        key = self._read(self.key_file)
        self._warn_if_key_readable_by_others()
        try:
            _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pem, key)
        except _EncryptedKey as exc:
            raise TlsFileError(f"{self.key_file}: the private key is encrypted; give an unencrypted key (readable "
                               "only by the service's user)") from exc
        except ssl.SSLError as exc:
            raise TlsFileError(self._diagnose(pem, key, exc)) from exc
        except OSError as exc:
            raise TlsFileError(f"{self.cert_file} / {self.key_file}: cannot be loaded ({exc.strerror})") from exc
        try:
            _load_pair(context, pem, key)
        except (_EncryptedKey, ssl.SSLError, OSError) as exc:  # the same bytes loaded a moment ago
            raise TlsFileError(f"{self.cert_file} / {self.key_file}: cannot be loaded") from exc
        leaf = next(iter(_certificates(pem)), None)
        if leaf is None:
            return None
        warn_about_validity(self.cert_file, leaf)
        return leaf.not_valid_after_utc

    def not_after(self) -> datetime | None:
        """The leaf certificate's notAfter as the file says now (None if it cannot be read)."""
        try:
            leaf = next(iter(_certificates(self.cert_file.read_bytes())), None)
        except OSError:
            return None
        return leaf.not_valid_after_utc if leaf is not None else None

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise TlsFileError(f"{path}: no such file") from exc
        except PermissionError as exc:
            raise TlsFileError(f"{path}: {PERMISSION_DENIED}") from exc
        except OSError as exc:
            raise TlsFileError(f"{path}: cannot be read ({exc.strerror})") from exc

    def _diagnose(self, pem: bytes, key_pem: bytes, exc: ssl.SSLError) -> str:
        """Which file ``load_cert_chain`` choked on: it says only "PEM lib" or "key values mismatch", for all of
        them. Nothing read here reaches the message but the file's name."""
        certificates = _certificates(pem)
        if not certificates:
            return f"{self.cert_file}: not a PEM certificate"
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            return (f"{self.key_file}: the private key is encrypted; give an unencrypted key (readable only by the "
                    "service's user)")
        except (ValueError, UnsupportedAlgorithm):
            return f"{self.key_file}: not a PEM private key"
        if key.public_key() != certificates[0].public_key():
            return f"{self.key_file}: the key does not match the certificate in {self.cert_file}"
        return f"{self.cert_file} / {self.key_file}: cannot be used ({exc.reason or 'unreadable'})"

    def _warn_if_key_readable_by_others(self) -> None:
        """A private key every local account can read is a leak waiting to happen; warned about, not refused (a
        mounted Secret may come that way)."""
        try:
            mode = stat.S_IMODE(self.key_file.stat().st_mode)
        except OSError:
            return  # load_cert_chain says what is wrong with it
        if mode & 0o004:
            log.warning("%s: the private key is readable by every user on this machine (mode %04o): make it "
                        "readable only by the service's user (chmod 600, or 640 with its group)",
                        self.key_file, mode)


def _load_pair(context: ssl.SSLContext, pem: bytes, key: bytes) -> None:
    """``load_cert_chain`` from bytes: ssl reads only paths, so each is handed over in an anonymous in-memory file
    (memfd), never on disk."""
    with contextlib.ExitStack() as closing:
        paths = []
        for name, data in (("airlock-cert-chain", pem), ("airlock-key", key)):
            descriptor = os.memfd_create(name, os.MFD_CLOEXEC)
            closing.callback(os.close, descriptor)
            os.write(descriptor, data)
            paths.append(f"/proc/self/fd/{descriptor}")
        context.load_cert_chain(certfile=paths[0], keyfile=paths[1], password=_refuse_passphrase)


class _EncryptedKey(Exception):
    """Raised in place of a passphrase: OpenSSL would otherwise ask for one on the terminal, and wait."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey


def _certificates(pem: bytes) -> list[x509.Certificate]:
    """The PEM certificates in ``pem``, leaf first ([] if there are none, or they do not parse)."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def warn_about_validity(cert_file: Path, leaf: x509.Certificate, now: datetime | None = None) -> None:
    """Warn when a served certificate is expired, not valid yet, or expires within EXPIRY_WARNING_DAYS: clients
    refuse it then, and the cause is far from the symptom. The message names the file and the date only."""
    now = now or datetime.now(UTC)
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now >= not_after:
        log.warning("%s: the certificate expired on %s: clients refuse it; renew it", cert_file, _day(not_after))
    elif now < not_before:
        log.warning("%s: the certificate is not valid before %s: clients refuse it until then (is the clock "
                    "right?)", cert_file, _day(not_before))
    elif not_after - now < timedelta(days=EXPIRY_WARNING_DAYS):
        log.warning("%s: the certificate expires on %s (in %d days): renew it", cert_file, _day(not_after),
                    (not_after - now).days)


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def names_host(cert_file: Path, host: str) -> bool:
    """Whether the certificate in ``cert_file`` is valid for ``host`` (an IP address or a DNS name, as a client
    checks it: subject alternative names only, a wildcard standing for one leftmost label)."""
    leaf = next(iter(_certificates(CertificateFiles._read(cert_file))), None)
    if leaf is None:
        return False
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower().rstrip(".")
        parent = host.partition(".")[2]
        return any(name.lower() == host or (name.startswith("*.") and parent and name[2:].lower() == parent)
                   for name in names.get_values_for_type(x509.DNSName))
    return address in names.get_values_for_type(x509.IPAddress)


def from_systemd_credentials(paths: Sequence[Path], environ: Mapping[str, str] | None = None) -> bool:
    """Whether any of ``paths`` is one of systemd's credential copies (LoadCredential=), made once at the service's
    start: a renewed original reaches the service only with a restart."""
    environ = os.environ if environ is None else environ
    roots = [SYSTEMD_CREDENTIALS]
    if environ.get("CREDENTIALS_DIRECTORY"):
        roots.append(Path(environ["CREDENTIALS_DIRECTORY"]))
    return any(path.absolute().is_relative_to(root) for path in paths for root in roots)


def server_context(certificate: CertificateFiles, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """A listener's context; with ``client_ca_file``, clients must present a certificate that CA signed."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    certificate.load_into(context)
    if client_ca_file is not None:
        _load_ca(context, client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca_file: Path | None, certificate: CertificateFiles | None = None) -> ssl.SSLContext:
    """A client's context: the peer is verified (host name included) against ``ca_file`` alone (the system's CAs
    only when there is none), and ``certificate`` is presented when the server asks for one. A private CA replaces
    the system's store rather than joining it: any public or corporate CA could otherwise vouch for an "engine"."""
    if ca_file is None:
        context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    else:
        context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED and check_hostname by default
        _load_ca(context, ca_file)
    if certificate is not None:
        certificate.load_into(context)
    return context


def own_server_client_context(certificate: CertificateFiles) -> ssl.SSLContext:
    """A client's context for a server in the same pod or host, reached on loopback: ``certificate`` is presented
    (the engine's own, which its client CA issued), the server is not verified (it is this machine's own process,
    as in the Helm chart's health probe; nothing secret is sent to it)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    certificate.load_into(context)
    return context


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError as exc:
        raise TlsFileError(f"{ca_file}: no such file") from exc
    except PermissionError as exc:
        raise TlsFileError(f"{ca_file}: {PERMISSION_DENIED}") from exc
    except ssl.SSLError as exc:
        raise TlsFileError(f"{ca_file}: not a PEM CA certificate bundle") from exc
    except OSError as exc:
        raise TlsFileError(f"{ca_file}: cannot be read ({exc.strerror})") from exc


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
    # The notAfter of the certificate in use (for airlock_tls_certificate_expiry_timestamp_seconds).
    not_after: datetime | None = field(default=None, init=False)
    _stamp: tuple[tuple[int, int, int, int], ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self._stamp = _stamp(self.certificate.paths)
        self.not_after = self.certificate.not_after()

    def check(self) -> bool:
        """Reload if the files changed since the last successful load; True when a new certificate went in."""
        stamp = _stamp(self.certificate.paths)
        if stamp == self._stamp:
            return False
        not_after = self.not_after
        try:
            for context in self.contexts:
                not_after = self.certificate.load_into(context)
        except TlsFileError as exc:
            log.warning("a changed certificate could not be loaded; the previous one stays in use: %s", exc)
            return False
        self._stamp = stamp
        self.not_after = not_after
        self.reloads += 1
        log.info("certificate reloaded from %s", self.certificate.cert_file)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.check()
            except Exception as exc:  # a reloader that died would never pick up a renewal again
                log.warning("checking %s for a renewal failed (%s); trying again in %.0f s",
                            self.certificate.cert_file, type(exc).__name__, self.interval_s)


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
