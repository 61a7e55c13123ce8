"""What the traced calls mean: egress, DNS lookups, files written, log lines, and which canaries they carried."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .canary import Canaries
from .strace import Syscall

WRITE_CALLS = frozenset({"write", "pwrite64", "writev", "pwritev", "pwritev2"})
OPEN_CALLS = frozenset({"open", "openat", "openat2", "creat"})
RENAME_CALLS = frozenset({"rename", "renameat", "renameat2", "link", "linkat"})
SEND_CALLS = frozenset({"connect", "sendto", "sendmsg", "sendmmsg"})
WRITE_INTENT = re.compile(r"\bO_(?:WRONLY|RDWR|CREAT|TRUNC|APPEND)\b")
DNS_PORT = 53
LOG_FDS = frozenset({1, 2})
# Files with these prefixes are devices and kernel interfaces, not storage ("/dev/shm" is storage: tmpfs).
PSEUDO_PREFIXES = ("/dev/", "/proc/", "/sys/")
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# A file that is still there is read whole afterwards, unless it is larger than this (model caches and such).
MAX_SCANNED_FILE_BYTES = 512 * 1024 * 1024

# strace -y prints a descriptor as 3</path>, and one whose file is gone (an unlinked or O_TMPFILE spool, the classic
# way to buffer a body) as 3</tmp/#1234>(deleted) (strace 6.1): such a file is named "/tmp/#1234 (deleted)".
_FD = re.compile(r"^(\d+)<(.*?)>(\(deleted\))?(?:, |$)")
_RESULT_PATH = re.compile(r"^\d+<(.*)>(\(deleted\))?$")
_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
_INET = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6?, "([^"]+)"')
_UNIX_PATH = re.compile(r'sun_path="([^"]*)"')
_SOCKET = re.compile(r"socket:\[(\d+)\]")
# glibc's name service cache daemon also answers user and group lookups; only its host requests are name
# lookups (GETHOSTBYNAME, ...v6, GETHOSTBYADDR, ...v6, GETFDHST, GETAI in glibc's nscd-client.h).
NSCD_HOST_REQUESTS = frozenset({4, 5, 6, 7, 13, 14})
NSCD_HEADER_BYTES = 12


@dataclass
class Destination:
    """A non-loopback address (or a DNS server) that a process tried to reach."""

    address: str
    port: int
    calls: int = 0
    programs: set[str] = field(default_factory=set)

    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "attempts": self.calls, "programs": sorted(self.programs)}


@dataclass
class WrittenFile:
    """A file some process of the stack opened for writing, renamed into place or wrote to."""

    path: str
    opens: int = 0
    writes: int = 0
    bytes_written: int = 0
    canaries: set[str] = field(default_factory=set)
    programs: set[str] = field(default_factory=set)

    def as_json(self, storage: str) -> dict[str, Any]:
        return {"path": self.path, "storage": storage, "opens": self.opens, "writes": self.writes,
                "bytes_written": self.bytes_written, "canaries": sorted(self.canaries),
                "programs": sorted(self.programs)}


@dataclass
class LogStream:
    """Writes to a process's standard output or error: its log lines."""

    program: str
    fd: int
    writes: int = 0
    canaries: set[str] = field(default_factory=set)


