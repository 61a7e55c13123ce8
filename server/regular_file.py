"""Opening a file that must be a regular file: once, never blocking, and judged by the descriptor that is then read.

A check by name (``lstat``, ``is_file``) and a later ``open`` by name see two moments: in between, the name can become
a FIFO (opening it waits forever for a writer), a device, a directory or a link. So the file is opened once with
``O_NONBLOCK`` (a FIFO opens at once), and ``fstat`` of that descriptor must say "regular file" before a byte is read;
``O_NOFOLLOW`` refuses a link in the last component where one is not allowed. See open(2) and inode(7).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (inode(7)'s file types)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device file"), (stat.S_ISBLK, "a device file")):
        if test(mode):
            return name
    return "not a regular file"


class NotRegularFile(OSError):
    """``path`` is something else than a regular file; ``strerror`` says what, for "cannot read X: <strerror>"."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({what})", str(path))


def open_regular(path: Path, *, follow: bool = False) -> BinaryIO:
    """``path`` opened for reading, refused (``NotRegularFile``) unless the opened descriptor is a regular file.
    ``follow``: a link in the last component is followed (a key file the admin placed); otherwise it is refused."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow and os.path.islink(path):
            raise NotRegularFile(path, "a symlink") from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
