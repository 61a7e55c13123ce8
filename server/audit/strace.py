"""strace as the audit's eyes: the command line, and its output turned back into system calls.

Only the calls that can move data out of a process are traced: opening, renaming and writing files, and
connecting or sending to an address; and execve, so that a child the gateway starts (a document render worker) is
named by what it runs, not by the gateway it was forked from. Written bytes are kept (up to ``MAX_STRING_BYTES``
per call) so that canaries can be looked for in them; the trace is read from a pipe and never stored.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass

TRACED_CALLS = (
    "open", "openat", "openat2", "creat", "rename", "renameat", "renameat2", "link", "linkat",
    "write", "pwrite64", "writev", "pwritev", "pwritev2",
    "connect", "sendto", "sendmsg", "sendmmsg", "execve",
)
# Longer writes are cut here: a canary is looked for in the first this many bytes of each write (and in every
# file that still exists afterwards, in full).
MAX_STRING_BYTES = 256 * 1024


def strace_command(output: str, *, attach: list[int] | None = None) -> list[str]:
    """strace following every process and thread, printing file paths of descriptors (-y) and strings as
    escaped bytes (-x), into ``output``. With ``attach``, strace attaches to running processes; else a command
    follows ``--``."""
    command = [
        "strace", "-f", "-qq", "-y", "-x", "-s", str(MAX_STRING_BYTES), "-o", output,
        "-e", "signal=none", "-e", "trace=" + ",".join(TRACED_CALLS),
    ]
    if attach is None:
        # Calls that are not traced then cost nothing; only possible for processes strace starts itself.
        return [*command, "--seccomp-bpf"]
    for pid in attach:
        command += ["-p", str(pid)]
    return command


@dataclass(frozen=True)
class Syscall:
    """One completed system call as strace printed it."""

    pid: int
    name: str
    args: str
    result: str

    @property
    def failed(self) -> bool:
        return self.result.startswith("-1 ")

    def strings(self) -> list[bytes]:
        """Every string argument, as the bytes the process passed."""
        return [codecs.escape_decode(raw.encode("ascii", "backslashreplace"))[0]
                for raw in _STRING.findall(self.args)]


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(.*)$", re.DOTALL)
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. \w+ resumed>(.*)$", re.DOTALL)
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


class TraceReader:
    """Turns strace's lines into ``Syscall``s, joining calls that another thread interrupted
    (``<unfinished ...>`` then ``<... name resumed>``)."""

    def __init__(self) -> None:
        self._pending: dict[int, str] = {}

    def feed(self, line: str) -> Iterator[Syscall]:
        line = line.rstrip("\n")
        if line.endswith(_UNFINISHED):
            pid = line.split(" ", 1)[0]
            if pid.isdigit():
                self._pending[int(pid)] = line[: -len(_UNFINISHED)]
            return
        resumed = _RESUMED.match(line)
        if resumed:
            start = self._pending.pop(int(resumed.group(1)), None)
            if start is None:
                return
            line = start + resumed.group(2)
        call = _CALL.match(line)
        if call:
            yield Syscall(int(call.group(1)), call.group(2), call.group(3), call.group(4))
