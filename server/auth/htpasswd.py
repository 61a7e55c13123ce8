"""The htpasswd file: ``user:bcrypt-hash`` lines, read by the gateway and written by ``airlock users``.

Only bcrypt is accepted. Apache's other schemes (MD5-crypt ``$apr1$``, SHA-1 ``{SHA}``, crypt, plain text) are
fast to brute-force, so a file holding one is refused, naming the line and never its content.
"""

from __future__ import annotations

import re
from pathlib import Path

import bcrypt

from .watched import CredentialsFileError

BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
USER_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
DEFAULT_COST = 12
# Apache's `htpasswd -B` uses cost 5 unless told otherwise (-C): thousands of guesses a second per core.
MIN_COST = 10
MAX_COST = 17


def parse_htpasswd(text: str, path: Path) -> dict[str, bytes]:
    """User name -> bcrypt hash. Blank lines and ``#`` comments are skipped; costs are checked."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not USER_NAME.match(user):
            raise CredentialsFileError(f"{path}, line {number}: not a 'user:hash' line")
        match = BCRYPT_HASH.match(hashed)
        if match is None:
            raise CredentialsFileError(
                f"{path}, line {number}: the password is not hashed with bcrypt (only bcrypt is accepted; "
                "set it again with 'airlock users passwd')"
            )
        if not MIN_COST <= int(match.group(1)) <= MAX_COST:
            raise CredentialsFileError(
                f"{path}, line {number}: bcrypt cost {int(match.group(1))} is outside {MIN_COST}-{MAX_COST} "
                "(set it again with 'airlock users passwd', or 'htpasswd -B -C 12')"
            )
        if user in users:
            raise CredentialsFileError(f"{path}, line {number}: the user appears twice")
        users[user] = hashed.encode()
    return users


def check_user_name(user: str) -> str:
    if not USER_NAME.match(user):
        raise ValueError("a user name is 1 to 128 letters, digits or . _ @ + -")
    return user


def hash_password(password: str, cost: int = DEFAULT_COST) -> bytes:
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode()) > 72:
        raise ValueError("bcrypt uses at most 72 bytes of a password; choose a shorter one")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost))


def costliest(users: dict[str, bytes]) -> bytes | None:
    """The slowest hash in the file: checking an unknown user against it takes as long as the slowest real one."""
    return max(users.values(), key=lambda hashed: int(hashed[4:6]), default=None)


def password_matches(password: str, hashed: bytes) -> bool:
    encoded = password.encode()
    if len(encoded) > 72:  # bcrypt would silently ignore the rest; such a password was never set by us
        return False
    return bcrypt.checkpw(encoded, hashed)


def format_htpasswd(users: dict[str, bytes]) -> str:
    return "".join(f"{user}:{hashed.decode()}\n" for user, hashed in sorted(users.items()))
