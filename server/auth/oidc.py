"""OIDC bearer tokens: JWTs signed by the site's OpenID provider, checked against its published keys.

JOSE work is done by joserfc, the authlib project's JOSE library (``authlib.jose`` is deprecated in its favour).
The provider's keys are fetched once and cached; a token naming an unknown key id makes Airlock fetch them again,
at most once per ``jwks_refresh_min_interval_s`` (key rotation without restart, and no way for a flood of bogus
tokens to hammer the provider). A provider that is down does not break tokens signed with keys already cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from ..config import OidcSettings
from .principal import Principal
from .standing import Standing, TokenExpiry

log = logging.getLogger("airlock.auth")

DISCOVERY_PATH = "/.well-known/openid-configuration"
NO_KEYS_RETRY_S = 5.0
MIN_RSA_BITS = 2048


class ProviderKeys:
    """The provider's signing keys, by key id."""

    def __init__(self, settings: OidcSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._keys: KeySet | None = None
        self._jwks_url = settings.jwks_url
        self._last_fetch: float | None = None
        self._lock = asyncio.Lock()

    async def keys_for(self, kid: str | None) -> list[Key]:
        """The keys that may have signed a token naming ``kid``: one, or all of them for a token naming none.

        An unknown ``kid`` fetches the keys again (rate-limited) before giving up.
        """
        keys = self._lookup(kid)
        if keys:
            return keys
        async with self._lock:  # one fetch at a time; whoever waited looks again first
            keys = self._lookup(kid)
            if not keys and self._may_fetch():
                await self.refresh()
                keys = self._lookup(kid)
        return keys

    async def refetch(self) -> bool:
        """Fetch again if allowed now (a token without ``kid`` failed every cached key: the provider may have
        rotated); True when new keys came."""
        async with self._lock:
            if not self._may_fetch():
                return False
            before = self._keys
            await self.refresh()
            return self._keys is not before

    async def refresh(self) -> None:
        """Fetch the keys now. Failures are logged and leave the cached keys in place."""
        self._last_fetch = self._clock()
        try:
            keys = _signing_keys(await self._fetch_jwks())
        except Exception as exc:  # whatever the provider or network did, the cached keys stay in service
            log.warning("could not fetch the OIDC provider's keys (%s); keeping the cached ones", type(exc).__name__)
            return
        if not keys.keys:
            log.warning("the OIDC provider published no usable signing key; keeping the cached ones")
            return
        if self._keys is None or {k.kid for k in keys.keys} != {k.kid for k in self._keys.keys}:
            log.info("OIDC provider keys loaded: %d signing keys", len(keys.keys))
        self._keys = keys

    def _may_fetch(self) -> bool:
        if self._last_fetch is None:
            return True
        # With no key at all (the provider was down at start), try again sooner than the rotation interval.
        interval = self._settings.jwks_refresh_min_interval_s
        if self._keys is None:
            interval = min(interval, NO_KEYS_RETRY_S)
        return self._clock() - self._last_fetch >= interval

    def _lookup(self, kid: str | None) -> list[Key]:
        if self._keys is None:
            return []
        if kid is None:
            return list(self._keys.keys)
        return [key for key in self._keys.keys if key.kid == kid]

    async def _fetch_jwks(self) -> Any:
        if self._settings.jwks_file is not None:
            return json.loads(self._settings.jwks_file.read_text(encoding="utf-8"))
        verify: str | bool = str(self._settings.ca_file) if self._settings.ca_file else True
        # trust_env=False: no proxy or netrc from the environment; the provider is reached directly or not at all.
        async with httpx.AsyncClient(
            timeout=self._settings.http_timeout_s, verify=verify, trust_env=False, follow_redirects=False
        ) as http:
            if self._jwks_url is None:
                self._jwks_url = await self._discover(http)
            response = await http.get(self._jwks_url)
            response.raise_for_status()
            return response.json()

    async def _discover(self, http: httpx.AsyncClient) -> str:
        issuer = str(self._settings.issuer).rstrip("/")
        response = await http.get(issuer + DISCOVERY_PATH)
        response.raise_for_status()
        metadata = response.json()
        # OpenID Connect Discovery 1.0, section 4.3: the document must name the issuer it was fetched for.
        if not isinstance(metadata, dict) or str(metadata.get("issuer", "")).rstrip("/") != issuer:
            raise ValueError("the discovery document names another issuer")
        jwks_uri = metadata.get("jwks_uri")
        # Keys over plain HTTP only from an issuer that is itself plain HTTP (a lab): never a downgrade.
        schemes = ("https://",) if issuer.startswith("https://") else ("https://", "http://")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(schemes):
            raise ValueError("the discovery document has no usable jwks_uri")
        return jwks_uri


def _signing_keys(document: Any) -> KeySet:
    """Public signing keys only: symmetric ("oct") keys, encryption keys and RSA keys under 2048 bits are dropped,
    and one key that cannot be read does not cost the others."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys = []
    for entry in document["keys"]:
        if not _usable(entry):
            continue
        try:
            keys.append(KeySet.import_key_set({"keys": [entry]}).keys[0])
        except Exception:  # an unknown curve, a garbled modulus...: skip this key
            log.warning("skipped an OIDC provider key that cannot be read (kty %s)", entry.get("kty"))
    return KeySet(keys)


def _usable(entry: Any) -> bool:
    if not isinstance(entry, dict) or entry.get("kty") not in {"RSA", "EC", "OKP"}:
        return False
    if entry.get("use", "sig") != "sig" or "d" in entry:  # a private key has no business in a JWKS
        return False
    if entry["kty"] == "RSA":
        modulus = entry.get("n")
        if not isinstance(modulus, str) or len(modulus.rstrip("=")) * 6 < MIN_RSA_BITS - 6:
            return False
    return True


class OidcAuthenticator:
    """``Authorization: Bearer <JWT>`` from the configured provider."""

    scheme = "bearer"

    def __init__(self, settings: OidcSettings, keys: ProviderKeys, wall_clock: Callable[[], float] = time.time) -> None:
        assert settings.issuer is not None and settings.audience is not None
        self._settings = settings
        self._keys = keys
        self._wall_clock = wall_clock
        self._algorithms = list(settings.algorithms)
        self._claims = jwt.JWTClaimsRegistry(
            now=lambda: int(wall_clock()),
            leeway=settings.leeway_s,
            iss={"essential": True, "value": settings.issuer},
            aud={"essential": True, "value": settings.audience},
            exp={"essential": True},
        )

    def accepts(self, scheme: str, credentials: str) -> bool:
        return scheme == "bearer" and credentials.count(".") == 2

    async def authenticate(self, token: str) -> Principal | None:
        claims = await self._claims_of(token)
        return self._principal(claims) if claims is not None else None

    async def sign_in(self, token: str) -> tuple[Principal, Standing] | None:
        """As ``authenticate``, plus the token's ``exp``: the console session it opens ends then at the latest."""
        claims = await self._claims_of(token)
        principal = self._principal(claims) if claims is not None else None
        if claims is None or principal is None:
            return None
        return principal, TokenExpiry(float(claims["exp"]), self._wall_clock)

    async def _claims_of(self, token: str) -> dict[str, Any] | None:
        """The claims of a token signed by the provider, valid now (issuer, audience, expiry), or None."""
        try:
            header = jws.extract_compact(token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeEncodeError):
            return None
        if header.get("alg") not in self._algorithms:  # before any key is touched: no "none", no HMAC
            return None
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        claims = self._verify(token, await self._keys.keys_for(kid))
        if claims is None and kid is None and await self._keys.refetch():
            claims = self._verify(token, await self._keys.keys_for(None))
        if claims is None:
            return None
        try:
            self._claims.validate(claims)
        except (JoseError, ValueError, TypeError):
            return None
        return claims

    def _verify(self, token: str, keys: list[Key]) -> dict[str, Any] | None:
        """The token's claims if one of ``keys`` made its signature."""
        for key in keys:
            try:
                return dict(jwt.decode(token, key, algorithms=self._algorithms).claims)
            except (JoseError, ValueError, TypeError):
                continue
        return None

    def _principal(self, claims: dict[str, Any]) -> Principal | None:
        user = claims.get(self._settings.user_claim)
        if not isinstance(user, str) or not user:
            return None
        name = claims.get(self._settings.name_claim)
        return Principal(
            user_id=user, source="oidc", display_name=name if isinstance(name, str) else user,
            groups=frozenset(_groups(claims, self._settings.groups_claim)),
        )


def _groups(claims: dict[str, Any], path: str) -> list[str]:
    """Groups at a dotted claim path (``realm_access.roles``), as a list or a space-separated string."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return []
        value = value.get(part)
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []
