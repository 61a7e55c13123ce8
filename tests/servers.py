"""Real servers the tests start: uvicorn in a thread, and the OpenID provider as a process."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import httpx
import uvicorn

REDIRECT_URI = "http://127.0.0.1/callback"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThreadedServer:
    """A real uvicorn server in a background thread."""

    def __init__(self, app: object, **where: object) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on", **where))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class OidcProvider:
    """A real OpenID provider process (PyPI ``oidc-provider-mock``) on loopback.

    It signs ID tokens (JWTs) with a key it makes at start; a restart on the same port is a key rotation. Its
    ``iss`` is the URL it was reached at, so asking it through ``localhost`` gives tokens of another issuer.
    """

    def __init__(self, port: int | None = None, token_max_age_s: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        # Lifetime of the ID tokens it issues (the provider's default: an hour).
        self._lifetime = ["--token-max-age", str(token_max_age_s)] if token_max_age_s else []

    def start(self) -> OidcProvider:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "oidc_provider_mock", "--port", str(self.port), *self._lifetime],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, "the OIDC provider exited"
            try:
                if httpx.get(f"{self.url}/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the OIDC provider did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def restart(self) -> None:
        """A new signing key (the provider keeps it in memory only)."""
        self.stop()
        self.start()

    def jwks(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/jwks").json())

    def token(self, sub: str, claims: dict[str, Any] | None = None, client_id: str = "airlock",
              host: str = "127.0.0.1") -> str:
        """An ID token for ``sub``, from the provider's own authorization code flow."""
        base = f"http://{host}:{self.port}"
        assert httpx.put(f"{base}/users/{quote(sub)}", json=claims or {}).status_code == 204
        params = {"client_id": client_id, "redirect_uri": REDIRECT_URI, "response_type": "code",
                  "scope": "openid profile"}
        authorized = httpx.post(f"{base}/oauth2/authorize", params=params, data={"sub": sub})
        code = parse_qs(urlparse(authorized.headers["location"]).query)["code"][0]
        issued = httpx.post(f"{base}/oauth2/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "client_id": client_id, "client_secret": "unused",
        })
        issued.raise_for_status()
        return str(issued.json()["id_token"])


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, claims and signature of a JWT, unverified: for building forged variants."""
    header, payload, signature = token.split(".")
    return _b64json(header), _b64json(payload), signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(part: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@contextmanager
def gateway_in_front_of(engine_socket: Path, upstreams_extra: Sequence[str] = (), **settings: Any) -> Iterator[str]:
    """A real gateway (in a thread) with its own settings, in front of an existing engine (and any
    ``upstreams_extra``); yields its base URL."""
    from server.app import create_app
    from server.config import load_settings

    port = free_port()
    loaded = load_settings(gateway={"port": port, "health_interval_s": 0.5}, **settings)
    app = create_app(loaded, [f"unix:{engine_socket}", *upstreams_extra])
    with ThreadedServer(app, host="127.0.0.1", port=port):
        yield wait_until_ready(f"http://127.0.0.1:{port}")


def wait_until_ready(base_url: str, seconds: float = 30) -> str:
    """``base_url`` once the gateway there has a healthy engine."""
    deadline = time.monotonic() + seconds
    while httpx.get(f"{base_url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not see the engine"
        time.sleep(0.1)
    return base_url
