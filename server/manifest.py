"""Model manifests: the SHA-256 of every file in a model directory, written where the model was fetched and checked
where it runs, so that weights carried into an air-gapped site on a disk are known to be the ones that left.

The manifest is ``airlock-manifest.sha256`` inside the model directory, in ``sha256sum`` format (``<hex>  <path>``),
so ``sha256sum -c`` can check it too. A file that is missing, changed, or not listed at all is a mismatch: an added
file can change what vLLM loads (a chat template, a tokenizer, a config). ``airlock-manifest.sha256.sig`` (see
``signing.py``) says who wrote the manifest.

What a directory may hold: regular files, directories, and symlinks whose resolved target stays inside it. A link out
of it is refused even when its bytes match (its target can change after the check, and the check is then worthless),
and so are dangling links, FIFOs, sockets and device files, each by name. Nothing is followed or opened before it is
classified with ``lstat`` (opening a FIFO blocks); a file is then opened once (``regular_file.open_regular``). A name
that is not printable text (a line break, a control character such as a terminal's escape, bytes that are not UTF-8)
is refused too: a ``sha256sum`` line cannot hold it unescaped, and printing it is not safe.

A hard link is not refused: it is the file itself (the same inode, see link(2)), hashed like any file. Like any file,
whoever can write that inode, under any name, can change it after the check: what is checked is what vLLM loads only
while nobody but its owner can write the model directory and its files (the systemd install's root-owned
``/var/lib/airlock/models``, the chart's read-only volume). The check runs before vLLM starts and vLLM opens the files
by name later: that gap is closed by those permissions, not by the check.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .regular_file import kind, open_regular
from .signing import SIGNATURE_SUFFIX, check

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MANIFEST_NAME = "airlock-manifest.sha256"
# Never listed in the manifest itself: the manifest and its signature, at the top of the model directory.
MANIFEST_FILES = frozenset({MANIFEST_NAME, MANIFEST_NAME + SIGNATURE_SUFFIX})
READ_BYTES = 8 * 1024 * 1024
MAX_LISTING_BYTES = 64 * 1024 * 1024
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
UNPRINTABLE = "a name that is not printable text: a line break, a control character, or bytes that are not UTF-8"

Progress = Callable[[int], None]


class ManifestError(Exception):
    """The manifest is missing or unreadable, or a directory holds what cannot be checked (named)."""


@dataclass
class Verification:
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    # "name (why)": links out of the directory, dangling links, FIFOs, sockets, devices.
    refused: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.unlisted or self.refused)

    def summary(self) -> str:
        parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for label, names in (("refused", self.refused), ("changed", self.changed),
                                      ("missing", self.missing), ("not in the manifest", self.unlisted)) if names]
        return "; ".join(parts) if parts else f"{self.checked} files match the manifest"


@dataclass
class Scan:
    """What a directory holds, by relative name, classified without following or opening anything."""

    root: Path
    # Name to the path to open: the file itself, or the resolved target of a link that stays inside.
    files: dict[str, Path] = field(default_factory=dict)
    # Links that stay inside: name to their target relative to the link's own directory (how a copy recreates them).
    links: dict[str, str] = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def refusals(self) -> list[str]:
        return [f"{name} ({why})" for name, why in sorted(self.refused.items())]


def scan(directory: Path, skip: frozenset[str] = frozenset()) -> Scan:
    """Walk ``directory`` with lstat only. Links that stay inside are kept (a linked directory is not walked again:
    its files are checked under their own names); everything else that is not a regular file or directory is refused.
    ``skip``: names at the top left out (the manifest and its signature)."""
    root = directory.resolve()
    if not root.is_dir():
        raise ManifestError(f"{directory} is not a directory")
    found = Scan(root)

    def link(name: str, path: Path) -> None:
        target = Path(os.path.realpath(path))
        try:
            mode = os.lstat(target).st_mode  # realpath resolved every link: this is what the link reaches
        except FileNotFoundError:
            found.refused[name] = "a dangling symlink"
            return
        except OSError as exc:
            found.refused[name] = f"a symlink that cannot be resolved: {exc.strerror}"
            return
        if not target.is_relative_to(root):
            found.refused[name] = "a symlink to outside the directory"
            return
        if stat.S_ISLNK(mode):  # realpath gives up on a loop and returns a link
            found.refused[name] = "a symlink loop"
            return
        if stat.S_ISREG(mode):
            found.files[name] = target
        elif not stat.S_ISDIR(mode):
            found.refused[name] = f"a symlink to {kind(mode)}"
            return
        found.links[name] = os.path.relpath(target, path.parent)

    def walk(relative: str) -> None:
        with os.scandir(root / relative) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        for entry in entries:
            if not relative and entry.name in skip:
                continue
            name = f"{relative}/{entry.name}" if relative else entry.name
            if not entry.name.isprintable():  # Unicode's Cc, Cf, Zl, Zp..., and the surrogates of undecodable bytes
                found.refused[ascii(name)[1:-1]] = UNPRINTABLE
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                found.directories.append(name)
                walk(name)
            elif stat.S_ISREG(mode):
                found.files[name] = root / name
            elif stat.S_ISLNK(mode):
                link(name, root / name)
            else:
                found.refused[name] = kind(mode)

    walk("")
    return found


def model_files(directory: Path) -> list[str]:
    """Every file of the model (links that stay inside included), relative, sorted; the manifest excluded."""
    return sorted(scan(directory, MANIFEST_FILES).files)


def read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path``, refused unless it is a regular file (checked on the opened descriptor)."""
    with open_regular(path) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"{path} is larger than {limit} bytes")
    return data


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    """The SHA-256 of a regular file, opened once and never through a link in its last component."""
    digest = hashlib.sha256()
    try:
        with open_regular(path) as stream:
            while chunk := stream.read(READ_BYTES):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    except OSError as exc:
        raise ManifestError(f"cannot open {path}: {exc.strerror}") from exc
    return digest.hexdigest()


