"""nginx (Debian's package) as a reverse proxy in front of an engine's unix socket: the C proxy that `make bench`
measures next to Airlock's gateway (issue 20: "Airlock within 1 ms of nginx at concurrency 1, within 2x at 8 and
32"), configured to be as fair a comparison as nginx allows:

- An API-key check ("with API keys", as the issue's table): a ``map`` of the Authorization header allows only the
  benchmark's key; anything else gets 401 before the upstream is reached. The key is stripped before proxying, as
  the gateway strips it.
- Streaming relayed as it comes (``proxy_buffering off``) over keep-alive HTTP/1.1 connections to the engine
  (``upstream`` with ``keepalive``), as the gateway keeps a connection pool.
- Request bodies never touch the disk (FINDINGS: nginx spools a body larger than ``client_body_buffer_size`` to a
  temporary file unless request buffering is off): ``proxy_request_buffering off`` and a body buffer larger than any
  benchmark body.
- One worker process, as the gateway is one process (nginx's master only supervises it), pinned to the gateway's
  cores by the caller.
- No access log (it would hold IPs and paths); the error log, the pid file and every temporary path are in the run's
  work dir (deleted after the run unless ``--logs``); the workers run as the run's own user.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .stacks import running

# Debian's nginx is /usr/sbin/nginx, which is not on a non-root user's PATH.
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
READY_PATH = "/nginx-ready"
# Larger than any body the benchmarks send (a 448x448 JPEG chat is about 60 KB; the memory run's images are 1 MB).
BODY_BUFFER = "16m"
# Idle upstream connections are closed after 2 s, before uvicorn's own keep-alive ends (5 s; vLLM and the instant
# upstream serve with uvicorn), as the benchmark's client does (load.session): a request never goes out on a
# connection the engine is closing.
UPSTREAM_IDLE = "2s"


def nginx_config(work: Path, port: int, upstream_socket: Path, authorization: str, connections: int = 1024) -> str:
    """The whole nginx.conf; ``authorization``: the one Authorization header value let through."""
    temp = {name: work / f"{name}_temp" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    # The user directive is honoured (and needed, or workers run as nobody) only when the master runs as root.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};" if os.geteuid() == 0 \
        else ""
    if not re.fullmatch(r"[\w.~+/=-]+ [\w.~+/=-]+", authorization):
        raise ValueError("an Authorization value is a scheme and a token (no quotes or spaces to escape)")
    return f"""{user}
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "nginx-error.log"} warn;  # warn: a body or answer spooled to a file is logged
events {{ worker_connections {connections * 2 + 64}; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    # A regular expression is matched case-sensitively (map's plain strings are not): the key exactly, or nothing.
    map $http_authorization $api_key_ok {{
        default 0;
        "~^{re.escape(authorization)}$" 1;
    }}
    upstream engine {{
        server unix:{upstream_socket};
        keepalive {connections};
        keepalive_timeout {UPSTREAM_IDLE};
        keepalive_requests 100000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 100000;
        client_max_body_size 64m;
        client_body_buffer_size {BODY_BUFFER};
        default_type application/json;
        location = {READY_PATH} {{ return 200 "ready\\n"; }}
        location / {{
            if ($api_key_ok = 0) {{
                return 401 '{{"error":{{"message":"invalid API key","type":"invalid_request_error"}}}}';
            }}
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 900s;
            proxy_send_timeout 900s;
        }}
    }}
}}
"""


@contextmanager
def nginx_proxy(work: Path, port: int, upstream_socket: Path, authorization: str,
                cpus: set[int] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """nginx on 127.0.0.1:``port`` in front of ``upstream_socket`` (on ``cpus`` only, if given), ready to serve;
    stopped with SIGTERM at the end."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "nginx.conf"
    config.touch(mode=0o600)  # it holds the benchmark's API key
    config.write_text(nginx_config(work, port, upstream_socket, authorization))
    # -e: the error log before the config is read (else Debian's /var/log/nginx); -g: in the foreground.
    argv = [NGINX, "-p", str(work), "-c", str(config), "-e", str(work / "nginx-error.log"), "-g", "daemon off;"]
    with running(argv, work / "nginx.log", f"http://127.0.0.1:{port}{READY_PATH}", timeout_s=30,
                 cpus=cpus) as process:
        yield process
