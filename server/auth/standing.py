"""Whether the credential a console session was opened with still stands, checked on every request of the session.

A session remembers what it was made from, never the secret itself:

- a Basic user: the htpasswd file, the user name and a keyed fingerprint (HMAC with a random per-process key) of the
  user's bcrypt hash as it was when the password was checked. Removing the user or setting a new password (a new
  hash, new salt) ends every session opened with the old one.
- an OIDC user: the ID token's ``exp``. The session ends then at the latest, whatever ``console.session_idle_s`` and
  ``session_max_s`` say; groups come from the token, so a change at the provider reaches the console by then.

Why re-check rather than push invalidations from the file watchers: the check is pull-based and costs next to
nothing per request. ``WatchedFile.current`` looks at the file at most once a second (one ``stat``); while the file's
version is the one the session last saw, the answer is an integer comparison. Only after the file changed does a
session compute one HMAC over the new hash (no bcrypt, microseconds) and, if it still matches, remember the new
version. So a removal or a password change ends the session on its next request, within about a second of the file
being written, and nothing has to keep an index of sessions by user (which would itself be a table of names).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .watched import WatchedFile

# Fingerprints are keyed per process: a fingerprint cannot be matched against any hash outside this process.
_FINGERPRINT_KEY = secrets.token_bytes(32)


class Standing(Protocol):
    """What a session was opened with. ``holds`` is called on every request of the session: it must be cheap."""

    def holds(self) -> bool:
        """Whether the credential is still good; False ends the session for good."""

    @property
    def ends_at(self) -> float | None:
        """Wall-clock time (epoch seconds) at which the credential lapses on its own, if it does."""


class Unconditional:
    """No credential to re-check: nobody signs in (no authentication configured, loopback only)."""

    ends_at: float | None = None

    def holds(self) -> bool:
        return True


def fingerprint(hashed: bytes) -> bytes:
    return hmac.new(_FINGERPRINT_KEY, hashed, hashlib.sha256).digest()


@dataclass
class HtpasswdEntry:
    """A Basic user's entry as it was when the password was checked (see the module docstring for the cost).

    A file that turns invalid ends every session that makes a request meanwhile (failing closed, as Basic does).
    """

    file: WatchedFile[dict[str, bytes]]
    user: str
    hash_fingerprint: bytes
    version: int  # the file version this entry was last seen unchanged in
    ends_at: float | None = field(default=None, init=False)

    def holds(self) -> bool:
        users = self.file.current  # re-reads the file at most once a second; None while it is invalid
        if users is None:
            return False
        if self.file.version == self.version:
            return True
        hashed = users.get(self.user)
        if hashed is None or not hmac.compare_digest(fingerprint(hashed), self.hash_fingerprint):
            return False
        self.version = self.file.version
        return True


@dataclass(frozen=True)
class TokenExpiry:
    """An OIDC sign-in: good until the ID token's ``exp`` (no leeway: the session never outlives the token)."""

    ends_at: float
    wall_clock: Callable[[], float] = time.time

    def holds(self) -> bool:
        return self.wall_clock() < self.ends_at