def total_bytes(directory: Path, names: list[str]) -> int:
    """What hashing ``names`` will read (for a progress bar); stat only, nothing opened."""
    total = 0
    for name in names:
        try:
            info = os.stat(directory / name)
        except OSError:
            continue
        total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def refuse_unsafe(found: Scan, directory: Path) -> None:
    if found.refused:
        raise ManifestError(f"{directory} holds what cannot be carried or checked: {', '.join(found.refusals())}")


def write_listing(path: Path, found: Scan, progress: Progress | None = None) -> bytes:
    """``<sha256>  <name>`` for every file of ``found``, written to ``path``; returns the bytes written."""
    data = "".join(f"{sha256_of(real, progress)}  {name}\n" for name, real in sorted(found.files.items())).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    return data


def write_manifest(directory: Path, progress: Progress | None = None) -> bytes:
    """Hash every file of the model and write the manifest next to them (its bytes returned, for signing). A link
    out of the directory, a dangling link or a special file stops it, by name."""
    found = scan(directory, MANIFEST_FILES)
    refuse_unsafe(found, directory)
    if not found.files:
        raise ManifestError(f"{directory} holds no files")
    return write_listing(directory / MANIFEST_NAME, found, progress)


def parse_listing(text: str, path: Path) -> dict[str, str]:
    """File name to SHA-256 from ``sha256sum`` output; names must be relative, stay inside, be printable (as ``scan``
    requires: then no name needs sha256sum's backslash escaping) and be listed once. Lines end at "\n" only, as
    sha256sum's do (``str.splitlines`` would also split at U+2028 and other Unicode line breaks)."""
    listed: dict[str, str] = {}
    for number, line in enumerate(text.removesuffix("\n").split("\n"), start=1):
        match = _LINE.match(line)
        name = match.group(2) if match else ""
        if match is None or ".." in Path(name).parts or name.startswith("/") or not name.isprintable():
            raise ManifestError(f"{path}: line {number} is not '<sha256>  <relative path>'")
        if name in listed:
            raise ManifestError(f"{path}: line {number}: {name} is listed twice")
        listed[name] = match.group(1)
    if not listed:
        raise ManifestError(f"{path} lists no files")
    return listed


def read_listing(path: Path, public_key: Ed25519PublicKey | None = None) -> dict[str, str]:
    """A checksum file, read once; with ``public_key``, its ``.sig`` must verify over exactly those bytes
    (``signing.SignatureError`` otherwise)."""
    try:
        data = read_regular(path, MAX_LISTING_BYTES)
    except FileNotFoundError as exc:
        raise ManifestError(f"{path.parent} has no {path.name}") from exc
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from exc
    if public_key is not None:
        check(public_key, path, data)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not text") from exc
    return parse_listing(text, path)


def read_manifest(directory: Path, public_key: Ed25519PublicKey | None = None) -> dict[str, str]:
    """File name to SHA-256, as the manifest lists them (its signature checked when a key is given)."""
    return read_listing(directory / MANIFEST_NAME, public_key)


def listed_bytes(directory: Path) -> int:
    """What verifying will read (for a progress bar)."""
    return total_bytes(directory, list(read_manifest(directory)))


def check_listed(directory: Path, listed: dict[str, str], skip: frozenset[str],
                 progress: Progress | None = None) -> Verification:
    """Every listed file present and matching, nothing unlisted, nothing that cannot be checked."""
    found = scan(directory, skip)
    result = Verification(unlisted=[name for name in found.files if name not in listed], refused=found.refusals())
    for name, expected in sorted(listed.items()):
        real = found.files.get(name)
        if real is None:
            if name not in found.refused:
                result.missing.append(name)
            continue
        try:
            digest = sha256_of(real, progress)
        except ManifestError:  # swapped for a link or a special file since the scan
            result.refused.append(f"{name} (not a regular file when opened)")
            continue
        result.checked += 1
        if digest != expected:
            result.changed.append(name)
    return result


def verify_model(directory: Path, progress: Progress | None = None,
                 public_key: Ed25519PublicKey | None = None) -> Verification:
    """The model against its manifest; with ``public_key``, the manifest's signature first."""
    return check_listed(directory, read_manifest(directory, public_key), MANIFEST_FILES, progress)
