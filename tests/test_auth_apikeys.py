"""The API key check on its own (no server): what it keeps between requests (each user's Principal) never lets a
revoked, expired or removed key through, and stays bounded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.auth import apikeys
from server.auth.apikeys import ApiKey, ApiKeyAuthenticator, format_keys, new_key, parse_keys, revoke
from server.auth.principal import Principal
from server.auth.watched import WatchedFile
from server.metrics import ActiveUsers


def check(authenticator: ApiKeyAuthenticator, token: str) -> Principal | None:
    return asyncio.run(authenticator.authenticate(token))


def written(path: Path, entries: list[ApiKey]) -> None:
    path.write_text(format_keys({entry.id: entry for entry in entries}))


def test_a_revoked_or_removed_key_fails_at_the_first_request_after_the_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, entry = new_key("dana", "laptop", None)
    other_key, other = new_key("erik", "ci", None)
    written(path, [entry, other])
    authenticator = ApiKeyAuthenticator(WatchedFile(path, parse_keys, check_interval_s=0),
                                        {"dana": frozenset({"radiology"})})
    first = check(authenticator, key)
    assert first == Principal(user_id="dana", source="local", display_name="dana",
                              groups=frozenset({"radiology"}))
    assert check(authenticator, key) is first  # kept, not made again
    written(path, [revoke(entry), other])
    assert check(authenticator, key) is None
    assert check(authenticator, other_key) == Principal(user_id="erik", source="local", display_name="erik")
    written(path, [other])  # removed altogether
    assert check(authenticator, key) is None
    written(path, [entry, other])  # back (a restored backup): valid again, as before
    assert check(authenticator, key) == first
    path.write_text("{not json")  # a botched edit: every key refused until it is fixed
    assert check(authenticator, key) is None and check(authenticator, other_key) is None


def test_a_key_past_its_expiry_fails_and_one_before_it_works(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    now = datetime.now(UTC)
    expired, old = new_key("dana", "old", timedelta(minutes=1), now=now - timedelta(hours=1))
    valid, current = new_key("dana", "new", timedelta(hours=1), now=now)
    written(path, [old, current])
    authenticator = ApiKeyAuthenticator(WatchedFile(path, parse_keys, check_interval_s=0), {})
    assert check(authenticator, valid) is not None
    assert check(authenticator, expired) is None
    assert check(authenticator, valid[:-1] + ("A" if valid[-1] != "A" else "B")) is None  # the secret is checked
    # The parsed expiry (kept on the entry) says what the stored text says, to the second it ends.
    stored = parse_keys(path.read_text(), path)[current.id]
    assert current.expires is not None and stored.expires_at == datetime.fromisoformat(current.expires).timestamp()
    ends = datetime.fromisoformat(current.expires)
    assert [stored.state(ends - timedelta(seconds=1)), stored.state(ends), stored.state_at(ends.timestamp() - 1),
            stored.state_at(ends.timestamp())] == ["active", "expired", "active", "expired"]
    assert revoke(stored).state(ends - timedelta(seconds=1)) == "revoked"


def test_the_kept_principals_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apikeys, "PRINCIPALS_KEPT", 3)
    path = tmp_path / "keys.json"
    made = [new_key(f"user{n}", "k", None) for n in range(10)]
    written(path, [entry for _, entry in made])
    authenticator = ApiKeyAuthenticator(WatchedFile(path, parse_keys), {})
    for _ in range(2):
        for n, (key, _) in enumerate(made):
            principal = check(authenticator, key)
            assert principal is not None and principal.user_id == f"user{n}"
            assert len(authenticator._principals) <= 3


def test_active_users_count_distinct_users() -> None:
    users = ActiveUsers(window_s=60.0)
    for user in ["local:dana", "local:erik", "local:dana", "oidc:dana"]:
        users.saw(user)
    assert users.count() == 3
    assert all(b"dana" not in digest for digest in users._last_seen)
