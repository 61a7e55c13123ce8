"""Ed25519 signatures over a bundle's ``SHA256SUMS`` and each model's ``airlock-manifest.sha256``: checksums prove that
nothing changed on the way, a signature proves who wrote them (the checksums travel on the same medium as the files).

Keys are the ``cryptography`` package's Ed25519 (RFC 8032) in PEM: the private key PKCS#8, unencrypted, in a file only
its owner may read (0600, as OpenSSH insists for its keys); the public key SubjectPublicKeyInfo. A signature is the
raw 64-byte Ed25519 signature over the file's exact bytes, in ``<file>.sig``, so OpenSSL checks it too::

    openssl pkeyutl -verify -pubin -inkey airlock-signing.pub -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig

The site keeps the private key on the machine that makes bundles, never on the transfer medium; the public key reaches
the far side by another way and is pinned there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .regular_file import open_regular

SIGNATURE_SUFFIX = ".sig"
SIGNATURE_BYTES = 64  # RFC 8032, section 5.1.6
MAX_KEY_BYTES = 64 * 1024


class SignatureError(Exception):
    """A key cannot be used, or a signature is missing or does not verify. The message names the file."""


def signature_path(path: Path) -> Path:
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwriting, never through a link) with ``mode`` from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)


def generate_keypair(key_path: Path, public_path: Path) -> None:
    """A new Ed25519 key pair: the private key 0600, the public key 0644. Refuses to overwrite either file."""
    if key_path.absolute() == public_path.absolute():
        raise SignatureError(f"--out-key and --out-public are the same file ({key_path}): give two names")
    for path in (key_path, public_path):
        if path.exists() or path.is_symlink():
            raise SignatureError(f"{path} already exists: refusing to overwrite it")
        if not path.absolute().parent.is_dir():
            raise SignatureError(f"{path.absolute().parent} is not a directory: create it first")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(key_path, private, 0o600)
    try:
        _write_new(public_path, public, 0o644)
    except OSError:
        key_path.unlink()  # no private key without its public half
        raise


def _read_key_file(path: Path, what: str) -> tuple[bytes, os.stat_result]:
    """The key's bytes, through links (the admin chose the path; Kubernetes mounts a ConfigMap's or Secret's keys as
    links into ``..data``), but only from a regular file: a FIFO there would hang the read."""
    try:
        with open_regular(path, follow=True) as stream:
            return stream.read(MAX_KEY_BYTES + 1), os.fstat(stream.fileno())
    except OSError as exc:
        raise SignatureError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key; refused if anyone but its owner may read it (as OpenSSH refuses such keys)."""
    data, info = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        hint = " (that is the public half: give the private key)" if b"PUBLIC KEY" in data else ""
        raise SignatureError(f"{path} is not an unencrypted PEM private key{hint} (make one with `airlock keygen`)"
                             ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key (make one with `airlock keygen`)")
    # What it is first, then who may read it: a public key with mode 0644 is not told to chmod 600.
    if info.st_mode & 0o077:
        raise SignatureError(f"the signing key {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}):"
                             f" chmod 600 it")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data, _ = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not a PEM public key (the .pub file `airlock keygen` wrote)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, path: Path, data: bytes) -> Path:
    """Write ``<path>.sig``: the signature over ``data``, the bytes the caller wrote to ``path``."""
    target = signature_path(path)
    _write_new(target, key.sign(data), 0o644)
    return target


def check(key: Ed25519PublicKey, path: Path, data: bytes) -> None:
    """Check ``<path>.sig`` over ``data`` (the bytes of ``path`` the caller read once and goes on to use)."""
    target = signature_path(path)
    try:
        with open_regular(target) as stream:  # on the transfer medium: a link there is refused
            signature = stream.read(SIGNATURE_BYTES + 1)
    except FileNotFoundError as exc:
        raise SignatureError(f"{target} is missing: {path.name} is not signed") from exc
    except OSError as exc:
        raise SignatureError(f"cannot read {target}: {exc.strerror}") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{target} is not an Ed25519 signature ({SIGNATURE_BYTES} bytes)")
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureError(f"{target} does not verify: {path.name} was changed after signing, or signed "
                             "with another key") from exc
