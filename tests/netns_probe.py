"""Run inside a network namespace that has only loopback (``unshare -n``): start the real stack, ask it about an
image with the openai SDK, stop it. Prints one JSON line; exit status 0 when the answer came.

Used by test_no_egress.py. Nothing here may need the outside world: that is the point.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.images import image_part
from tests.servers import free_port


def main(demo_model_dir: str, workdir: str) -> int:
    work = Path(workdir)
    port = free_port()
    config = work / "airlock.yaml"
    config.write_text(yaml.safe_dump({
        "gateway": {"port": port},
        "engine": {"model": "demo", "demo_model_dir": demo_model_dir, "socket_dir": str(work / "sockets"),
                   "cpu_kvcache_gb": 1, "max_model_len": 2048},
    }))
    log = (work / "airlock.log").open("wb")
    stack = subprocess.Popen([sys.executable, "-m", "server.cli", "up", "--config", str(config)],
                             stdout=log, stderr=subprocess.STDOUT)
    # Asked of the kernel for this process's namespace (/sys/class/net would show the host's sysfs).
    result: dict[str, object] = {"interfaces": sorted(name for _, name in socket.if_nameindex())}
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and stack.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model="airlock-demo-qwen3-vl", max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part("PNG")]}],
        )
        result["answer"] = answer.choices[0].message.content
    except Exception as exc:  # reported, and the exit status says it failed
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.kill()
        result["stack_exit"] = stack.returncode
    print(json.dumps(result))
    return 0 if "answer" in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
