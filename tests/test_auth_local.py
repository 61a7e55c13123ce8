"""HTTP Basic (htpasswd) and API keys, against the real stack and gateways in front of its engine."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest

from server.auth.apikeys import format_keys, new_key, parse_keys
from server.auth.chain import FAILED

from .conftest import Credentials, Stack, airlock_cli, key_secret
from .servers import gateway_in_front_of

pytestmark = pytest.mark.engine


def eventually(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Files are re-read at most once a second: give a change a moment to be seen."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json()["error"]["message"] == FAILED


def test_only_probes_are_open(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/healthz").status_code == 200
    assert httpx.get(f"{stack.base_url}/readyz").status_code == 200
    response = httpx.get(f"{stack.base_url}/v1/models")
    assert_refused(response)
    challenge = response.headers["www-authenticate"]
    assert 'Basic realm="Airlock"' in challenge and 'Bearer realm="Airlock"' in challenge
    assert "error=" not in challenge  # nothing was sent, so nothing was refused
    body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}]}
    assert_refused(httpx.post(f"{stack.base_url}/v1/chat/completions", json=body))


def test_basic_password(stack: Stack, credentials: Credentials) -> None:
    url = f"{stack.base_url}/v1/models"
    assert httpx.get(url, auth=("alice", credentials.passwords["alice"])).status_code == 200
    wrong_password = httpx.get(url, auth=("alice", credentials.passwords["bob"]))
    unknown_user = httpx.get(url, auth=("nobody", credentials.passwords["alice"]))
    garbage = httpx.get(url, headers={"authorization": "Basic !!!not-base64"})
    latin1 = httpx.get(url, headers={"authorization": b"Basic \xe9t\xe9"})
    no_colon = httpx.get(url, headers={"authorization": "Basic YWxpY2U="})  # "alice"
    for response in (wrong_password, unknown_user, garbage, latin1, no_colon):
        assert_refused(response)
    assert len({r.text for r in (wrong_password, unknown_user, garbage, latin1, no_colon)}) == 1  # no hint given


def test_editing_the_htpasswd_file_takes_effect_without_restart(stack: Stack, credentials: Credentials,
                                                                tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    shutil.copy(credentials.htpasswd, htpasswd)
    with gateway_in_front_of(stack.engine_socket, auth={"htpasswd_file": str(htpasswd)}) as gateway:
        def status(user: str, password: str) -> int:
            return httpx.get(f"{gateway}/v1/models", auth=(user, password)).status_code

        assert status("carol", "first password") == 401
        airlock_cli("users", "add", "carol", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                    stdin="first password\n")
        assert eventually(lambda: status("carol", "first password") == 200)
        airlock_cli("users", "passwd", "carol", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                    stdin="second password\n")
        assert eventually(lambda: status("carol", "first password") == 401)
        assert status("carol", "second password") == 200
        airlock_cli("users", "remove", "carol", "--file", str(htpasswd))
        assert eventually(lambda: status("carol", "second password") == 401)
        assert status("alice", credentials.passwords["alice"]) == 200

        # A botched edit fails closed: nobody signs in until the file is fixed.
        good = htpasswd.read_text()
        htpasswd.write_text(good + "mallory:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
        assert eventually(lambda: status("alice", credentials.passwords["alice"]) == 401)
        htpasswd.write_text(good)
        assert eventually(lambda: status("alice", credentials.passwords["alice"]) == 200)


def test_api_key_works_with_the_openai_sdk_and_is_stored_only_as_a_hash(
    client: openai.OpenAI, stack: Stack, credentials: Credentials
) -> None:
    answer = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
    )
    assert answer.choices[0].message.content is not None
    stored = credentials.api_keys.read_text()
    secret = key_secret(credentials.api_key)
    assert credentials.api_key not in stored and secret not in stored
    # Others get nothing; the directory's group may read it (the rule `airlock keys` follows: see test_systemd.py).
    assert oct(credentials.api_keys.stat().st_mode & 0o777) == "0o640"


def test_async_sdk_with_an_api_key(stack: Stack, credentials: Credentials) -> None:
    import asyncio

    async def list_models() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=credentials.api_key,
                                      max_retries=0) as client:
            return [model.id async for model in client.models.list()]

    assert asyncio.run(list_models()) == [stack.model]


def test_revoked_expired_and_made_up_keys_fail(stack: Stack, tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    key = airlock_cli("keys", "create", "--user", "dana", "--file", str(keys_file)).strip()
    expired, entry = new_key("dana", "old", timedelta(minutes=1), now=datetime.now(UTC) - timedelta(hours=1))
    keys = parse_keys(keys_file.read_text(), keys_file)
    keys[entry.id] = entry
    keys_file.write_text(format_keys(keys))
    with gateway_in_front_of(stack.engine_socket, auth={"api_keys_file": str(keys_file)}) as gateway:
        def status(token: str) -> int:
            return httpx.get(f"{gateway}/v1/models", headers={"authorization": f"Bearer {token}"}).status_code

        assert status(key) == 200
        assert status(expired) == 401
        key_id = key.split("_")[1]
        made_up = [key[:-1] + ("A" if key[-1] != "A" else "B"), f"alk_{'0' * 16}_{key_secret(key)}", "alk_x",
                   "sk-not-ours"]
        assert [status(token) for token in made_up] == [401] * len(made_up)
        listing = airlock_cli("keys", "list", "--file", str(keys_file))
        assert key_id in listing and "expired" in listing and key_secret(key) not in listing
        airlock_cli("keys", "revoke", key_id, "--file", str(keys_file))
        assert eventually(lambda: status(key) == 401)
        assert "revoked" in airlock_cli("keys", "list", "--user", "dana", "--file", str(keys_file))
        stored = {entry["id"]: entry for entry in json.loads(keys_file.read_text())["keys"]}
        assert stored[key_id]["revoked"] and not stored[entry.id]["revoked"]


def test_repeated_failures_are_slowed_then_refused(stack: Stack, credentials: Credentials) -> None:
    limits = {"free_attempts": 2, "max_delay_s": 0.5, "block_after": 6, "window_s": 60}
    auth = {"htpasswd_file": str(credentials.htpasswd), "failed_logins": limits}
    with gateway_in_front_of(stack.engine_socket, auth=auth) as gateway:
        def attempt(password: str) -> tuple[int, float]:
            started = time.monotonic()
            response = httpx.get(f"{gateway}/v1/models", auth=("alice", password), timeout=30)
            return response.status_code, time.monotonic() - started

        results = [attempt("guess") for _ in range(6)]
        assert [status for status, _ in results] == [401] * 6
        assert all(took >= 0.25 for _, took in results[2:]), "failures beyond the free ones are held back"
        blocked = httpx.get(f"{gateway}/v1/models", auth=("alice", credentials.passwords["alice"]))
        assert blocked.status_code == 429  # even the right password, from this address, for now
        assert int(blocked.headers["retry-after"]) > 0
        assert blocked.json()["error"]["type"] == "rate_limit_error"


def test_no_credential_or_user_reaches_the_log(stack: Stack, credentials: Credentials,
                                               oidc_provider: object) -> None:
    # Sign in every way, right and wrong, then read everything the stack logged (gateway and engine).
    url = f"{stack.base_url}/v1/models"
    httpx.get(url, auth=("alice", credentials.passwords["alice"]))
    httpx.get(url, auth=("bob", "wrong " + credentials.passwords["bob"]))
    httpx.get(url, headers={"authorization": f"Bearer {credentials.api_key}x"})
    log = stack.log_path.read_text(errors="replace")
    secrets = [*credentials.passwords.values(), credentials.api_key, key_secret(credentials.api_key),
               "alice", "bob", "mallory", "carol", "eyJ"]
    assert not [secret for secret in secrets if secret in log]
