"""``airlock users`` and ``airlock keys``: manage the htpasswd and API key files the gateway re-reads live."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import re
import sys
from collections.abc import Callable, Container, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

from .auth.apikeys import PREFIX, ApiKey, format_keys, new_key, parse_keys, revoke
from .auth.credfile import FileAccess, FileAccessError, only_root_can_read, parse_mode, write_credentials_file
from .auth.htpasswd import check_user_name, format_htpasswd, hash_password, parse_htpasswd
from .auth.watched import CredentialsFileError
from .config import ConfigError, Settings, load_settings

DURATION = re.compile(r"^(\d+)([dhm])$")
DEFAULT_KEY_LIFETIME = "90d"
# What `keys revoke` takes: a key id, or a whole key (whose secret is then used for nothing and never printed).
KEY_ID = re.compile(r"^(?:alk_)?([0-9a-f]{16})(?:_[A-Za-z0-9_-]*)?$")
HIDDEN = "(not shown)"


class CommandError(Exception):
    """The command cannot do what was asked (exit status 1)."""


class SecretSafeParser(argparse.ArgumentParser):
    """argparse quotes what it could not use ("unrecognized arguments: hunter2"), so a password typed where a
    name was expected would be printed back. Its errors here name the options and never a value that was given."""

    _given: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        for value in sorted(set(_values(self._given, self._option_string_actions)), key=len, reverse=True):
            message = message.replace(repr(value), HIDDEN)
            message = re.sub(rf"(?<!\S){re.escape(value)}(?!\S)", HIDDEN, message)
        super().error(message)


def _values(arguments: Sequence[str], options: Container[str]) -> Iterator[str]:
    """Everything given on the command line but the names of this parser's own options (an unknown "option" such
    as ``-Xhunter2`` may be a password typed in the wrong place: it is hidden whole)."""
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if equals and argument.startswith("-"):
            yield value  # argparse may quote the value alone (an abbreviated option's "explicit argument")
        if argument and not (argument.startswith("-") and name in options):
            yield argument


def _write(args: argparse.Namespace, path: Path, text: str) -> None:
    try:
        status = write_credentials_file(path, text, FileAccess(args.group, args.mode))
    except FileAccessError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from exc
    if only_root_can_read(status):
        print(f"note: only root can read {path}; a gateway running as its own user (User=airlock) cannot. "
              "Give the file that user's group: --group airlock (see the README, 'Bare metal').", file=sys.stderr)


def _file(args: argparse.Namespace, pick: Callable[[Settings], Path | None], setting: str) -> Path:
    if args.file is not None:
        return Path(args.file)
    path = pick(load_settings(args.config))
    if path is None:
        raise ConfigError(f"auth.{setting} is not set: give --file, or --config with auth.{setting}")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8") if path.exists() else ""
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from exc


def _htpasswd(args: argparse.Namespace) -> tuple[Path, dict[str, bytes]]:
    path = _file(args, lambda s: s.auth.htpasswd_file, "htpasswd_file")
    try:
        return path, parse_htpasswd(_read(path), path)
    except CredentialsFileError as exc:
        raise CommandError(str(exc)) from exc


def _new_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CommandError("no terminal to ask for the password: pipe it in with --password-stdin")
        try:
            password = getpass.getpass("New password: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # Ctrl-D at the prompt
            raise CommandError("no password given; nothing changed") from None
        if again != password:
            raise CommandError("the passwords differ")
    return password


def _set_password(args: argparse.Namespace, must_exist: bool) -> None:
    path, users = _htpasswd(args)
    try:
        user = check_user_name(args.user)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if must_exist and user not in users:
        raise CommandError(f"no user '{user}' in {path}")
    if not must_exist and user in users:
        raise CommandError(f"user '{user}' already exists in {path} (use 'airlock users passwd')")
    try:
        users[user] = hash_password(_new_password(args), args.cost)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    _write(args, path, format_htpasswd(users))
    print(f"{'password changed for' if must_exist else 'added'} {user} ({path})")


def _cmd_users_add(args: argparse.Namespace) -> None:
    _set_password(args, must_exist=False)


def _cmd_users_passwd(args: argparse.Namespace) -> None:
    _set_password(args, must_exist=True)


def _cmd_users_remove(args: argparse.Namespace) -> None:
    path, users = _htpasswd(args)
    if users.pop(args.user, None) is None:
        raise CommandError(f"no user '{args.user}' in {path}")
    _write(args, path, format_htpasswd(users))
    print(f"removed {args.user} ({path}); their API keys still work until revoked: airlock keys list --user "
          f"{args.user}")


def _cmd_users_list(args: argparse.Namespace) -> None:
    _, users = _htpasswd(args)
    for user in sorted(users):
        print(user)


def parse_lifetime(text: str) -> timedelta | None:
    """``90d``, ``12h``, ``30m`` or ``never``."""
    if text == "never":
        return None
    match = DURATION.match(text)
    if match is None or int(match.group(1)) == 0:
        raise CommandError(f"--expires: '{text}' is not a duration like 90d, 12h, 30m, or never")
    amount, unit = int(match.group(1)), match.group(2)
    return timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: amount})


def _api_keys(args: argparse.Namespace) -> tuple[Path, dict[str, ApiKey]]:
    path = _file(args, lambda s: s.auth.api_keys_file, "api_keys_file")
    try:
        return path, parse_keys(_read(path), path)
    except CredentialsFileError as exc:
        raise CommandError(str(exc)) from exc


def _cmd_keys_create(args: argparse.Namespace) -> None:
    try:
        user = check_user_name(args.user)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    path, keys = _api_keys(args)
    key, entry = new_key(user, args.name, parse_lifetime(args.expires))
    keys[entry.id] = entry
    _write(args, path, format_keys(keys))
    print(key)
    expiry = f"expires {entry.expires}" if entry.expires else "never expires"
    print(f"key {entry.id} for {user} ({expiry}). It is shown only this once: store it now.", file=sys.stderr)


def _cmd_keys_list(args: argparse.Namespace) -> None:
    _, keys = _api_keys(args)
    now = datetime.now(UTC)
    rows = [("ID", "USER", "NAME", "CREATED", "EXPIRES", "STATE")]
    rows += [(k.id, k.user, k.name or "-", k.created, k.expires or "never", k.state(now))
             for k in sorted(keys.values(), key=lambda k: k.created) if args.user in (None, k.user)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _cmd_keys_revoke(args: argparse.Namespace) -> None:
    match = KEY_ID.match(args.key_id)
    if match is None:
        raise CommandError(f"give a key's id (16 hex digits, see 'airlock keys list') or the whole {PREFIX}... key; "
                           "what was given is neither (it is not shown, in case it is a secret)")
    path, keys = _api_keys(args)
    entry = keys.get(match.group(1))
    if entry is None:
        raise CommandError(f"no key with id {match.group(1)} in {path} (see 'airlock keys list')")
    secret = args.key_id.startswith(PREFIX) and args.key_id.split("_", 2)[2:]
    if secret and not hmac.compare_digest(hashlib.sha256(secret[0].encode()).hexdigest(), entry.sha256):
        # A whole key is a claim about which key is meant; one that is not key <id> may be a paste of another.
        raise CommandError(f"the key given is not key {entry.id}'s (its secret part differs, and is not shown); "
                           f"to revoke key {entry.id} anyway, give its id alone")
    if entry.revoked:
        print(f"key {entry.id} was already revoked on {entry.revoked}")
        return
    keys[entry.id] = revoke(entry)
    _write(args, path, format_keys(keys))
    print(f"revoked key {entry.id} of {entry.user}; the gateway refuses it within a second")


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--mode: ")) from exc


def add_commands(
    commands: argparse._SubParsersAction[SecretSafeParser],
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    def with_file(sub: argparse.ArgumentParser, setting: str, writes: bool = True) -> argparse.ArgumentParser:
        with_config(sub).add_argument("--file", type=Path, help=f"the file to manage (default: auth.{setting})")
        if writes:
            sub.add_argument("--group", help="give the file this group (default: keep it; a new file takes its "
                                             "directory's group)")
            sub.add_argument("--mode", type=_mode, help="0600, 0640 or 0660 (default: keep it; a new file 0640)")
        return sub

    users = commands.add_parser("users", help="manage HTTP Basic users (the htpasswd file)")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    for name, func, text in (("add", _cmd_users_add, "add a user"),
                             ("passwd", _cmd_users_passwd, "change a user's password")):
        sub = with_file(user_commands.add_parser(name, help=text), "htpasswd_file")
        sub.add_argument("user")
        sub.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        sub.add_argument("--cost", type=int, default=12, choices=range(10, 16), metavar="10-15",
                         help="bcrypt cost (default 12)")
        sub.set_defaults(func=func)
    remove = with_file(user_commands.add_parser("remove", help="remove a user"), "htpasswd_file")
    remove.add_argument("user")
    remove.set_defaults(func=_cmd_users_remove)
    with_file(user_commands.add_parser("list", help="list the users"), "htpasswd_file", writes=False).set_defaults(
        func=_cmd_users_list)

    keys = commands.add_parser("keys", help="manage API keys (the api_keys_file)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = with_file(key_commands.add_parser("create", help="create a key and print it once"), "api_keys_file")
    create.add_argument("--user", required=True, help="whose key it is")
    create.add_argument("--name", default="", help="a label, e.g. the laptop it is for")
    create.add_argument("--expires", default=DEFAULT_KEY_LIFETIME,
                        help=f"lifetime: 90d, 12h, 30m or never (default {DEFAULT_KEY_LIFETIME})")
    create.set_defaults(func=_cmd_keys_create)
    listing = with_file(key_commands.add_parser("list", help="list keys (never their secrets)"), "api_keys_file",
                        writes=False)
    listing.add_argument("--user", help="only this user's keys")
    listing.set_defaults(func=_cmd_keys_list)
    revoke_ = with_file(key_commands.add_parser("revoke", help="revoke a key by its id (or the whole key)"),
                        "api_keys_file")
    revoke_.add_argument("key_id")
    revoke_.set_defaults(func=_cmd_keys_revoke)
