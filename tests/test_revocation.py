"""Revocation reaches the console: a session ends within seconds of its user being removed or given a new password,
and an OIDC session ends at its token's ``exp`` (issue 15, item 6).

Real parts: a real gateway (uvicorn) in front of the session's engine with its own htpasswd and API key files, the
console's own sign-in endpoints over HTTP, the real ``airlock users`` command, and a real OpenID provider process
issuing short-lived tokens.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx
import pytest

from server.auth.chain import FAILED
from server.auth.htpasswd import format_htpasswd, hash_password, parse_htpasswd
from server.auth.principal import local_principal
from server.auth.standing import HtpasswdEntry, TokenExpiry, fingerprint
from server.auth.watched import WatchedFile
from server.sessions import CSRF_HEADER, SESSION_COOKIE, SessionStore

from .conftest import Credentials, Stack, airlock_cli, write_secret
from .servers import OidcProvider, gateway_in_front_of

# The gateway looks at the credentials files at most once a second.
ENDS_WITHIN_S = 3.0
TOKEN_LIFETIME_S = 6
QUESTION = {"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
# The console's own requests carry this header (their 401s carry no challenge).
CONSOLE = {"x-airlock-console": "1"}


@dataclass
class Gateway:
    base_url: str
    htpasswd: Path
    api_keys: Path
    api_key: str  # frank's
    passwords: dict[str, str]


@dataclass
class Signed:
    """A browser-like client holding one console session."""

    client: httpx.Client
    csrf: str

    def models(self) -> httpx.Response:
        return self.client.get("/v1/models", headers=CONSOLE)

    def ask(self, model: str) -> httpx.Response:
        return self.client.post("/v1/chat/completions", json={"model": model, **QUESTION},
                                headers={CSRF_HEADER: self.csrf, **CONSOLE}, timeout=60)


def add_user(htpasswd: Path, user: str, password: str, command: str = "add") -> None:
    airlock_cli("users", command, user, "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                stdin=password + "\n")


@pytest.fixture(scope="module")
def gateway(stack: Stack, credentials: Credentials, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of its own, so that users can come and go without disturbing other tests."""
    directory = tmp_path_factory.mktemp("revocation")
    htpasswd, api_keys = directory / "htpasswd", directory / "api-keys.json"
    shutil.copy(credentials.htpasswd, htpasswd)
    passwords = {**credentials.passwords, "carol": "carol's first password", "dave": "dave's first password",
                 "frank": "frank's password"}
    for user in ("carol", "dave", "frank"):
        add_user(htpasswd, user, passwords[user])
    api_key = airlock_cli("keys", "create", "--user", "frank", "--name", "laptop", "--file", str(api_keys)).strip()
    auth = {"htpasswd_file": str(htpasswd), "api_keys_file": str(api_keys)}
    with gateway_in_front_of(stack.engine_socket, auth=auth) as base_url:
        yield Gateway(base_url, htpasswd, api_keys, api_key, passwords)


@pytest.fixture
def browsers() -> Iterator[ExitStack]:
    """Closes every browser-like client a test opened."""
    with ExitStack() as opened:
        yield opened


def sign_in(browsers: ExitStack, base_url: str, user: str, password: str) -> Signed:
    client = browsers.enter_context(httpx.Client(base_url=base_url, timeout=30))
    answer = client.post("/console/api/sign-in", json={"username": user, "password": password}, headers=CONSOLE)
    assert answer.status_code == 200, answer.text
    return Signed(client, answer.json()["csrf"])


def seconds_until_refused(signed: Signed, limit_s: float = 15) -> float:
    """How long the session goes on being accepted (polled every 0.1 s)."""
    started = time.monotonic()
    while signed.models().status_code == 200:
        assert time.monotonic() - started < limit_s, f"the session still works after {limit_s} s"
        time.sleep(0.1)
    return time.monotonic() - started


def assert_like_a_lapsed_session(signed: Signed, base_url: str) -> None:
    """The ended session gets exactly what a session the gateway never had (or forgot) gets: 401, and the page's
    session endpoint says nobody is signed in, so the console asks to sign in again."""
    ended = signed.ask("any-model")
    lapsed = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "any-model", **QUESTION},
                        headers={CSRF_HEADER: signed.csrf, **CONSOLE},
                        cookies={SESSION_COOKIE: "a-session-this-gateway-never-had"})
    assert ended.status_code == lapsed.status_code == 401
    assert ended.json() == lapsed.json() and ended.json()["error"]["message"] == FAILED
    assert "www-authenticate" not in ended.headers and "www-authenticate" not in lapsed.headers
    assert signed.models().status_code == 401
    assert signed.client.get("/console/api/session").json()["signed_in"] is False


