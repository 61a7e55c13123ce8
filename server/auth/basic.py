"""HTTP Basic against the htpasswd file, with bcrypt run off the event loop and remembered for a while."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict

import anyio.to_thread

from .htpasswd import costliest, password_matches
from .principal import Principal, local_principal
from .standing import HtpasswdEntry, Standing, fingerprint
from .watched import WatchedFile

# For an empty file: some real bcrypt hash to spend the time on.
_FALLBACK_HASH = b"$2b$12$K/5MVBU9cXaK2o9TqGF2nuIfus9PdfvoMSeTCISNk9tupU2X25YQu"


class BasicAuthenticator:
    """``Authorization: Basic base64(user:password)``."""

    scheme = "basic"

    def __init__(
        self, htpasswd: WatchedFile[dict[str, bytes]], groups: dict[str, frozenset[str]], cache_s: float,
        cache_size: int = 10_000,
    ) -> None:
        self._htpasswd = htpasswd
        self._groups = groups
        self._cache_s = cache_s
        self._cache_size = cache_size
        # Keyed hash of (file version, user, password) -> when the check expires. The key is random per process,
        # so a fingerprint cannot be tested against password guesses anywhere else; a changed file forgets them all.
        self._cache_key = secrets.token_bytes(32)
        self._checked: OrderedDict[bytes, float] = OrderedDict()

    def accepts(self, scheme: str, credentials: str) -> bool:
        return scheme == "basic"

    async def authenticate(self, credentials: str) -> Principal | None:
        """The principal, or None when the credentials are wrong (for any reason: the caller says no more)."""
        checked = await self._check(credentials)
        return checked[0] if checked is not None else None

    async def sign_in(self, credentials: str) -> tuple[Principal, Standing] | None:
        """As ``authenticate``, plus the entry the console session is tied to (the user and their hash's
        fingerprint): a removed user or a new password ends the session."""
        checked = await self._check(credentials)
        if checked is None:
            return None
        principal, hashed, version = checked
        return principal, HtpasswdEntry(self._htpasswd, principal.user_id, fingerprint(hashed), version)

    async def _check(self, credentials: str) -> tuple[Principal, bytes, int] | None:
        """The principal, the hash its password matched and the file version that hash came from."""
        parsed = _decode(credentials)
        users = self._htpasswd.current
        version = self._htpasswd.version
        if parsed is None or users is None:
            return None
        user, password = parsed
        hashed = users.get(user)
        cache_key = hmac.new(self._cache_key, f"{version}\0{user}\0{password}".encode(), hashlib.sha256).digest()
        if hashed is not None and self._remembered(cache_key):
            return local_principal(user, self._groups), hashed, version
        # An unknown user is checked against the file's slowest hash, so the time taken does not tell them apart.
        spent_on = hashed or costliest(users) or _FALLBACK_HASH
        matches = await anyio.to_thread.run_sync(password_matches, password, spent_on)
        if not matches or hashed is None:
            return None
        self._remember(cache_key)
        return local_principal(user, self._groups), hashed, version

    def _remembered(self, fingerprint: bytes) -> bool:
        expires = self._checked.get(fingerprint)
        if expires is None:
            return False
        if expires < time.monotonic():
            del self._checked[fingerprint]
            return False
        return True

    def _remember(self, fingerprint: bytes) -> None:
        if self._cache_s <= 0:
            return
        self._checked[fingerprint] = time.monotonic() + self._cache_s
        self._checked.move_to_end(fingerprint)
        while len(self._checked) > self._cache_size:
            self._checked.popitem(last=False)


def _decode(credentials: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(credentials.strip().encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password
