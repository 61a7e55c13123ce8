"""``airlock users`` and ``airlock keys``, and how the gateway treats the files they write."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import bcrypt
import pytest

from server.auth.chain import build_authentication
from server.auth.watched import CredentialsFileError
from server.cli_auth import CommandError, parse_lifetime
from server.config import AuthSettings

from .conftest import AIRLOCK, ROOT, airlock_cli


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


def test_users_add_list_passwd_remove(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    airlock_cli("users", "add", "alice", "--file", str(htpasswd), "--password-stdin", "--cost", "10",
                stdin="first secret\n")
    airlock_cli("users", "add", "bob", "--file", str(htpasswd), "--password-stdin", "--cost", "10", stdin="b\n")
    assert oct(htpasswd.stat().st_mode & 0o777) == "0o600"
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
    assert key not in keys_file.read_text() and key.rsplit("_", 1)[1] not in keys_file.read_text()
    listing = airlock_cli("keys", "list", "--file", str(keys_file))
    assert "laptop" in listing and "active" in listing and key.rsplit("_", 1)[1] not in listing


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
