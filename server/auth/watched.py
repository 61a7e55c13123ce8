"""A credentials file that is re-read when it changes, so users and keys change without a restart."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("airlock.auth")


class CredentialsFileError(Exception):
    """The file cannot be used. The message names the file and line, never a credential."""


class WatchedFile(Generic[T]):
    """Parsed contents of ``path``, refreshed when the file is replaced or edited.

    A file that turns invalid is not half-used: until it is fixed, ``current`` is None and every credential it
    held is refused (failing closed, so a botched edit cannot keep a removed user in).
    """

    def __init__(self, path: Path, parse: Callable[[str, Path], T], check_interval_s: float = 1.0) -> None:
        self.path = path
        self._parse = parse
        self._check_interval_s = check_interval_s
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._value: T | None = None
        self.version = 0
        self._load(self._stat(), strict=True)

    @property
    def current(self) -> T | None:
        now = time.monotonic()
        if now - self._checked_at >= self._check_interval_s:
            self._checked_at = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._load(stamp, strict=False)
        return self._value

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _load(self, stamp: tuple[int, int, int] | None, strict: bool) -> None:
        self._stamp = stamp
        self.version += 1
        try:
            text = self.path.read_text(encoding="utf-8") if stamp is not None else ""
            self._value = self._parse(text, self.path)
        except (OSError, UnicodeDecodeError, CredentialsFileError) as exc:
            self._value = None
            reason = exc if isinstance(exc, CredentialsFileError) else f"{self.path}: cannot be read"
            if strict:
                raise CredentialsFileError(str(reason)) from exc
            log.error("credentials file rejected, refusing its credentials until it is fixed: %s", reason)
            return
        if not strict:
            log.info("credentials file reloaded: %s", self.path)
