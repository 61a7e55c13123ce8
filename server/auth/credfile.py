"""Writing the htpasswd and API key files so that the gateway's own user can read them.

The gateway runs as its own user (``User=airlock`` under systemd) while ``airlock users`` / ``airlock keys`` are
often run as root. The rule, as the README states it:

- replacing a file keeps its owner, group and mode, less any access for others (root keeps the owner; anyone
  else who may replace the file becomes its owner, and must be able to keep its group, or nothing is written);
- a new file takes the group of its directory and mode 0640, as files in a setgid directory do: the directory's
  group may read it, nobody else. A user who may not give it that group (not root, not a member) keeps their own
  group and gets 0600;
- ``--group`` and ``--mode`` set them explicitly, for a new file or an existing one; ``--group`` alone also lets
  that group read the file (a root-only 0600 file given ``--group airlock`` becomes 0640), since that is its point.

The file is replaced atomically (a reader sees the old file or the new one), and is never readable by others.
"""

from __future__ import annotations

import grp
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

NEW_FILE_MODE = 0o640
OWNER_ONLY_MODE = 0o600
GROUP_READ = 0o040
# Bits a credentials file may have: read/write for its owner and group, nothing for others, nothing executable.
ALLOWED_MODE_BITS = 0o660


class FileAccessError(Exception):
    """The file cannot be written with the owner, group or mode asked for (nothing was changed)."""


@dataclass(frozen=True)
class FileAccess:
    """What ``--group`` and ``--mode`` asked for; ``None`` follows the rule above."""

    group: str | None = None
    mode: int | None = None


def parse_mode(text: str) -> int:
    """``0640``, ``640`` or ``0o640``: owner read/write, group at most read/write, nothing for others."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise ValueError("--mode: an octal mode such as 0640") from None
    if mode & ~ALLOWED_MODE_BITS or mode & OWNER_ONLY_MODE != OWNER_ONLY_MODE:
        raise ValueError("--mode: 0600, 0640 or 0660 (the owner reads and writes; others never get access)")
    return mode


def group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise FileAccessError(f"--group: there is no group '{group}' on this machine") from None


def write_credentials_file(path: Path, text: str, access: FileAccess = FileAccess()) -> os.stat_result:
    """Replace ``path`` with ``text`` following the rule in the module docstring; returns the new file's status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current: os.stat_result | None = path.stat()
    except FileNotFoundError:
        current = None
    if access.group is not None:
        gid, must_have_group = group_id(access.group), True
    elif current is not None:
        gid, must_have_group = current.st_gid, True
    else:
        gid, must_have_group = path.parent.stat().st_gid, False
    # A kept mode loses what others could do (an `htpasswd -c` file is 0644: its hashes were readable by all).
    mode = access.mode if access.mode is not None else (
        (current.st_mode & ALLOWED_MODE_BITS) | OWNER_ONLY_MODE if current is not None else NEW_FILE_MODE)
    if access.group is not None and access.mode is None:
        mode |= GROUP_READ
    root = os.geteuid() == 0

    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600 until it is complete
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
            if root and current is not None:
                os.fchown(handle.fileno(), current.st_uid, -1)
            if os.fstat(handle.fileno()).st_gid != gid:
                try:
                    os.fchown(handle.fileno(), -1, gid)
                except PermissionError:
                    if must_have_group:
                        raise FileAccessError(
                            f"cannot give {path} group {_group_name(gid)}: run as root, or as a member of that "
                            "group; nothing was changed") from None
                    # The group is then our own, which neither the rule nor --mode meant to let in.
                    mode = OWNER_ONLY_MODE
            os.fchmod(handle.fileno(), mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path.stat()


def only_root_can_read(status: os.stat_result) -> bool:
    """True for a file no service user could read: a gateway running as ``airlock`` would refuse everyone."""
    return status.st_uid == 0 and (status.st_gid == 0 or not status.st_mode & GROUP_READ)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