class Findings:
    """Reads system calls as they come, while the stack runs (so process names can still be looked up)."""

    def __init__(self, canaries: Canaries) -> None:
        self.canaries = canaries
        self.calls = 0
        self.pids: set[int] = set()
        self.egress: dict[tuple[str, int], Destination] = {}
        self.dns: dict[tuple[str, int], Destination] = {}
        self.files: dict[str, WrittenFile] = {}
        self.logs: dict[tuple[str, int], LogStream] = {}
        self._programs: dict[int, str] = {}
        self._ran: set[str] = set()
        self._nscd_sockets: set[str] = set()

    def observe(self, call: Syscall) -> None:
        self.calls += 1
        if call.name == "execve" and not call.failed:
            self._programs.pop(call.pid, None)  # it runs something else now (a fork's first calls named its parent)
        if call.name == "execve" or call.pid not in self.pids:
            self.program(call.pid)  # named while it runs: a short-lived worker may be gone by the report
        self.pids.add(call.pid)
        if call.name in WRITE_CALLS:
            self._written(call)
        elif call.name in OPEN_CALLS:
            self._opened(call)
        elif call.name in RENAME_CALLS and not call.failed:
            strings = call.strings()
            if strings:
                self._file(strings[-1].decode(errors="replace"), call).opens += 1
        elif call.name in SEND_CALLS:
            self._sent(call)

    @property
    def programs(self) -> list[str]:
        """Every program a traced process ran (forked children under each name they ran), for the report."""
        return sorted(self._ran)

    def program(self, pid: int) -> str:
        """What the process runs, read while it runs (a thread is named after its process)."""
        if pid not in self._programs:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                leader = re.search(r"^Tgid:\s+(\d+)", status, re.MULTILINE)
                tgid = int(leader.group(1)) if leader else pid
                argv = Path(f"/proc/{tgid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                self._programs[pid] = program_name([arg for arg in argv if arg])
            except OSError:
                self._programs[pid] = "?"
            self._ran.add(self._programs[pid])
        return self._programs[pid]

    def _file(self, path: str, call: Syscall) -> WrittenFile:
        written = self.files.setdefault(path, WrittenFile(path))
        written.programs.add(self.program(call.pid))
        return written

    def _opened(self, call: Syscall) -> None:
        if call.name != "creat" and not WRITE_INTENT.search(call.args):
            return
        resolved = _RESULT_PATH.match(call.result)
        if resolved:
            path = resolved.group(1) + (" (deleted)" if resolved.group(2) else "")
        else:
            strings = call.strings()
            if not strings:
                return
            path = strings[0].decode(errors="replace")
        if not path.startswith(PSEUDO_PREFIXES) or path.startswith("/dev/shm/"):
            self._file(path, call).opens += 1

    def _written(self, call: Syscall) -> None:
        target = _FD.match(call.args)
        if not target:
            return
        fd, where = int(target.group(1)), target.group(2) + (" (deleted)" if target.group(3) else "")
        data = b"".join(call.strings())
        self._nscd_lookup(where, data, call)
        found = self.canaries.found_in(data) if data else []
        if fd in LOG_FDS:
            stream = self.logs.setdefault((self.program(call.pid), fd), LogStream(self.program(call.pid), fd))
            stream.writes += 1
            stream.canaries.update(found)
        if where.startswith("/") and (not where.startswith(PSEUDO_PREFIXES) or where.startswith("/dev/shm/")):
            written = self._file(where, call)
            written.writes += 1
            written.bytes_written += len(data)
            written.canaries.update(found)

    def _nscd_lookup(self, where: str, data: bytes, call: Syscall) -> None:
        if where in self._nscd_sockets and _nscd_request(data) in NSCD_HOST_REQUESTS:
            self._destination(self.dns, "nscd", 0, call)

    def _sent(self, call: Syscall) -> None:
        target = _FD.match(call.args)
        if target and call.name != "connect":
            self._nscd_lookup(target.group(2), b"".join(call.strings()), call)
        unix = _UNIX_PATH.search(call.args)
        if unix:
            socket = _SOCKET.search(call.args)
            # A failed connect means no daemon: glibc then looks names up itself, where DNS shows as port 53.
            if "nscd" in unix.group(1) and socket and not call.failed:
                self._nscd_sockets.add(socket.group(0))
            return
        port_match, address_match = _PORT.search(call.args), _INET.search(call.args)
        if not (port_match and address_match):
            return
        port, address = int(port_match.group(1)), address_match.group(1) or address_match.group(2)
        if port == DNS_PORT:
            self._destination(self.dns, address, port, call)
        elif not _is_local(address):
            self._destination(self.egress, address, port, call)

    def _destination(self, table: dict[tuple[str, int], Destination], address: str, port: int,
                     call: Syscall) -> None:
        destination = table.setdefault((address, port), Destination(address, port))
        destination.calls += 1
        destination.programs.add(self.program(call.pid))

    def scan_files_left(self) -> None:
        """Read every written file that is still there: bytes written through a memory map are seen only so."""
        for written in self.files.values():
            path = Path(written.path)
            try:
                if path.is_file() and path.stat().st_size <= MAX_SCANNED_FILE_BYTES:
                    written.canaries.update(self.canaries.found_in(path.read_bytes()))
            except OSError:
                continue


def _nscd_request(data: bytes) -> int | None:
    """The request type in an nscd request header (int32 version, type, key length; native byte order)."""
    if len(data) < NSCD_HEADER_BYTES:
        return None
    return int.from_bytes(data[4:8], sys.byteorder)


def program_name(argv: list[str]) -> str:
    """``vllm.entrypoints...`` or ``server.cli up`` for Python processes, the executable's name otherwise."""
    if not argv:
        return "?"
    name = argv[0].rsplit("/", 1)[-1]
    if name.startswith("python") and len(argv) > 1:
        if "-m" in argv[:-1]:
            module = argv[argv.index("-m") + 1]
            rest = argv[argv.index("-m") + 2:]
            return f"{module} {rest[0]}" if module == "server.cli" and rest else module
        if "-c" in argv[:-1]:
            after_code = argv[argv.index("-c") + 2: argv.index("-c") + 3]  # Airlock's hardened engine start
            return after_code[0] if after_code and re.fullmatch(r"[\w.]+", after_code[0]) else f"{name} -c"
        return argv[1].rsplit("/", 1)[-1]
    return name


def _is_local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def storage_of(path: str, mounts: list[tuple[str, str]]) -> str:
    """'memory' (tmpfs), 'disk', or 'pseudo' (devices, /proc), from the longest mount point above ``path``."""
    if path.startswith(PSEUDO_PREFIXES) and not path.startswith("/dev/shm/"):
        return "pseudo"
    best, fstype = "", "?"
    for mount_point, kind in mounts:
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return "memory" if fstype in MEMORY_FILESYSTEMS else "disk"


def read_mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this process's mount namespace."""
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((fields[1].replace("\\040", " "), fields[2]))
    return mounts


def own_pid_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree
