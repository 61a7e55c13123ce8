"""Per-tenant cache salts: what reaches the engine.

A real vLLM does not say which ``cache_salt`` a request carried, so the gateway here forwards to a small recording
engine (a real HTTP server on a unix socket); users sign in through the real htpasswd path.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server import tenancy
from server.app import create_app
from server.auth import Principal
from server.config import ConfigError, PrivacySettings, load_settings
from server.tenancy import TenantSalts

from .conftest import Credentials
from .servers import ThreadedServer, free_port, wait_until_ready

MODEL = "recorded-model"
received: list[dict[str, Any]] = []


async def health(_: Request) -> Response:
    return JSONResponse({})


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "created": 1}]})


async def record(request: Request) -> Response:
    received.append(await request.json())
    return JSONResponse({"id": "x", "object": "chat.completion", "choices": []})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, credentials: Credentials) -> Iterator[str]:
    engine_socket = tmp_path_factory.mktemp("recording") / "engine.sock"
    engine = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                               Route("/v1/chat/completions", record, methods=["POST"]),
                               Route("/v1/completions", record, methods=["POST"])])
    port = free_port()
    settings = load_settings(gateway={"port": port, "health_interval_s": 0.5},
                             auth={"htpasswd_file": str(credentials.htpasswd)})
    with ThreadedServer(engine, uds=str(engine_socket)), \
            ThreadedServer(create_app(settings, [f"unix:{engine_socket}"]), host="127.0.0.1", port=port):
        yield wait_until_ready(f"http://127.0.0.1:{port}")


def forwarded(gateway: str, auth: tuple[str, str], path: str = "/v1/chat/completions",
              **body: Any) -> dict[str, Any]:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Same prompt for everyone"}], **body}
    if path == "/v1/completions":
        payload = {"model": MODEL, "prompt": "Same prompt for everyone"}
    response = httpx.post(f"{gateway}{path}", json=payload, auth=auth, timeout=20)
    assert response.status_code == 200, response.text
    return received[-1]


def test_users_get_their_own_salt_and_keep_it(gateway: str, credentials: Credentials) -> None:
    alice = ("alice", credentials.passwords["alice"])
    bob = ("bob", credentials.passwords["bob"])
    first, again, other = forwarded(gateway, alice), forwarded(gateway, alice), forwarded(gateway, bob)
    assert re.fullmatch(r"[0-9a-f]{64}", first["cache_salt"])
    assert first["cache_salt"] == again["cache_salt"]
    assert first["cache_salt"] != other["cache_salt"]
    assert forwarded(gateway, alice, "/v1/completions")["cache_salt"] == first["cache_salt"]


def test_the_forwarded_body_is_screened(gateway: str, credentials: Credentials) -> None:
    body = forwarded(gateway, ("alice", credentials.passwords["alice"]), user="alice@example.org")
    assert "user" not in body  # an identity the engine has no use for
    assert "max_tokens" not in body  # never invented: the engine bounds a missing one by its context


def who(user: str, *groups: str, source: str = "local") -> Principal:
    return Principal(user_id=user, source=source, groups=frozenset(groups))  # type: ignore[arg-type]


def test_tenant_modes(tmp_path: Path) -> None:
    by_user = TenantSalts(PrivacySettings())
    assert by_user.salt_for(who("ann")) != by_user.salt_for(who("ann", source="oidc"))
    by_group = TenantSalts(PrivacySettings(tenant="group"))
    assert by_group.salt_for(who("ann", "radiology")) == by_group.salt_for(who("ben", "radiology"))
    assert by_group.salt_for(who("ann")) != by_group.salt_for(who("ben"))  # no group: alone
    shared = TenantSalts(PrivacySettings(tenant="shared"))
    assert shared.salt_for(who("ann")) == shared.salt_for(who("ben"))
    secret = tmp_path / "salt-secret"
    secret.write_text("s" * 40)
    one, two = (TenantSalts(PrivacySettings(salt_secret_file=secret)) for _ in range(2))
    assert one.salt_for(who("ann")) == two.salt_for(who("ann"))  # two gateway copies agree
    assert TenantSalts(PrivacySettings()).salt_for(who("ann")) != by_user.salt_for(who("ann"))  # random per start


def test_a_short_salt_secret_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "salt-secret"
    secret.write_text("too short")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        TenantSalts(PrivacySettings(salt_secret_file=secret))


def test_a_salt_is_kept_per_tenant_and_the_table_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenancy, "SALTS_KEPT", 3)
    secret = tmp_path / "salt-secret"
    secret.write_bytes(b"s" * 40)
    salts = TenantSalts(PrivacySettings(salt_secret_file=secret))
    for _ in range(2):
        for n in range(10):
            # Kept or computed again, always the HMAC-SHA256 of the tenant under the secret.
            assert salts.salt_for(who(f"user{n}")) == hmac.new(b"s" * 40, f"user:local:user{n}".encode(),
                                                               hashlib.sha256).hexdigest()
            assert len(salts._salts) <= 3
