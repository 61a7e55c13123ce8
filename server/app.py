"""The gateway application. ``create_app`` lists the request path in the order every request takes it."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .admission import Admission
from .auth import ModelAccess, Principal, RuleCoverage, build_authentication
from .config import Settings
from .console import CONSOLE_HEADER, console_router
from .errors import (
    NO_STORE,
    AirlockError,
    BodyTooLarge,
    EngineUnavailable,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    PermissionDenied,
    RouteNotFound,
    Unauthenticated,
    error_response,
)
from .hsts import with_hsts
from .metrics import UNKNOWN_MODEL, GatewayMetrics
from .metrics_endpoint import MetricsEndpoint, metrics_app
from .metrics_middleware import MetricsMiddleware, request_record
from .payload import parse_request
from .posture import privacy_posture
from .proxy import EngineExchange, EngineRequest
from .routing import build_strategy
from .screening import Route, Screening
from .sessions import CSRF_HEADER, SESSION_COOKIE, SessionStore, csrf_matches
from .tenancy import TenantSalts
from .tls import CertificateReloader
from .upstream import ReplicaPool
from .usage import ask_for_usage

SCREEN_INLINE_BYTES = 256 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ENGINE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
# A bug in Airlock: a 500 that reveals nothing (uvicorn still logs the traceback, which holds no content).
UNEXPECTED = AirlockError("internal error in the gateway")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` (before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
    return b"".join(chunks)  # one copy (a growing bytearray and bytes() of it made several)


@dataclass(frozen=True)
class Gateway:
    """The API, and the app of the separate metrics listener when ``metrics.listener`` is ``separate``."""

    api: ASGIApp
    metrics: Starlette | None


class EngineRoutes:
    """POST /v1/chat/completions and /v1/completions as a plain ASGI app in front of FastAPI, which gets every
    other request. The requests that carry the load skip FastAPI's routing, dependency injection and exception
    layers: under `make bench` (py-spy) these cost about as much CPU as the rest of the gateway's own work, per
    request and again per streamed chunk (each layer wraps ``send``)."""

    def __init__(self, api: ASGIApp, prepare: Callable[[Request], Awaitable[EngineExchange]],
                 refuse: Callable[[Request, AirlockError], Response]) -> None:
        self.api = api
        self.prepare = prepare
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ENGINE_ROUTES:
            await self.api(scope, receive, send)
            return
        request = Request(scope, receive)
        if scope["method"] != "POST":
            refusal = MethodNotAllowed("method not allowed on this endpoint", headers={"allow": "POST"})
            await self.refuse(request, refusal)(scope, receive, send)
            return
        try:
            exchange = await self.prepare(request)
        except AirlockError as error:
            await self.refuse(request, error)(scope, receive, send)
            return
        except Exception:
            await UNEXPECTED.to_response()(scope, receive, send)
            raise  # for uvicorn's log, as FastAPI's own handler does
        try:
            await exchange(scope, receive, send)
        except Exception:
            if not exchange.status_code:  # nothing sent yet
                await UNEXPECTED.to_response()(scope, receive, send)
            raise


def create_app(config: Settings, upstream_urls: Sequence[str]) -> ASGIApp:
    return create_gateway(config, upstream_urls).api


def create_gateway(config: Settings, upstream_urls: Sequence[str],
                   listener_certificate: CertificateReloader | None = None) -> Gateway:
    """Build the gateway for the engines at ``upstream_urls``; ``listener_certificate``: its TLS listener's, whose
    expiry the metrics show."""
    settings = config.gateway
    pool = ReplicaPool(upstream_urls, settings, build_strategy(config.routing),
                       config.admission.max_in_flight_per_replica, config.upstream_tls)
    admission = Admission(config.admission, pool.capacity, config.screening.max_tokens_limit)
    pool.on_change.append(admission.capacity_changed)
    metrics = GatewayMetrics(config.metrics.active_users_window_s)
    metrics.watch(pool, admission, listener_certificate)
    authentication = build_authentication(config.auth)
    access = ModelAccess(config.authorization)
    # Rules that name no served model are logged (and shown in the posture) when the served models are learnt.
    coverage = RuleCoverage(access)
    pool.on_change.append(lambda: coverage.served_models(pool.served_models))
    screening = Screening(config.screening, TenantSalts(config.privacy))
    sessions = SessionStore(config.console.session_idle_s, config.console.session_max_s, config.console.max_sessions)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        # The provider's keys are fetched in the background: an IdP that is down must not hold up the start.
        keys = authentication.provider_keys
        fetch = asyncio.create_task(keys.refresh()) if keys else None
        interval = config.metrics.rejections_log_interval_s
        summaries = asyncio.create_task(metrics.log_refusals(interval)) if interval else None
        try:
            yield
        finally:
            for task in (fetch, summaries):
                if task is not None:
                    task.cancel()
            await pool.close()

    app = FastAPI(
        title="Airlock",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    async def authenticate(request: Request) -> Principal:
        authorization = request.headers.get("authorization")
        session = None if authorization else sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            # The console's session cookie; anything but a read must also carry the page's CSRF token.
            if request.method not in SAFE_METHODS and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
                raise Unauthenticated("the console's request lacks its token; reload the page")
            principal = session.principal
        else:
            source = request.client.host if request.client else "unknown"
            principal = await authentication.authenticate(authorization, source)
        metrics.active_users.saw(principal.key)
        return principal

    CurrentPrincipal = Annotated[Principal, Depends(authenticate)]

    async def engine_request(request: Request, principal: CurrentPrincipal) -> EngineRequest:
        # 1. who (before a byte of the body is read) -> 2. bounded body -> 3. parse -> 4. may they use the model
        # -> 5. a replica serving it -> 6. screen (fields, images, salt) -> then, in EngineExchange: 7. the user's
        # limits and the model's fair queue -> 8. a replica (routing) -> 9. forward, with one retry elsewhere.
        body = await read_body(request, settings.max_body_bytes)
        payload = parse_request(body, config.screening.max_json_depth)
        model = payload["model"]
        record = request_record(request)
        if record is not None:
            # Only a name an engine serves becomes a label; anything else a client typed is "unknown".
            record.model = model if pool.knows(model) else UNKNOWN_MODEL
            record.stream = payload.get("stream") is True
        shown = model if len(model) <= 100 else model[:100] + "..."
        if not access.allows(principal, model):
            if access.hide_denied:
                raise ModelNotFound(f"the model '{shown}' does not exist", param="model")
            raise PermissionDenied(f"you are not allowed to use the model '{shown}'", param="model",
                                   code="model_not_allowed")
        if not pool.can_serve(model):
            if not pool.any_healthy:
                raise EngineUnavailable(
                    "the model engines are not ready yet; try again shortly",
                    headers={"retry-after": str(settings.retry_after_s)},
                )
            if not pool.knows(model):
                raise ModelNotFound(f"the model '{shown}' does not exist", param="model")
        route: Route = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        # Token counts for the metrics: a stream is asked to end with them (removed again if the client did not ask).
        remove_usage = ask_for_usage(payload)
        if len(body) < SCREEN_INLINE_BYTES:
            screened = screening.screen(route, payload, principal)
        else:  # decoding and checking megabytes of images would stall every other request
            screened = await anyio.to_thread.run_sync(screening.screen, route, payload, principal)
        cost = admission.estimate_cost(payload, screened.image_pixels)
        return EngineRequest(screened.body, model, principal, screened.cache_salt, cost, remove_usage)

    def exchange(request: Request, forwarded: EngineRequest) -> EngineExchange:
        record = request_record(request)
        assert record is not None, "API routes are under /v1/, where every request has a record"
        return EngineExchange(pool, admission, request.url.path, forwarded, settings.retry_after_s, metrics, record)

    async def prepare(request: Request) -> EngineExchange:
        """Steps 1 to 6 for the engine routes (served by ``EngineRoutes``, not FastAPI)."""
        return exchange(request, await engine_request(request, await authenticate(request)))

    @app.get("/v1/models")
    async def models(principal: CurrentPrincipal) -> Response:
        cards = [card for card in pool.model_cards() if access.allows(principal, str(card["id"]))]
        return JSONResponse({"object": "list", "data": cards}, headers=NO_STORE)

    @app.get("/v1/airlock/privacy")
    async def privacy(_: CurrentPrincipal) -> Response:
        return JSONResponse(privacy_posture(config, upstream_urls, coverage), headers=NO_STORE)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    @app.get("/readyz")
    async def readyz() -> Response:
        if pool.ready:
            return JSONResponse({"status": "ready"}, headers=NO_STORE)
        return JSONResponse({"status": "starting"}, status_code=503, headers=NO_STORE)

    if config.metrics.listener == "main":
        endpoint = metrics_endpoint(config, metrics, pool)
        allowed_groups = frozenset(config.metrics.groups)

        @app.get("/metrics")
        async def metrics_route(principal: CurrentPrincipal) -> Response:
            if allowed_groups and not allowed_groups & principal.groups:
                raise PermissionDenied("the metrics are for operators", code="metrics_not_allowed")
            return Response(await endpoint.render(), media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)

    if config.console.enabled:
        app.include_router(console_router(config, authentication, sessions))

    refuse = install_error_handlers(app, metrics)
    # Every API request, FastAPI's or not, is observed by the metrics.
    api: ASGIApp = MetricsMiddleware(EngineRoutes(app, prepare, refuse), metrics=metrics)
    if settings.tls.enabled or settings.tls_terminated_by_proxy:
        # Every answer that travelled over TLS (here or at the trusted proxy) tells browsers to keep to https.
        api = with_hsts(api, settings.tls.hsts_max_age_s)
    separate = config.metrics.listener == "separate"
    return Gateway(api, metrics_app(metrics_endpoint(config, metrics, pool)) if separate else None)


def metrics_endpoint(config: Settings, metrics: GatewayMetrics, pool: ReplicaPool) -> MetricsEndpoint:
    return MetricsEndpoint(metrics, pool if config.metrics.include_engines else None, config.metrics.engine_timeout_s)


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> Callable[[Request, AirlockError], Response]:
    """Every error leaves in OpenAI shape; refusals are counted by reason. Returns the answer to an Airlock error,
    for the routes served outside FastAPI."""

    def refuse(error: AirlockError) -> Response:
        metrics.rejected(error)
        return error.to_response()

    def refuse_request(request: Request, exc: AirlockError) -> Response:
        if request.headers.get(CONSOLE_HEADER) and "www-authenticate" in exc.headers:
            # The console signs in with its own form: a challenge would make the browser pop up its password box.
            exc.headers = {name: value for name, value in exc.headers.items() if name != "www-authenticate"}
        return refuse(exc)

    async def airlock_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AirlockError)
        return refuse_request(request, exc)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return refuse(RouteNotFound("no such endpoint"))
        if exc.status_code == 405:
            return refuse(MethodNotAllowed("method not allowed on this endpoint"))
        return error_response(exc.status_code, "request refused", "invalid_request_error", None)

    async def validation_error(_: Request, exc: Exception) -> Response:
        return refuse(InvalidRequest("the request is not valid"))

    async def unexpected_error(_: Request, exc: Exception) -> Response:
        return UNEXPECTED.to_response()

    app.add_exception_handler(Exception, unexpected_error)
    app.add_exception_handler(AirlockError, airlock_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return refuse_request
