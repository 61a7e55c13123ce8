"""The browser console: a self-contained page served by the gateway, and how a browser signs in.

The page (``console_static/``) loads nothing from anywhere but the gateway, under a strict Content-Security-Policy.
Sign-in makes an in-memory session (``sessions.py``) whose cookie the page then uses against the same ``/v1`` API
as every SDK client, screening, limits and metrics included:

- Basic users type their name and password into the page's form; it is checked like a Basic header (same htpasswd,
  same throttling of failures).
- OIDC users go through the provider with the authorization code flow and PKCE (authlib); the ID token that comes
  back is checked like a bearer token (issuer, audience, signature, expiry) plus its nonce, then dropped: the session
  keeps who signed in and the token's ``exp`` (it ends then at the latest), never a token.

A Basic session stays tied to the user's htpasswd entry: removing the user or changing the password ends it within
about a second (``auth/standing.py``). API keys open no session: they are for programs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import httpx
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from joserfc import jws
from pydantic import BaseModel, Field

from .auth import Authentication, Principal, Standing
from .config import ConsoleSettings, Settings
from .engine_limits import EngineLimits
from .errors import NO_STORE, InvalidRequest, RouteNotFound, Unauthenticated
from .sessions import CSRF_HEADER, SESSION_COOKIE, SessionStore, csrf_matches

LOGIN_COOKIE = "airlock_login"
# Sent by the console's own requests: their 401s carry no challenge (no browser password box).
CONSOLE_HEADER = "x-airlock-console"
LOGIN_TTL_S = 600
MAX_PENDING_LOGINS = 1000
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Nothing but the gateway itself: no CDN, no inline script or style, no frames, no plugins.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    **NO_STORE,
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "cross-origin-opener-policy": "same-origin",
}
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}
# The markdown renderer and HTML sanitizer, as they came from their packages (console_static/vendor/manifest.json:
# versions, integrity, sha256; `make vendor-console` fetches and checks them again).
VENDOR = "vendor"


def _static(name: str) -> bytes:
    return resources.files("server").joinpath("console_static", name).read_bytes()


def vendored_scripts() -> frozenset[str]:
    """The scripts the manifest lists (their licence files ship beside them in the package, unserved)."""
    manifest = json.loads(_static(f"{VENDOR}/manifest.json"))
    return frozenset(entry["file"] for package in manifest["packages"] for entry in package["files"]
                     if entry["file"].endswith(".js"))


class PasswordSignIn(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


@dataclass
class _PendingLogin:
    verifier: str
    nonce: str
    redirect_uri: str
    created: float


class OidcSignIn:
    """The authorization code flow with PKCE against the provider that issues the tokens Airlock accepts."""

    def __init__(self, config: Settings) -> None:
        oidc, console = config.auth.oidc, config.console
        self._issuer = str(oidc.issuer).rstrip("/")
        self._client_id = console.oidc_client_id or str(oidc.audience)
        secret_file = console.oidc_client_secret_file
        self._client_secret = secret_file.read_text().strip() if secret_file else None
        self._scopes = " ".join(console.oidc_scopes)
        self._verify: str | bool = str(oidc.ca_file) if oidc.ca_file else True
        self._timeout = oidc.http_timeout_s
        self._metadata: dict[str, Any] | None = None
        self._pending: dict[str, _PendingLogin] = {}
        self._lock = asyncio.Lock()

    def _client(self, redirect_uri: str) -> AsyncOAuth2Client:
        # trust_env=False: no proxy from the environment; the provider is reached directly or not at all.
        return AsyncOAuth2Client(
            client_id=self._client_id, client_secret=self._client_secret, scope=self._scopes,
            redirect_uri=redirect_uri, code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic" if self._client_secret else "none",
            trust_env=False, verify=self._verify, timeout=self._timeout,
        )

    async def _endpoints(self) -> dict[str, Any]:
        async with self._lock:
            if self._metadata is None:
                async with httpx.AsyncClient(timeout=self._timeout, verify=self._verify, trust_env=False) as http:
                    answer = await http.get(self._issuer + DISCOVERY_PATH)
                    answer.raise_for_status()
                    metadata = answer.json()
                if str(metadata.get("issuer", "")).rstrip("/") != self._issuer:
                    raise ValueError("the discovery document names another issuer")
                self._metadata = metadata
            return self._metadata

    async def start(self, redirect_uri: str) -> tuple[str, str]:
        """The provider's authorization URL to send the browser to, and the state that ties the answer to it."""
        endpoints = await self._endpoints()
        verifier, nonce = generate_token(64), generate_token(32)
        async with self._client(redirect_uri) as client:
            url, state = client.create_authorization_url(endpoints["authorization_endpoint"],
                                                         code_verifier=verifier, nonce=nonce)
        now = time.monotonic()
        self._pending = {key: login for key, login in self._pending.items() if now - login.created < LOGIN_TTL_S}
        if len(self._pending) >= MAX_PENDING_LOGINS:
            self._pending.pop(next(iter(self._pending)))
        self._pending[state] = _PendingLogin(verifier, nonce, redirect_uri, now)
        return str(url), str(state)

    async def finish(self, state: str, code: str) -> tuple[str, str]:
        """The ID token for ``code`` and the nonce it must carry (the pending login is used up either way)."""
        pending = self._pending.pop(state, None)
        if pending is None or time.monotonic() - pending.created > LOGIN_TTL_S:
            raise Unauthenticated("this sign-in has expired; start again")
        endpoints = await self._endpoints()
        async with self._client(pending.redirect_uri) as client:
            token = await client.fetch_token(endpoints["token_endpoint"], code=code, code_verifier=pending.verifier)
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise Unauthenticated("the identity provider sent no ID token")
        return id_token, pending.nonce


