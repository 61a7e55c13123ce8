"""OIDC bearer tokens: a real OpenID provider process issues them, the real gateway checks them.

Tokens the provider will not issue (expired, not yet valid, signed with a key it does not have) are made by the
test with its own keys, served to the gateway the way offline sites do it: a local JWKS file (``auth.oidc.jwks_file``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.auth.chain import FAILED

from .conftest import Stack
from .servers import OidcProvider, ThreadedServer, b64url, free_port, gateway_in_front_of, jwt_parts

pytestmark = pytest.mark.engine


def models(base_url: str, token: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/models", headers={"authorization": f"Bearer {token}"}, timeout=30)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json()["error"] == {
        "message": FAILED, "type": "authentication_error", "param": None, "code": "invalid_credentials",
    }
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def rsa_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid}, private=True)


def signed(key: RSAKey, claims: dict[str, Any], kid: str | None = None) -> str:
    return jwt.encode({"alg": "RS256", "kid": kid or str(key.kid)}, claims, key)


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"


@pytest.fixture(scope="module")
def second_provider() -> Iterator[OidcProvider]:
    provider = OidcProvider().start()
    try:
        yield provider
    finally:
        provider.stop()


def test_openai_sdk_with_an_oidc_token(stack: Stack, oidc_provider: OidcProvider) -> None:
    token = oidc_provider.token("carol@example.org", {"preferred_username": "Carol"})
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
    )
    assert answer.choices[0].message.content is not None
    assert [model.id for model in client.models.list()] == [stack.model]


def forged_tokens(provider: OidcProvider, second: OidcProvider) -> dict[str, str]:
    real = provider.token("mallory")
    header, claims, signature = jwt_parts(real)
    public_pem = RSAKey.import_key(provider.jwks()["keys"][0]).as_pem(private=False)
    hs256 = unsigned({"alg": "HS256", "typ": "JWT"}, claims)
    hs256 += "." + b64url(hmac.new(public_pem, hs256.encode(), hashlib.sha256).digest())
    tampered = unsigned(header, {**claims, "sub": "alice"}) + "." + signature
    return {
        "wrong audience": provider.token("mallory", client_id="some-other-app"),
        "wrong issuer": provider.token("mallory", host="localhost"),  # same key, iss http://localhost:...
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, claims) + ".",
        "HS256 signed with the provider's public key": hs256,
        "unknown kid": signed(rsa_key("not-the-providers"), claims),
        "tampered payload": tampered,
        "from a second provider": second.token("mallory"),
        "not a JWT": "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
    }


def test_forged_and_foreign_tokens_are_refused_alike(
    stack: Stack, oidc_provider: OidcProvider, second_provider: OidcProvider
) -> None:
    tokens = forged_tokens(oidc_provider, second_provider)
    refused = {name: models(stack.base_url, token) for name, token in tokens.items()}
    for name, response in refused.items():
        assert response.status_code == 401, name
        assert_refused(response)
    assert len({response.text for response in refused.values()}) == 1, "every refusal must look the same"
    assert models(stack.base_url, oidc_provider.token("mallory")).status_code == 200  # the real one passes


@pytest.fixture
def offline_keys(tmp_path: Path) -> Path:
    return tmp_path / "jwks.json"


def write_jwks(path: Path, *keys: RSAKey) -> None:
    path.write_text(json.dumps({"keys": [key.as_dict(private=False) for key in keys]}))


ISSUER = "https://sso.example.internal/realms/staff"


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": "airlock", "sub": "dave", "iat": now, "exp": now + 300, **changes}


def test_time_claims_are_checked_with_the_configured_leeway(stack: Stack, offline_keys: Path) -> None:
    key = rsa_key("k1")
    write_jwks(offline_keys, key)
    oidc = {"issuer": ISSUER, "audience": "airlock", "jwks_file": str(offline_keys), "leeway_s": 30}
    with gateway_in_front_of(stack.engine_socket, auth={"oidc": oidc}) as gateway:
        now = int(time.time())
        assert models(gateway, signed(key, claims())).status_code == 200
        assert models(gateway, signed(key, claims(exp=now - 10))).status_code == 200  # within the leeway
        assert models(gateway, signed(key, claims(nbf=now + 10))).status_code == 200
        assert_refused(models(gateway, signed(key, claims(exp=now - 120))))  # expired
        assert_refused(models(gateway, signed(key, claims(nbf=now + 120))))  # not yet valid
        assert_refused(models(gateway, signed(key, claims(iat=now + 120))))  # issued in the future
        without_exp = claims()
        del without_exp["exp"]
        assert_refused(models(gateway, signed(key, without_exp)))


def test_a_new_key_id_is_picked_up_without_restart(stack: Stack, offline_keys: Path) -> None:
    old, new = rsa_key("2026-old"), rsa_key("2026-new")
    write_jwks(offline_keys, old)
    oidc = {"issuer": ISSUER, "audience": "airlock", "jwks_file": str(offline_keys),
            "jwks_refresh_min_interval_s": 0}
    with gateway_in_front_of(stack.engine_socket, auth={"oidc": oidc}) as gateway:
        assert models(gateway, signed(old, claims())).status_code == 200
        assert_refused(models(gateway, signed(new, claims())))  # not published yet
        write_jwks(offline_keys, new)  # the provider rotates
        assert models(gateway, signed(new, claims())).status_code == 200
        assert_refused(models(gateway, signed(old, claims())))  # retired with the old key set


def test_unreadable_or_weak_keys_in_the_key_set_are_skipped_not_fatal(stack: Stack, offline_keys: Path) -> None:
    key = rsa_key("good")
    offline_keys.write_text(json.dumps({"keys": [
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA", "kid": "unknown-curve"},
        {"kty": "RSA", "n": "AQAB" * 40, "e": "AQAB", "kid": "too-small"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "symmetric"},
        key.as_dict(private=False),
    ]}))
    oidc = {"issuer": ISSUER, "audience": "airlock", "jwks_file": str(offline_keys)}
    with gateway_in_front_of(stack.engine_socket, auth={"oidc": oidc}) as gateway:
        assert models(gateway, signed(key, claims())).status_code == 200
        hs256 = unsigned({"alg": "HS256", "kid": "symmetric"}, claims())
        assert_refused(models(gateway, hs256 + "." + b64url(hmac.new(b"secret", hs256.encode(), "sha256").digest())))


def test_unknown_key_ids_fetch_the_keys_at_most_once_per_interval(stack: Stack) -> None:
    key = rsa_key("published")
    fetches: list[float] = []

    async def jwks(_: Request) -> Response:
        fetches.append(time.monotonic())
        return JSONResponse({"keys": [key.as_dict(private=False)]})

    port = free_port()
    oidc = {"issuer": ISSUER, "audience": "airlock", "jwks_url": f"http://127.0.0.1:{port}/jwks",
            "jwks_refresh_min_interval_s": 5}
    with ThreadedServer(Starlette(routes=[Route("/jwks", jwks)]), host="127.0.0.1", port=port), \
            gateway_in_front_of(stack.engine_socket, auth={"oidc": oidc}) as gateway:
        assert models(gateway, signed(key, claims())).status_code == 200
        assert len(fetches) == 1  # at start
        time.sleep(5.5)
        for attempt in range(5):
            assert_refused(models(gateway, signed(rsa_key(f"bogus-{attempt}"), claims())))
        assert len(fetches) == 2, "one refresh for the first unknown kid, none for the rest within the interval"


def test_provider_rotation_and_outage(stack: Stack) -> None:
    provider = OidcProvider().start()
    try:
        oidc = {"issuer": provider.url, "audience": "airlock", "jwks_refresh_min_interval_s": 1}
        with gateway_in_front_of(stack.engine_socket, auth={"oidc": oidc}) as gateway:
            before = provider.token("erin")
            assert models(gateway, before).status_code == 200
            provider.stop()
            assert models(gateway, before).status_code == 200, "cached keys must outlive an IdP outage"
            provider.start()  # a restart makes a new signing key: the provider rotated
            time.sleep(1.1)
            after = provider.token("erin")
            assert models(gateway, after).status_code == 200, "a rotated key must work without a gateway restart"
            time.sleep(1.1)
            assert_refused(models(gateway, before))
    finally:
        provider.stop()


def test_groups_from_a_nested_claim_decide_model_access(stack: Stack, oidc_provider: OidcProvider) -> None:
    oidc = {"issuer": oidc_provider.url, "audience": "airlock", "groups_claim": "realm_access.roles"}
    rules = {"rules": [{"models": ["airlock-demo-*"], "groups": ["vision"]}]}
    with gateway_in_front_of(stack.engine_socket, auth={"oidc": oidc}, authorization=rules) as gateway:
        member = oidc_provider.token("frank", {"realm_access": {"roles": ["vision", "staff"]}})
        outsider = oidc_provider.token("grace", {"realm_access": {"roles": ["staff"]}, "groups": ["vision"]})
        assert [card["id"] for card in models(gateway, member).json()["data"]] == [stack.model]
        assert models(gateway, outsider).json()["data"] == []
        body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        denied = httpx.post(f"{gateway}/v1/chat/completions", json=body,
                            headers={"authorization": f"Bearer {outsider}"}, timeout=60)
        assert denied.status_code == 403
        assert denied.json()["error"]["type"] == "permission_error"
        allowed = httpx.post(f"{gateway}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {member}"}, timeout=60)
        assert allowed.status_code == 200
