"""``airlock users`` and ``airlock keys``, and how the gateway treats the files they write."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import bcrypt
import pytest

from server.auth.chain import build_authentication
from server.auth.watched import CredentialsFileError
from server.cli_auth import CommandError, parse_lifetime
from server.config import AuthSettings

from .conftest import AIRLOCK, ROOT, airlock_cli, key_secret, wait_ready, write_config
from .servers import free_port
from .terminal import TerminalRun, run_in_terminal


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


def test_users_add_list_passwd_remove(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    airlock_cli("users", "add", "alice", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                stdin="first secret\n")
    airlock_cli("users", "add", "bob", "--file", str(htpasswd), "--password-stdin", "--cost", "10", stdin="b\n")
    assert oct(htpasswd.stat().st_mode & 0o777) == "0o640"  # group-readable: see test_systemd.py
    text = htpasswd.read_text()
    assert "first secret" not in text
    alice_hash = dict(line.split(":", 1) for line in text.splitlines())["alice"]
    assert bcrypt.checkpw(b"first secret", alice_hash.encode())
    assert airlock_cli("users", "list", "--file", str(htpasswd)).split() == ["alice", "bob"]
    airlock_cli("users", "passwd", "alice", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                stdin="second secret\n")
    alice_hash = dict(line.split(":", 1) for line in htpasswd.read_text().splitlines())["alice"]
    assert bcrypt.checkpw(b"second secret", alice_hash.encode())
    airlock_cli("users", "remove", "bob", "--file", str(htpasswd))
    assert airlock_cli("users", "list", "--file", str(htpasswd)).split() == ["alice"]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("users", "add", "alice"), "again\n", "already exists"),
        (("users", "passwd", "nobody"), "x\n", "no user 'nobody'"),
        (("users", "remove", "nobody"), "", "no user 'nobody'"),
        (("users", "add", "bad:name"), "x\n", "user name"),
        (("users", "add", "empty"), "\n", "password is empty"),
        (("users", "add", "nostdin"), "", "--password-stdin"),
    ],
)
def test_users_mistakes_are_clear(tmp_path: Path, args: tuple[str, ...], stdin: str, message: str) -> None:
    htpasswd = tmp_path / "htpasswd"
    airlock_cli("users", "add", "alice", "--file", str(htpasswd), "--password-stdin", "--cost", "10", stdin="a\n")
    extra = ("--password-stdin",) if stdin and args[1] != "remove" else ()
    result = run(*args, "--file", str(htpasswd), *extra, stdin=stdin)
    assert result.returncode == 1
    assert message in result.stderr


def test_weak_hashes_are_refused_naming_the_line_not_the_hash(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    good = bcrypt.hashpw(b"pw", bcrypt.gensalt(10)).decode()
    md5 = "$apr1$Vv7mZ1Ay$2VQ2bBr0nYFG2UNDpy7nB0"
    htpasswd.write_text(f"# staff\nalice:{good}\nbob:{md5}\n")
    with pytest.raises(CredentialsFileError, match="line 3: the password is not hashed with bcrypt") as caught:
        build_authentication(AuthSettings(htpasswd_file=htpasswd))
    assert md5 not in str(caught.value) and "bob" not in str(caught.value)

    config = tmp_path / "airlock.yaml"
    config.write_text(f"auth:\n  htpasswd_file: {htpasswd}\nupstreams:\n  - url: unix:{tmp_path}/none.sock\n")
    result = run("gateway", "--config", str(config))
    assert result.returncode == 2
    assert "line 3" in result.stderr and md5 not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("line", "message"), [
    ("carol:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(5)).decode(), "bcrypt cost 5 is outside 10-17"),
    ("carol:$2b$12$" + "!" * 53, "not hashed with bcrypt"),
    ("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "not hashed with bcrypt"),
    ("carol:plain-text-password", "not hashed with bcrypt"),
    ("carol", "not a 'user:hash' line"),
])
def test_every_weak_or_broken_line_is_refused(tmp_path: Path, line: str, message: str) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(line + "\n")
    with pytest.raises(CredentialsFileError, match=message) as caught:
        build_authentication(AuthSettings(htpasswd_file=htpasswd))
    assert line.partition(":")[2] not in str(caught.value) or not line.partition(":")[2]


def test_keys_create_prints_the_key_once_and_stores_a_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    result = run("keys", "create", "--user", "alice", "--name", "laptop", "--expires", "30d", "--file", str(keys_file))
    assert result.returncode == 0
    key = result.stdout.strip()
    assert key.startswith("alk_") and "shown only this once" in result.stderr
    assert key not in keys_file.read_text() and key_secret(key) not in keys_file.read_text()
    listing = airlock_cli("keys", "list", "--file", str(keys_file))
    assert "laptop" in listing and "active" in listing and key_secret(key) not in listing


def test_key_file_from_the_config(tmp_path: Path) -> None:
    keys_file = tmp_path / "from-config.json"
    config = tmp_path / "airlock.yaml"
    config.write_text(f"auth:\n  api_keys_file: {keys_file}\n")
    airlock_cli("keys", "create", "--user", "alice", "--config", str(config))
    assert keys_file.exists()
    result = run("keys", "list")
    assert result.returncode == 2 and "auth.api_keys_file is not set" in result.stderr


def test_lifetimes() -> None:
    assert parse_lifetime("90d").days == 90  # type: ignore[union-attr]
    assert parse_lifetime("12h").total_seconds() == 12 * 3600  # type: ignore[union-attr]
    assert parse_lifetime("never") is None
    for wrong in ("0d", "90", "1y", "-3d"):
        with pytest.raises(CommandError):
            parse_lifetime(wrong)


def test_remote_address_without_auth_is_refused_by_the_cli(tmp_path: Path) -> None:
    result = run("gateway", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "without authentication" in result.stderr
    env_result = subprocess.run([*AIRLOCK, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "AIRLOCK_GATEWAY__HOST": "0.0.0.0",
                                     "AIRLOCK_AUTH__API_KEYS_FILE": str(tmp_path / "keys.json"),
                                     "AIRLOCK_GATEWAY__TLS__CERT_FILE": str(tmp_path / "airlock.crt"),
                                     "AIRLOCK_GATEWAY__TLS__KEY_FILE": str(tmp_path / "airlock.key")})
    assert env_result.returncode == 0, env_result.stderr  # with a method (and TLS) configured it may listen


# --- No secret is ever echoed (issue 15, item 7) ------------------------------------------------------------------
# A distinctive password that no message could contain by chance; every command given it is checked for it.
SECRET = "Quasar-Zebra-7731-do-not-echo"
NEW_SECRET = "Nebula-Walrus-4409-do-not-echo"


def assert_not_echoed(result: subprocess.CompletedProcess[str] | TerminalRun, *secrets: str) -> None:
    shown = result.screen if isinstance(result, TerminalRun) else result.stdout + result.stderr
    for secret in secrets:
        assert secret not in shown, shown
        # Nor a recognisable part of it (a message that cut it in half would still give most of it away).
        assert secret[: len(secret) // 2] not in shown and secret[len(secret) // 2:] not in shown, shown


def users_file(tmp_path: Path) -> Path:
    htpasswd = tmp_path / "htpasswd"
    airlock_cli("users", "add", "alice", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                stdin=SECRET + "\n")
    return htpasswd


@pytest.mark.parametrize(("args", "stdin", "returncode"), [
    (("users", "add", "bob", "--password-stdin"), f"{SECRET}\n", 0),                    # success
    (("users", "passwd", "alice", "--password-stdin"), f"{NEW_SECRET}\n", 0),
    (("users", "add", "alice", "--password-stdin"), f"{NEW_SECRET}\n", 1),              # exists already
    (("users", "passwd", "nobody", "--password-stdin"), f"{NEW_SECRET}\n", 1),          # no such user
    (("users", "add", "bad:name", "--password-stdin"), f"{NEW_SECRET}\n", 1),
    (("users", "add", "long", "--password-stdin"), f"{NEW_SECRET * 3}\n", 1),           # over bcrypt's 72 bytes
    (("users", "add", "carol", "--password-stdin", "--group", "no-such-group-x"), f"{NEW_SECRET}\n", 1),
    (("users", "add", "dave", "--password-stdin", "--mode", "0644"), f"{NEW_SECRET}\n", 2),
    # The password typed where argparse expected nothing, or as an option that does not exist: usage errors.
    (("users", "add", "erin", NEW_SECRET), "", 2),
    (("users", "add", "erin", f"--password={NEW_SECRET}"), "", 2),
    (("users", "add", "erin", f"--pass={NEW_SECRET}"), "", 2),                          # abbreviates --password-stdin
    (("users", "passwd", "alice", "--password", NEW_SECRET), "", 2),
    (("users", NEW_SECRET), "", 2),                                                     # invalid choice
    (("users", "add", "erin", "--cost", NEW_SECRET), "", 2),                           # invalid int
    (("users", "add", "erin", f"-X{NEW_SECRET}"), "", 2),                               # an unknown short option
])
def test_users_commands_never_echo_a_password(
    tmp_path: Path, args: tuple[str, ...], stdin: str, returncode: int,
) -> None:
    htpasswd = users_file(tmp_path)
    cost = () if "--cost" in args or args[1] not in ("add", "passwd") else ("--cost", "10")
    result = run(*args, "--file", str(htpasswd), *cost, stdin=stdin)
    assert result.returncode == returncode, result.stderr
    assert_not_echoed(result, SECRET, NEW_SECRET)
    assert SECRET not in htpasswd.read_text() and NEW_SECRET not in htpasswd.read_text()


@pytest.mark.parametrize(("args", "answers", "returncode", "message"), [
    (("users", "add", "bob"), [("New password:", SECRET), ("Again:", SECRET)], 0, "added bob"),
    (("users", "passwd", "alice"), [("New password:", NEW_SECRET), ("Again:", NEW_SECRET)], 0, "password changed"),
    (("users", "add", "carol"), [("New password:", SECRET), ("Again:", NEW_SECRET)], 1, "the passwords differ"),
    # Ctrl-D at either prompt: a plain message, no traceback, nothing written.
    (("users", "add", "carol"), [("New password:", "\x04")], 1, "no password given; nothing changed"),
    (("users", "passwd", "alice"), [("New password:", NEW_SECRET), ("Again:", "\x04")], 1, "no password given"),
])
def test_interactive_passwords_are_not_echoed_on_a_real_terminal(
    tmp_path: Path, args: tuple[str, ...], answers: list[tuple[str, str]], returncode: int, message: str,
) -> None:
    htpasswd = users_file(tmp_path)
    shown = run_in_terminal([*AIRLOCK, *args, "--file", str(htpasswd), "--cost", "10"], answers, cwd=ROOT)
    assert shown.returncode == returncode and message in shown.screen, shown.screen
    assert "Traceback" not in shown.screen
    assert_not_echoed(shown, SECRET, NEW_SECRET)
    if returncode == 0:
        user, password = args[2], answers[0][1]
        hashed = dict(line.split(":", 1) for line in htpasswd.read_text().splitlines())[user]
        assert bcrypt.checkpw(password.encode(), hashed.encode())  # what was typed is what was set


def test_keys_create_shows_the_key_once_and_nothing_else_repeats_it(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    created = run("keys", "create", "--user", "alice", "--file", str(keys_file))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id, secret = key.removeprefix("alk_").split("_", 1)
    assert (created.stdout + created.stderr).count(key) == 1 and created.stderr.count(secret) == 0
    wrong_id = f"alk_{'0' * 16}_{secret}"  # a real secret under an id that does not exist
    for args, returncode in [
        (("keys", "list"), 0),
        (("keys", "list", "--user", key), 0),
        (("keys", "list", key), 2),                           # a key where no argument belongs
        (("keys", "revoke", wrong_id), 1),
        (("keys", "revoke", f"{key}x!"), 1),                  # a mangled key: neither an id nor a key
        (("keys", "revoke", "--", secret), 1),                # only the secret half ("--": it may begin with "-")
        (("keys", "revoke", f"-{secret}"), 2),                # read as an unknown option: refused, not echoed
        (("keys", "revoke", key, "--mode", "0640"), 0),       # the whole key revokes it, by its id
        (("keys", "revoke", key), 0),                         # already revoked
        (("keys", "create", "--user", "bob", key), 2),
    ]:
        result = run(*args[:2], "--file", str(keys_file), *args[2:])
        assert result.returncode == returncode, (args, result.stderr)
        assert_not_echoed(result, secret)
    revoked = [line for line in airlock_cli("keys", "list", "--file", str(keys_file)).splitlines() if key_id in line]
    assert len(revoked) == 1 and revoked[0].endswith("revoked")
    assert secret not in keys_file.read_text()


def test_a_whole_key_whose_secret_is_not_that_keys_revokes_nothing(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    first = airlock_cli("keys", "create", "--user", "alice", "--file", str(keys_file)).strip()
    second = airlock_cli("keys", "create", "--user", "bob", "--file", str(keys_file)).strip()
    first_id, second_secret = first.split("_")[1], second.split("_", 2)[2]
    result = run("keys", "revoke", f"alk_{first_id}_{second_secret}", "--file", str(keys_file))
    assert result.returncode == 1 and f"the key given is not key {first_id}'s" in result.stderr, result.stderr
    assert_not_echoed(result, second_secret)
    assert "Traceback" not in result.stderr
    listed = airlock_cli("keys", "list", "--file", str(keys_file)).splitlines()
    assert [line.split()[-1] for line in listed if first_id in line or second.split("_")[1] in line] == ["active"] * 2


def test_revoking_by_a_whole_key_names_only_its_id(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key = airlock_cli("keys", "create", "--user", "alice", "--file", str(keys_file)).strip()
    key_id = key.split("_")[1]
    result = run("keys", "revoke", key, "--file", str(keys_file))
    assert result.returncode == 0 and f"revoked key {key_id} of alice" in result.stdout, result.stderr
    assert key not in result.stdout + result.stderr


def test_config_errors_never_show_the_value(tmp_path: Path) -> None:
    """A secret pasted into the wrong setting, a wrong type, a broken line: the message names the place only."""
    short_salt = tmp_path / "salt"
    short_salt.write_text(SECRET[:20])  # too short to be accepted as the salt secret
    cases: list[tuple[str, dict[str, str]]] = [
        (f"auth:\n  password: {SECRET}\n", {}),                                  # unknown setting
        (f"gateway:\n  port: {SECRET}\n", {}),                                   # wrong type
        (f"auth: {SECRET}\n", {}),
        (f"console:\n  public_url: {SECRET}\n", {}),                             # fails a pattern
        (f"gateway: {{port: 8000\n  host: {SECRET}\n", {}),                      # broken YAML
        ("", {"AIRLOCK_GATEWAY__PORT": SECRET}),
        ("", {"AIRLOCK_AUTH": '{"htpasswd_file": "' + SECRET}),                  # JSON that does not parse
        ("", {f"AIRLOCK_{SECRET.upper()}": "x"}),                                # misspelt name: the name is shown
        (f"privacy:\n  salt_secret_file: {short_salt}\n", {}),
    ]
    for number, (text, env) in enumerate(cases):
        config = tmp_path / f"config-{number}.yaml"
        config.write_text(text)
        # `config` validates the settings; the gateway also reads the files they name (the salt).
        command = "gateway" if "salt_secret_file" in text else "config"
        result = subprocess.run([*AIRLOCK, command, "--config", str(config)], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, env={**os.environ, **env})
        assert result.returncode == 2, (text, env, result.stderr)
        assert "Traceback" not in result.stderr
        if f"AIRLOCK_{SECRET.upper()}" not in env:  # for a misspelt variable, naming it is the point
            assert_not_echoed(result, SECRET)


def test_audit_never_shows_its_credential(tmp_path: Path) -> None:
    """`airlock audit` takes a credential (AIRLOCK_AUDIT_KEY): refused by a real gateway, neither the audit's
    message nor the gateway's log repeats it."""
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"version": 1, "keys": []}\n')
    htpasswd = users_file(tmp_path)
    config = write_config(tmp_path / "gateway.yaml", {
        "auth": {"api_keys_file": str(keys_file), "htpasswd_file": str(htpasswd)},
        "upstreams": [{"url": f"unix:{tmp_path}/no-engine.sock"}]})
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen([*AIRLOCK, "gateway", "--config", str(config), "--port", str(port)], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", gateway, log_path, timeout=60)
        wrong_key = f"alk_{'ab' * 8}_{NEW_SECRET.replace('-', '_')}_{'x' * 14}"
        for credential in (wrong_key, f"alice:{NEW_SECRET}", NEW_SECRET):
            result = subprocess.run(
                [*AIRLOCK, "audit", "--attach", str(gateway.pid), "--url", f"http://127.0.0.1:{port}"], cwd=ROOT,
                capture_output=True, text=True, timeout=120, env={**os.environ, "AIRLOCK_AUDIT_KEY": credential})
            assert result.returncode == 2 and "answered 401" in result.stderr, result.stderr
            assert_not_echoed(result, NEW_SECRET)
            assert credential not in result.stdout + result.stderr
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
    logged = log_path.read_text()
    assert "authentication: " in logged and "Finished server process" in logged  # the log was captured
    assert NEW_SECRET not in logged and NEW_SECRET.replace("-", "_") not in logged


def test_a_file_others_could_read_is_kept_from_them_when_replaced(tmp_path: Path) -> None:
    """An htpasswd file made by Apache's `htpasswd -c` is 0644; the first `airlock users` change closes it to others
    (and keeps what its owner and group had)."""
    htpasswd = users_file(tmp_path)
    htpasswd.chmod(0o644)
    result = run("users", "add", "bob", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                 stdin=f"{NEW_SECRET}\n")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(htpasswd.stat().st_mode) == 0o640