def _nonce_of(id_token: str) -> str | None:
    """The nonce claim of a token whose signature was already checked."""
    try:
        claims = json.loads(jws.extract_compact(id_token.encode()).payload)
    except (ValueError, TypeError):
        return None
    nonce = claims.get("nonce") if isinstance(claims, dict) else None
    return nonce if isinstance(nonce, str) else None


def _base_url(request: Request, console: ConsoleSettings) -> str:
    return (console.public_url or str(request.base_url)).rstrip("/")


def _secure(request: Request, console: ConsoleSettings) -> bool:
    if console.secure_cookies != "auto":
        return console.secure_cookies == "always"
    return _base_url(request, console).startswith("https://")


def console_router(config: Settings, authentication: Authentication, sessions: SessionStore,
                   engine_limits: EngineLimits, serving: Callable[[], bool]) -> APIRouter:
    """``serving``: whether the gateway serves any model right now (to anyone), so that the page can tell "no model
    is ready yet" from "you may use none of them" without learning the names of models the user may not use."""
    console = config.console
    scripts = vendored_scripts()
    router = APIRouter(include_in_schema=False)
    oidc = OidcSignIn(config) if config.auth.oidc.enabled else None
    methods = {"password": config.auth.htpasswd_file is not None, "oidc": oidc is not None,
               "required": config.auth.configured}

    def source(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def signed_in(request: Request, principal: Principal, standing: Standing) -> JSONResponse:
        cookie, session = sessions.open(principal, standing)
        response = JSONResponse({"signed_in": True, "name": principal.display_name or principal.user_id,
                                 "csrf": session.csrf}, headers=NO_STORE)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=sessions.lifetime_s(session), httponly=True,
                            samesite="lax", secure=_secure(request, console), path="/")
        return response

    @router.get("/")
    async def page() -> Response:
        return Response(_static("index.html"), media_type=STATIC["index.html"], headers=PAGE_HEADERS)

    @router.get("/console/app.js")
    async def script() -> Response:
        return Response(_static("app.js"), media_type=STATIC["app.js"], headers=PAGE_HEADERS)

    @router.get("/console/app.css")
    async def style() -> Response:
        return Response(_static("app.css"), media_type=STATIC["app.css"], headers=PAGE_HEADERS)

    @router.get("/console/vendor/{name}")
    async def vendored(name: str) -> Response:
        if name not in scripts:
            raise RouteNotFound("no such endpoint")
        return Response(_static(f"{VENDOR}/{name}"), media_type=STATIC["app.js"], headers=PAGE_HEADERS)

    @router.get("/console/api/session")
    async def current(request: Request) -> Response:
        """Who is signed in (or whether anyone needs to), and the limits the page scales images and caps a chosen
        answer length to (the page sends no max_tokens for "as long as the model allows"). Images are scaled to
        the engines' budget at most: the engine would scale them down to it anyway, so larger ones are bytes sent
        for nothing. Documents: the pages one request may send (documents.max_pages, and no more than the images
        it may carry: pages count as images) and the bytes of one document."""
        max_images = engine_limits.images_per_request(config.screening.max_images_per_request)
        limits = {"max_images": max_images,
                  "max_image_pixels": min(config.screening.max_image_pixels, console.image_max_pixels,
                                          engine_limits.max_pixels),
                  "max_tokens": config.screening.max_tokens_limit,
                  "documents": {"enabled": config.documents.enabled,
                                "max_pages": min(config.documents.max_pages, max_images),
                                "max_bytes": config.documents.max_bytes}}
        body: dict[str, Any] = {"methods": methods, "limits": limits, "signed_in": False}
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            principal = session.principal
            body.update(signed_in=True, name=principal.display_name or principal.user_id, csrf=session.csrf)
        elif not config.auth.configured:
            body.update(signed_in=True, name="this computer", csrf="")
        if body["signed_in"]:
            # demo: the engine plan serves the random-weight demo model (its answers are noise: the page says so).
            body.update(demo=engine_limits.demo, serving=serving())
        return JSONResponse(body, headers=NO_STORE)

    @router.post("/console/api/sign-in")
    async def password_sign_in(request: Request, form: PasswordSignIn) -> Response:
        if not methods["password"]:
            raise InvalidRequest("sign-in with a password is not configured here", code="method_not_configured")
        basic = base64.b64encode(f"{form.username}:{form.password}".encode()).decode()
        principal, standing = await authentication.sign_in(f"Basic {basic}", source(request))
        return signed_in(request, principal, standing)

    @router.post("/console/api/sign-out")
    async def sign_out(request: Request) -> Response:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = sessions.get(cookie)
        if session is not None and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
            raise Unauthenticated("sign-out needs the page's token")
        sessions.close(cookie)
        response = JSONResponse({"signed_in": False}, headers=NO_STORE)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                               secure=_secure(request, console))
        return response

    @router.get("/console/sign-in/oidc")
    async def oidc_start(request: Request) -> Response:
        if oidc is None:
            raise InvalidRequest("sign-in with the identity provider is not configured here",
                                 code="method_not_configured")
        url, state = await oidc.start(f"{_base_url(request, console)}/console/callback")
        response = RedirectResponse(url, status_code=303, headers=NO_STORE)
        # Ties the provider's answer to this browser: a code injected into someone else's browser is refused.
        response.set_cookie(LOGIN_COOKIE, state, max_age=LOGIN_TTL_S, httponly=True, samesite="lax",
                            secure=_secure(request, console), path="/console/callback")
        return response

    @router.get("/console/callback")
    async def oidc_callback(request: Request, state: str = "", code: str = "") -> Response:
        if oidc is None:
            raise InvalidRequest("sign-in with the identity provider is not configured here",
                                 code="method_not_configured")
        expected = request.cookies.get(LOGIN_COOKIE)
        if not state or not code or expected is None or not secrets.compare_digest(state, expected):
            return RedirectResponse("/?signin=failed", status_code=303, headers=NO_STORE)
        try:
            id_token, nonce = await oidc.finish(state, code)
            principal, standing = await authentication.sign_in(f"Bearer {id_token}", source(request))
        except Exception:
            # says the sign-in failed and nothing more, as for a wrong password)
            return RedirectResponse("/?signin=failed", status_code=303, headers=NO_STORE)
        if _nonce_of(id_token) != nonce:
            return RedirectResponse("/?signin=failed", status_code=303, headers=NO_STORE)
        cookie, session = sessions.open(principal, standing)
        response = RedirectResponse("/", status_code=303, headers=NO_STORE)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=sessions.lifetime_s(session), httponly=True,
                            samesite="lax", secure=_secure(request, console), path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/console/callback")
        return response

    return router
