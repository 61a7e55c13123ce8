"""Model manifests: the SHA-256 of every file in a model directory, written where the model was fetched and checked
where it runs, so that weights carried into an air-gapped site on a disk are known to be the ones that left.

The manifest is ``airlock-manifest.sha256`` inside the model directory, in ``sha256sum`` format (``<hex>  <path>``),
so ``sha256sum -c`` can check it too. A file that is missing, changed, or not listed at all is a mismatch: an added
file can change what vLLM loads (a chat template, a tokenizer, a config).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "airlock-manifest.sha256"
READ_BYTES = 8 * 1024 * 1024
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")

Progress = Callable[[int], None]


class ManifestError(Exception):
    """The manifest is missing or unreadable."""


@dataclass
class Verification:
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.unlisted)

    def summary(self) -> str:
        parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for label, names in (("changed", self.changed), ("missing", self.missing),
                                      ("not in the manifest", self.unlisted)) if names]
        return "; ".join(parts) if parts else f"{self.checked} files match the manifest"


def model_files(directory: Path) -> list[str]:
    """Every regular file under ``directory``, relative, sorted; the manifest itself excluded. Symlinked files and
    directories are followed (a directory reached twice is walked once), so nothing linked in escapes the check."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        identity = os.stat(root)
        if (identity.st_dev, identity.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((identity.st_dev, identity.st_ino))
        for name in files:
            path = Path(root) / name
            if path.is_file() and not (Path(root) == directory and name == MANIFEST_NAME):
                found.append(str(path.relative_to(directory)))
    return sorted(found)


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(READ_BYTES):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def total_bytes(directory: Path, names: list[str]) -> int:
    return sum((directory / name).stat().st_size for name in names if (directory / name).is_file())


def write_manifest(directory: Path, progress: Progress | None = None) -> Path:
    """Hash every file of the model and write the manifest next to them."""
    lines = [f"{sha256_of(directory / name, progress)}  {name}\n" for name in model_files(directory)]
    if not lines:
        raise ManifestError(f"{directory} holds no files")
    manifest = directory / MANIFEST_NAME
    manifest.write_text("".join(lines))
    return manifest


def read_manifest(directory: Path) -> dict[str, str]:
    """File name to SHA-256, as the manifest lists them."""
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}") from exc
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from exc
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.match(line)
        if match is None or ".." in Path(match.group(2)).parts or match.group(2).startswith("/"):
            raise ManifestError(f"{path}: line {number} is not '<sha256>  <relative path>'")
        listed[match.group(2)] = match.group(1)
    if not listed:
        raise ManifestError(f"{path} lists no files")
    return listed


def listed_bytes(directory: Path) -> int:
    """What verifying will read (for a progress bar)."""
    return total_bytes(directory, list(read_manifest(directory)))


def verify_model(directory: Path, progress: Progress | None = None) -> Verification:
    listed = read_manifest(directory)
    result = Verification(unlisted=[name for name in model_files(directory) if name not in listed])
    for name, expected in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            result.missing.append(name)
            continue
        result.checked += 1
        if sha256_of(path, progress) != expected:
            result.changed.append(name)
    return result
