"""Process hardening: what a crash or another local user could otherwise read out of Airlock's memory."""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger("airlock")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def harden_process() -> None:
    """No core dumps (they would write prompts, images and keys held in memory to disk), and not dumpable: other
    processes of the same user cannot ptrace this one or read its memory through /proc."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not mark the process non-dumpable (errno %d)", ctypes.get_errno())


# Prepended to an engine's command line (``python -c HARDENED_START module args...``): the same hardening as
# ``harden_process`` for a process that runs vLLM, then the module as ``__main__``. Inline, not ``-m server...``,
# because an engine's Python (engine.python) may have vLLM but not Airlock. Children vLLM forks (its engine core
# and workers) inherit both settings; exec resets "dumpable", so anything it starts with exec keeps only the
# core-dump limit.
HARDENED_START = (
    "import ctypes, resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    f"ctypes.CDLL(None).prctl({PR_SET_DUMPABLE}, 0, 0, 0, 0); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def is_dumpable() -> bool:
    return bool(ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
