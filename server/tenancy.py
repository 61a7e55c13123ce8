"""Tenants and their cache salts: vLLM shares its prefix cache only between requests with the same salt.

A salt is the HMAC-SHA256 of the tenant under a server secret, so it cannot be guessed or copied by another
tenant (a client-chosen salt could be: vLLM PR #53347), and it is the same for a tenant on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .auth import Principal
from .config import ConfigError, PrivacySettings

MIN_SECRET_BYTES = 32
# Tenants whose salt is kept once computed; past it the table starts again (a salt is the same when computed again).
SALTS_KEPT = 4096


class TenantSalts:
    def __init__(self, settings: PrivacySettings) -> None:
        self.mode = settings.tenant
        self._secret = read_secret(settings)
        self._salts: dict[str, str] = {}

    def tenant_of(self, principal: Principal) -> str:
        if self.mode == "shared":
            return "shared"
        if self.mode == "group" and principal.groups:
            return "group:" + min(principal.groups)
        return "user:" + principal.key

    def salt_for(self, principal: Principal) -> str:
        """The tenant's salt, computed once per tenant and kept (an HMAC costs about as much as the rest of
        screening a short request: py-spy under ``tests/bench/gateway_cpu``). The secret is read once, at start, so
        a kept salt never goes stale; the table is bounded (SALTS_KEPT)."""
        tenant = self.tenant_of(principal)
        salt = self._salts.get(tenant)
        if salt is None:
            if len(self._salts) >= SALTS_KEPT:
                self._salts.clear()
            salt = self._salts[tenant] = hmac.new(self._secret, tenant.encode(), hashlib.sha256).hexdigest()
        return salt


def read_secret(settings: PrivacySettings) -> bytes:
    """The server secret from ``privacy.salt_secret_file`` (random for this process when there is none). Raises
    ConfigError for a file that cannot be read or is too short."""
    if settings.salt_secret_file is None:
        return secrets.token_bytes(MIN_SECRET_BYTES)
    try:
        secret = settings.salt_secret_file.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"privacy.salt_secret_file: cannot read {settings.salt_secret_file}: {exc.strerror}") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"privacy.salt_secret_file: the secret must be at least {MIN_SECRET_BYTES} bytes "
                          "(e.g. head -c 48 /dev/urandom | base64 > FILE)")
    return secret
