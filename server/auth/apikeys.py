"""API keys for SDK clients: ``alk_<id>_<secret>``, stored as SHA-256 hashes in a JSON file.

The id finds the entry in one dictionary lookup (no scan over all keys); the secret is compared in constant time,
and an unknown id costs the same hash-and-compare as a known one. The secret has 256 random bits, so a fast hash
is safe here (unlike a password, it cannot be guessed from a dictionary).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from .principal import Principal, local_principal
from .standing import Standing
from .watched import CredentialsFileError, WatchedFile

PREFIX = "alk_"
KEY_PATTERN = re.compile(r"^alk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()
# Users whose Principal an authenticator keeps made (see ApiKeyAuthenticator._principal); past it the table restarts.
PRINCIPALS_KEPT = 4096


@dataclass(frozen=True)
class ApiKey:
    """One stored key. ``sha256`` is the hash of the secret part; the key itself is never stored."""

    id: str
    user: str
    name: str
    sha256: str
    created: str
    expires: str | None = None
    revoked: str | None = None

    @cached_property
    def expires_at(self) -> float | None:
        """``expires`` as a POSIX timestamp, parsed once: every request with the key compares it."""
        return datetime.fromisoformat(self.expires).timestamp() if self.expires else None

    def state(self, now: datetime) -> str:
        return self.state_at(now.timestamp())

    def state_at(self, timestamp: float) -> str:
        """The state at ``timestamp`` (POSIX seconds, as ``time.time()``)."""
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timestamp:
            return "expired"
        return "active"


def looks_like_api_key(token: str) -> bool:
    return token.startswith(PREFIX)


def new_key(user: str, name: str, lifetime: timedelta | None, now: datetime | None = None) -> tuple[str, ApiKey]:
    """A fresh key (shown once) and the entry to store."""
    now = now or datetime.now(UTC)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    entry = ApiKey(
        id=key_id, user=user, name=name, sha256=hashlib.sha256(secret.encode()).hexdigest(),
        created=now.isoformat(timespec="seconds"),
        expires=(now + lifetime).isoformat(timespec="seconds") if lifetime else None,
    )
    return f"{PREFIX}{key_id}_{secret}", entry


def revoke(entry: ApiKey, now: datetime | None = None) -> ApiKey:
    return replace(entry, revoked=(now or datetime.now(UTC)).isoformat(timespec="seconds"))


def parse_keys(text: str, path: Path) -> dict[str, ApiKey]:
    if not text.strip():
        return {}
    try:
        data: Any = json.loads(text)
        entries = [_checked(ApiKey(**entry)) for entry in data["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsFileError(f"{path}: not an Airlock API key file") from exc
    return {entry.id: entry for entry in entries}


def _checked(entry: ApiKey) -> ApiKey:
    """Refuse a hand-edited entry that would fail later, at every request."""
    strings = (entry.id, entry.user, entry.name, entry.sha256, entry.created)
    if not all(isinstance(value, str) for value in strings) or not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
        raise ValueError("malformed entry")
    for stamp in (entry.expires, entry.revoked):
        if stamp is not None and (not isinstance(stamp, str) or datetime.fromisoformat(stamp).tzinfo is None):
            raise ValueError("dates need a time zone")
    return entry


def format_keys(keys: dict[str, ApiKey]) -> str:
    entries = sorted(keys.values(), key=lambda entry: (entry.created, entry.id))
    return json.dumps({"version": 1, "keys": [asdict(entry) for entry in entries]}, indent=2) + "\n"


class ApiKeyAuthenticator:
    """``Authorization: Bearer alk_...`` (what the OpenAI SDK sends for ``api_key=``)."""

    scheme = "bearer"

    def __init__(self, keys: WatchedFile[dict[str, ApiKey]], groups: dict[str, frozenset[str]]) -> None:
        self._keys = keys
        self._groups = groups
        self._principals: dict[str, Principal] = {}
        self._principals_version = keys.version

    def accepts(self, scheme: str, credentials: str) -> bool:
        return scheme == "bearer" and looks_like_api_key(credentials)

    async def sign_in(self, token: str) -> tuple[Principal, Standing] | None:
        """A key opens no console session: keys are for programs, which send them with every request."""
        return None

    async def authenticate(self, token: str) -> Principal | None:
        match = KEY_PATTERN.match(token)
        keys = self._keys.current
        if match is None or keys is None:
            return None
        entry = keys.get(match.group(1))
        digest = hashlib.sha256(match.group(2).encode()).hexdigest()
        if not hmac.compare_digest(digest, entry.sha256 if entry else _DUMMY_DIGEST) or entry is None:
            return None
        if entry.state_at(time.time()) != "active":
            return None
        return self._principal(entry.user)

    def _principal(self, user: str) -> Principal:
        """``user``'s Principal, made once and kept: it depends on the user's name and the configured groups only,
        never on a key (every key is still checked against the file on every request, above). The table is
        emptied whenever the key file is reloaded and bounded (PRINCIPALS_KEPT), so it holds at most the users of
        the keys in use."""
        if self._principals_version != self._keys.version:
            self._principals.clear()
            self._principals_version = self._keys.version
        principal = self._principals.get(user)
        if principal is None:
            if len(self._principals) >= PRINCIPALS_KEPT:
                self._principals.clear()
            principal = self._principals[user] = local_principal(user, self._groups)
        return principal
