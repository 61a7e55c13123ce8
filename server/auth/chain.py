"""Authentication: the configured authenticators, tried in order, and what a failure looks like to the client."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from ..config import AuthSettings
from ..errors import TooManyFailures, Unauthenticated
from .apikeys import ApiKeyAuthenticator, parse_keys
from .basic import BasicAuthenticator
from .htpasswd import parse_htpasswd
from .oidc import OidcAuthenticator, ProviderKeys
from .principal import ANONYMOUS, Principal
from .standing import Standing, Unconditional
from .throttle import FailureThrottle
from .watched import WatchedFile

log = logging.getLogger("airlock.auth")

# The only message a failed attempt ever gets: it does not say whether the user, password, key or token was wrong.
FAILED = "invalid or missing credentials"


class Authenticator(Protocol):
    """One way of proving who you are."""

    scheme: str  # the HTTP authentication scheme it answers to, for the 401 challenge

    def accepts(self, scheme: str, credentials: str) -> bool:
        """Whether these credentials are of this authenticator's kind (no checking yet)."""

    async def authenticate(self, credentials: str) -> Principal | None:
        """The principal, or None for credentials of this kind that are not valid."""

    async def sign_in(self, credentials: str) -> tuple[Principal, Standing] | None:
        """For a console session: the principal and what the session stays tied to, or None (not valid, or this
        kind of credential opens no session)."""


class Authentication:
    """Turns an ``Authorization`` header into a ``Principal``, or refuses with 401/429."""

    def __init__(self, settings: AuthSettings, authenticators: list[Authenticator],
                 provider_keys: ProviderKeys | None = None) -> None:
        self._settings = settings
        self._authenticators = authenticators
        self.provider_keys = provider_keys
        self._throttle = FailureThrottle(settings.failed_logins)
        self._challenges = {refused: _challenge(settings, authenticators, refused) for refused in (False, True)}

    async def authenticate(self, authorization: str | None, source: str) -> Principal:
        if not self._authenticators:
            return ANONYMOUS
        principal, _ = await self._throttled(authorization, source, session=False)
        return principal

    async def sign_in(self, authorization: str, source: str) -> tuple[Principal, Standing]:
        """Like ``authenticate``, for opening a console session: also returns what the session is tied to, which
        the session store re-checks on every request (``standing.py``)."""
        if not self._authenticators:
            return ANONYMOUS, Unconditional()
        principal, standing = await self._throttled(authorization, source, session=True)
        assert standing is not None
        return principal, standing

    async def _throttled(self, authorization: str | None, source: str,
                         session: bool) -> tuple[Principal, Standing | None]:
        blocked = self._throttle.blocked_for(source)
        if blocked > 0:
            raise TooManyFailures("too many failed sign-in attempts; try again later",
                                  retry_after_s=int(blocked) + 1)
        if not authorization:
            raise Unauthenticated(FAILED, headers=self._refusal(False))
        self._throttle.attempt(source)
        checked = await self._check(authorization, session)
        if checked is not None:
            self._throttle.succeeded(source)
            return checked
        delay = self._throttle.delay(source)
        if delay:
            await asyncio.sleep(delay)
        token_refused = authorization.strip().lower().startswith("bearer ")
        raise Unauthenticated(FAILED, headers=self._refusal(token_refused))

    def _refusal(self, token_refused: bool) -> dict[str, str]:
        """A 401's headers: the challenge, and the connection closed after it, so that a client with no valid
        credentials keeps a connection only as long as ``slow_clients`` lets a request take, not the keep-alive
        time (75 s) that signed-in clients get between requests."""
        return {"www-authenticate": self._challenges[token_refused], "connection": "close"}

    async def _check(self, authorization: str, session: bool) -> tuple[Principal, Standing | None] | None:
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        for authenticator in self._authenticators:
            if authenticator.accepts(scheme, credentials):
                if session:
                    return await authenticator.sign_in(credentials)
                principal = await authenticator.authenticate(credentials)
                return (principal, None) if principal is not None else None
        return None


def _challenge(settings: AuthSettings, authenticators: list[Authenticator], token_refused: bool) -> str:
    """RFC 7235 challenges for the schemes on offer; a refused bearer token gets RFC 6750's ``invalid_token``
    (which says the token was refused, not why)."""
    realm = settings.realm.replace('"', "")
    challenges = []
    if any(a.scheme == "basic" for a in authenticators):
        challenges.append(f'Basic realm="{realm}", charset="UTF-8"')
    if any(a.scheme == "bearer" for a in authenticators):
        challenges.append(f'Bearer realm="{realm}"' + (', error="invalid_token"' if token_refused else ""))
    return ", ".join(challenges)


def build_authentication(settings: AuthSettings) -> Authentication:
    """The authenticators ``settings`` asks for, in order: Basic, API keys, OIDC. Raises on unusable files."""
    groups = _groups_by_user(settings.local_groups)
    authenticators: list[Authenticator] = []
    if settings.htpasswd_file is not None:
        htpasswd = WatchedFile(settings.htpasswd_file, parse_htpasswd)
        authenticators.append(BasicAuthenticator(htpasswd, groups, settings.basic_cache_s))
        _warn_if_missing(settings.htpasswd_file, "htpasswd_file")
    if settings.api_keys_file is not None:
        authenticators.append(ApiKeyAuthenticator(WatchedFile(settings.api_keys_file, parse_keys), groups))
        _warn_if_missing(settings.api_keys_file, "api_keys_file")
    keys = None
    if settings.oidc.enabled:
        keys = ProviderKeys(settings.oidc)
        authenticators.append(OidcAuthenticator(settings.oidc, keys))
    return Authentication(settings, authenticators, keys)


def _groups_by_user(local_groups: dict[str, list[str]]) -> dict[str, frozenset[str]]:
    by_user: dict[str, set[str]] = {}
    for group, users in local_groups.items():
        for user in users:
            by_user.setdefault(user, set()).add(group)
    return {user: frozenset(groups) for user, groups in by_user.items()}


def _warn_if_missing(path: Path, setting: str) -> None:
    if not path.exists():
        log.warning("auth.%s does not exist yet: nobody can sign in with it until it is created", setting)
