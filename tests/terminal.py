"""Run a command on a real pseudo-terminal and type into it, as a person at a shell would.

`getpass` reads from the controlling terminal (/dev/tty), not from standard input, so a pipe cannot answer it:
the command gets a pty of its own as its controlling terminal (`setsid --ctty`). Each answer is typed only after
its prompt has appeared, so the terminal's echo is already off when a password arrives, as for a real person.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TerminalRun:
    returncode: int
    # Everything the terminal showed: prompts, output, error messages, and any echo of what was typed.
    screen: str


def run_in_terminal(
    argv: Sequence[str], answers: Sequence[tuple[str, str]], cwd: Path, timeout_s: float = 60,
) -> TerminalRun:
    """Run ``argv``; for each ``(prompt, text)`` wait for ``prompt`` on the screen, then type ``text`` + Enter."""
    master, slave = os.openpty()
    process = subprocess.Popen(["setsid", "--ctty", "--wait", *argv], stdin=slave, stdout=slave, stderr=slave,
                               cwd=cwd, close_fds=True)
    os.close(slave)
    screen = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0].encode() in screen.rpartition(b"\n")[2]:
                os.write(master, pending.pop(0)[1].encode() + b"\n")
                screen += b"\n"  # keeps the prompt from matching twice
                continue
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command ended and closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif process.poll() is not None:
                break
        returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    assert not pending, f"never prompted for {pending[0][0]!r}; the screen showed: {screen.decode(errors='replace')}"
    return TerminalRun(returncode, screen.decode(errors="replace"))
