"""The privacy posture an auditor can read from ``GET /v1/airlock/privacy``: the settings that decide what is
kept, sent or shared, as the running gateway applies them, and the authorization rules that name no served model
(built per request: the served models change). Nothing in it identifies a user or an address."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .auth import RuleCoverage
from .config import Settings
from .engine import PRIVACY_ARGS, PRIVACY_ENV
from .engine_limits import EngineLimits


def privacy_posture(config: Settings, upstream_urls: Sequence[str], rules: RuleCoverage,
                    engine_limits: EngineLimits) -> dict[str, Any]:
    auth, screening, privacy = config.auth, config.screening, config.privacy
    methods = [name for name, on in (("basic", auth.htpasswd_file), ("api_key", auth.api_keys_file),
                                     ("oidc", auth.oidc.enabled)) if on]
    return {
        "storage": {
            "request_bodies": "memory only, never written to a file",
            "gateway_access_log": False,
            "credentials_at_rest": {"passwords": "bcrypt", "api_keys": "sha256 of the secret"},
            "failed_login_counters": "memory only",
            "fair_share_queues_and_limits": "memory only",
        },
        "telemetry": {"usage_statistics": False, "engine_environment": dict(sorted(PRIVACY_ENV.items()))},
        "egress": {
            "remote_image_urls": "refused (images only as data: URLs)",
            "proxy_environment_ignored": True,
            "engine_transport": sorted({url.split(":", 1)[0] for url in upstream_urls}),
            "identity_provider": auth.oidc.issuer if auth.oidc.enabled else None,
            "limits_server": _limits_server(config),
        },
        "logging": {
            "request_content": False, "credentials": False, "user_ids": False, "client_addresses": False,
            "engine_flags": list(PRIVACY_ARGS),
        },
        "cache_isolation": {
            "prefix_cache_salt": "hmac-sha256 per tenant, set by the gateway; client cache_salt refused",
            "tenant": privacy.tenant,
            "salt_secret": "from file" if privacy.salt_secret_file else "random per start",
            "client_multimodal_uuid": "refused",
            "multimodal_processor_cache_gb": config.engine.mm_processor_cache_gb,
        },
        "limits": {
            "max_body_bytes": config.gateway.max_body_bytes,
            "max_images_per_request": engine_limits.images_per_request(screening.max_images_per_request),
            "max_image_bytes": screening.max_image_bytes,
            "max_image_pixels": screening.max_image_pixels,
            # What the engines scale every image to (at most, at least) before it becomes tokens.
            "engine_image_budget": {"max_pixels": engine_limits.max_pixels, "min_pixels": engine_limits.min_pixels},
            "image_formats": list(screening.image_formats),
            "max_tokens_limit": screening.max_tokens_limit,
            "admission": config.admission.model_dump(exclude={"shared_limits"}),
        },
        "authentication": {"methods": methods, "required": bool(methods)},
        "authorization": rules.posture(),
        "client_transport": {"tls": config.gateway.client_tls, "hsts_max_age_s": config.gateway.tls.hsts_max_age_s},
        "console": {
            "enabled": config.console.enabled,
            "sessions": "memory only",
            "browser_storage": "none",
            "content_security_policy": "self only",
        },
        "metrics": {
            "listener": config.metrics.listener,
            "labels": ["model", "route", "status", "stream", "reason", "code", "stage", "replica"],
            "identifies_users": False,
            "active_users": "a count only",
        },
    }


def _limits_server(config: Settings) -> dict[str, str] | None:
    """What reaches ``airlock limits-server`` (``shared_limits``), and how: never its address or file paths."""
    shared = config.admission.shared_limits
    if shared is None:
        return None
    transport = "unix" if shared.socket_path is not None else "tcp+mutual_tls" if shared.tls is not None else "tcp"
    return {"transport": transport, "sends": "a keyed pseudonym of each signed-in user, and when each of their "
                                             "requests starts and ends"}
