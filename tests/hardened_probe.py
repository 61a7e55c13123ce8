"""Run by test_privacy_hardening.py through the engines' hardened start: reports, from itself and from a forked
child (as vLLM forks its engine core), whether the process is dumpable and its core-dump limit."""

from __future__ import annotations

import json
import os
import resource
import sys

from server.privacy import is_dumpable


def state() -> dict[str, object]:
    return {"dumpable": is_dumpable(), "core": list(resource.getrlimit(resource.RLIMIT_CORE)), "argv": sys.argv[1:]}


if __name__ == "__main__":
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, json.dumps(state()).encode())
        os._exit(0)
    os.waitpid(child, 0)
    print(json.dumps({"process": state(), "forked_child": json.loads(os.read(read_end, 65536))}))