def names_in_logs(caplog: pytest.LogCaptureFixture, *names: str) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if any(name in record.getMessage() for name in names)]


@pytest.mark.engine
def test_removing_a_user_ends_their_console_sessions_within_seconds(
    gateway: Gateway, stack: Stack, browsers: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock")
    carol = sign_in(browsers, gateway.base_url, "carol", gateway.passwords["carol"])
    alice = sign_in(browsers, gateway.base_url, "alice", gateway.passwords["alice"])
    answered = carol.ask(stack.model)
    assert answered.status_code == 200, answered.text
    assert carol.client.get("/console/api/session").json()["signed_in"] is True

    airlock_cli("users", "remove", "carol", "--file", str(gateway.htpasswd))
    assert seconds_until_refused(carol) <= ENDS_WITHIN_S
    assert_like_a_lapsed_session(carol, gateway.base_url)
    # Nobody else is signed out.
    assert alice.models().status_code == 200 and alice.ask(stack.model).status_code == 200

    # Added again with the same password: a new entry (new salt), and the old session stays ended.
    add_user(gateway.htpasswd, "carol", gateway.passwords["carol"])
    # The gateway looks at the file again on the first use a second or more after its last look (WatchedFile's
    # check_interval_s); before that, carol does not exist for it yet.
    time.sleep(1.2)
    again = sign_in(browsers, gateway.base_url, "carol", gateway.passwords["carol"])
    assert again.models().status_code == 200
    assert carol.models().status_code == 401

    # The gateway says a session ended, never whose.
    assert any("console session ended" in record.getMessage() for record in caplog.records)
    assert names_in_logs(caplog, "carol", gateway.passwords["carol"]) == []


@pytest.mark.engine
def test_a_new_password_ends_every_session_opened_with_the_old_one(
    gateway: Gateway, stack: Stack, browsers: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock")
    laptop = sign_in(browsers, gateway.base_url, "dave", gateway.passwords["dave"])
    phone = sign_in(browsers, gateway.base_url, "dave", gateway.passwords["dave"])
    assert laptop.ask(stack.model).status_code == 200 and phone.models().status_code == 200

    add_user(gateway.htpasswd, "dave", "dave's second password", command="passwd")
    assert seconds_until_refused(laptop) <= ENDS_WITHIN_S
    assert phone.models().status_code == 401
    assert_like_a_lapsed_session(phone, gateway.base_url)

    refused = httpx.post(f"{gateway.base_url}/console/api/sign-in", headers=CONSOLE, timeout=30,
                         json={"username": "dave", "password": gateway.passwords["dave"]})
    assert refused.status_code == 401
    renewed = sign_in(browsers, gateway.base_url, "dave", "dave's second password")
    assert renewed.ask(stack.model).status_code == 200
    assert names_in_logs(caplog, "dave") == []


@pytest.mark.engine
def test_an_api_key_opens_no_console_session(gateway: Gateway) -> None:
    # Keys are for programs, which send them with every request (and a revoked key is refused within a second,
    # test_auth_local.py): there is no session for revocation to miss.
    key = gateway.api_key
    assert httpx.get(f"{gateway.base_url}/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    for form in ({"username": "frank", "password": key}, {"username": key[:128], "password": key}):
        answer = httpx.post(f"{gateway.base_url}/console/api/sign-in", json=form, headers=CONSOLE, timeout=30)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers


@pytest.fixture(scope="module")
def short_tokens() -> Iterator[OidcProvider]:
    """A real OpenID provider whose ID tokens live a few seconds."""
    provider = OidcProvider(token_max_age_s=TOKEN_LIFETIME_S).start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.mark.engine
def test_an_oidc_console_session_ends_at_the_tokens_exp(
    stack: Stack, short_tokens: OidcProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="airlock")
    # Sessions would last hours, and bearer tokens get 30 s of leeway past exp: the session gets none of that.
    settings = {
        "auth": {"oidc": {"issuer": short_tokens.url, "audience": "airlock", "leeway_s": 30}},
        "console": {"session_idle_s": 3600, "session_max_s": 7200,
                    "oidc_client_secret_file": str(write_secret(tmp_path / "client-secret", "unused"))},
    }
    with gateway_in_front_of(stack.engine_socket, **settings) as base_url, \
            httpx.Client(base_url=base_url, timeout=30) as browser:
        started = browser.get("/console/sign-in/oidc")
        assert started.status_code == 303
        authorized = httpx.post(started.headers["location"], data={"sub": "erin@example.org"})
        callback = authorized.headers["location"]
        assert callback.startswith(f"{base_url}/console/callback?")
        token_asked_at = time.monotonic()  # the provider issues the token while the callback runs
        signed_in = browser.get(callback)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/", signed_in.headers
        cookie = signed_in.headers["set-cookie"]
        max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
        assert 0 < max_age <= TOKEN_LIFETIME_S  # the browser forgets the cookie by exp, not after session_max_s
        value = browser.cookies[SESSION_COOKIE]

        session = browser.get("/console/api/session").json()
        assert session["signed_in"] is True and session["name"] == "erin@example.org"
        signed = Signed(browser, session["csrf"])
        assert signed.ask(stack.model).status_code == 200

        # The cookie is sent by hand: the gateway ends the session, whatever the browser does with Max-Age.
        def refused() -> bool:
            answer = httpx.get(f"{base_url}/v1/models", cookies={SESSION_COOKIE: value}, headers=CONSOLE)
            assert answer.status_code in (200, 401), answer.text
            return answer.status_code == 401

        assert eventually(refused, seconds=TOKEN_LIFETIME_S + 10)
        ended_after = time.monotonic() - token_asked_at
        # exp is the issue time in whole seconds plus the lifetime (more than 5 s after token_asked_at): the session
        # lasts until then, and not longer (the slack above is the callback's own time and the polling).
        assert TOKEN_LIFETIME_S - 1 <= ended_after <= TOKEN_LIFETIME_S + 2, ended_after
        assert_like_a_lapsed_session(signed, base_url)
    assert names_in_logs(caplog, "erin") == []


def test_a_sessions_check_costs_no_bcrypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What every console request pays: while the file is unchanged, no hash at all; after a change, one HMAC.
    Counted, not timed: bcrypt is made to fail, so a check that ran it would raise."""
    path = tmp_path / "htpasswd"
    hashed = hash_password("a password", cost=10)
    path.write_text(format_htpasswd({"gina": hashed}))
    watched = WatchedFile(path, parse_htpasswd)
    entry = HtpasswdEntry(watched, "gina", fingerprint(hashed), watched.version)

    def no_bcrypt(*_: object) -> bool:
        raise AssertionError("a session's check ran bcrypt")

    monkeypatch.setattr(bcrypt, "checkpw", no_bcrypt)
    monkeypatch.setattr(bcrypt, "hashpw", no_bcrypt)
    assert all(entry.holds() for _ in range(1_000))
    monkeypatch.undo()

    # Another user added: a new file version, gina's entry unchanged, so her session goes on.
    users = parse_htpasswd(path.read_text(), path)
    path.write_text(format_htpasswd({**users, "hugo": hash_password("another", cost=10)}))
    store = SessionStore(3600, 7200, 10)
    cookie, _ = store.open(local_principal("gina", {}), entry)
    assert eventually(lambda: watched.current is not None and watched.version != entry.version, seconds=5)
    assert store.get(cookie) is not None and entry.version == watched.version

    # Her password set again: the session is gone for good, even if the old line came back.
    path.write_text(format_htpasswd({**users, "gina": hash_password("a password", cost=10)}))
    assert eventually(lambda: store.get(cookie) is None, seconds=5)
    path.write_text(format_htpasswd(users))
    time.sleep(1.1)
    assert store.get(cookie) is None and len(store) == 0


def test_an_oidc_session_is_cut_at_exp_and_its_cookie_with_it() -> None:
    now = [1_000_000.0]
    store = SessionStore(idle_s=3600, max_s=7200, max_sessions=10, clock=lambda: now[0])
    expiry = TokenExpiry(ends_at=now[0] + 300, wall_clock=lambda: now[0])
    cookie, session = store.open(local_principal("ida", {}), expiry)
    assert store.lifetime_s(session, wall_clock=lambda: now[0]) == 300
    now[0] += 299
    assert store.get(cookie) is not None
    now[0] += 1
    assert store.get(cookie) is None and len(store) == 0


def eventually(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
