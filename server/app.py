"""The gateway application: ``create_gateway`` builds its parts and stacks them in the order every request meets
them; the engine routes' own steps are listed in ``request_path``."""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import Admission
from .auth import ModelAccess, Principal, RuleCoverage, build_authentication
from .boundary import UNEXPECTED, ErrorBoundary, refusal
from .callers import Callers
from .config import Settings, is_loopback_host
from .console import console_router
from .documents import Documents
from .engine_limits import EngineLimits
from .errors import (
    NO_STORE,
    AirlockError,
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    PermissionDenied,
    RouteNotFound,
)
from .foreign_origins import ForeignOriginGuard
from .hsts import with_hsts
from .metrics import GatewayMetrics
from .metrics_endpoint import MetricsEndpoint, metrics_app
from .metrics_middleware import MetricsMiddleware
from .posture import privacy_posture
from .proxy import Forwarder
from .render_pool import RenderPool
from .request_path import EngineRoutes, cancelled_when_client_leaves
from .routing import build_strategy
from .screening import Screening
from .sessions import SessionStore
from .shared_limits import SharedLimitsClient
from .tenancy import TenantSalts
from .tls import CertificateReloader
from .upstream import ReplicaPool


class HeadAsGet:
    """HEAD is answered wherever GET is (RFC 9110 9.3.2: GET's status and header fields, no content), for monitors
    and probes. FastAPI's routes accept only the methods they declare, so the request is routed as GET in a copy of
    the scope; the server (uvicorn, from its own scope) sends no body for HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class BoundedBody:
    """``gateway.max_body_bytes`` for FastAPI's routes too (the console's sign-in form, say): a larger body is refused
    from its Content-Length, or as soon as it passes the limit, before anything reads it all."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, bounded_receive, send)


@dataclass(frozen=True)
class Gateway:
    """The API, the app of the separate metrics listener when ``metrics.listener`` is ``separate``, and a count of the
    API's requests started and finished so far (the heap trimmer's sign of activity: ``runtime.HeapTrimmer``)."""

    api: ASGIApp
    metrics: ASGIApp | None
    activity: Callable[[], int]


def create_app(config: Settings, upstream_urls: Sequence[str]) -> ASGIApp:
    return create_gateway(config, upstream_urls).api


def create_gateway(config: Settings, upstream_urls: Sequence[str],
                   listener_certificate: CertificateReloader | None = None, *,
                   engine_limits: EngineLimits | None = None) -> Gateway:
    """Build the gateway for the engines at ``upstream_urls``; ``listener_certificate``: its TLS listener's, whose
    expiry the metrics show; ``engine_limits``: the engines' image budget and max_num_seqs as the engine plan chose
    them (default: from ``config.engine``, for a gateway in front of engines it did not start).

    Every API request goes, outermost first: ``MetricsMiddleware`` (a ``RequestRecord``, observed at the end) ->
    HSTS (over TLS) -> ``ErrorBoundary`` (renders every error) -> ``EngineRoutes`` (the engine routes, step
    by step: see ``request_path``) -> ``HeadAsGet`` -> FastAPI (models, privacy, probes, metrics, console).
    """
    settings = config.gateway
    engine_limits = engine_limits or EngineLimits.from_settings(config.engine)
    pool = ReplicaPool(upstream_urls, settings, build_strategy(config.routing),
                       config.admission.max_in_flight_per_replica, config.upstream_tls,
                       expected_tokens_per_request=(engine_limits.expected_tokens_per_request
                                                    or config.admission.expected_tokens_per_request),
                       max_num_seqs=engine_limits.max_num_seqs,
                       gateway_replicas=config.admission.gateway_replicas)
    shared_limits = SharedLimitsClient.for_gateway(config)
    admission = Admission(config.admission, pool.capacity, config.screening.max_tokens_limit, engine_limits,
                          pool.context_of, shared_limits)
    pool.on_change.append(admission.capacity_changed)
    metrics = GatewayMetrics(config.metrics.active_users_window_s)
    metrics.watch(pool, admission, listener_certificate)
    authentication = build_authentication(config.auth)
    access = ModelAccess(config.authorization)
    # Rules that name no served model are logged (and shown in the posture) when the served models are learnt.
    coverage = RuleCoverage(access)
    pool.on_change.append(lambda: coverage.served_models(pool.served_models))
    screening = Screening(config.screening, TenantSalts(config.privacy),
                          engine_limits.images_per_request(config.screening.max_images_per_request))
    # Documents are rendered by single-use worker processes (server/render_pool.py), pre-started when enabled.
    render_pool = RenderPool(config.documents)
    documents = Documents(config.documents, config.screening, engine_limits, render_pool, pool.context_of, metrics,
                          config.admission.image_pixels_per_token)
    sessions = SessionStore(config.console.session_idle_s, config.console.session_max_s, config.console.max_sessions)
    callers = Callers(authentication, sessions, metrics.active_users)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        if shared_limits is not None:
            await shared_limits.start()
        if config.documents.enabled:
            await render_pool.start()
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
            await render_pool.close()
            await pool.close()
            if shared_limits is not None:
                await shared_limits.close()

    # No redirects for a trailing slash: FastAPI builds their Location from the client's Host header.
    app = FastAPI(title="Airlock", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    CurrentPrincipal = Annotated[Principal, Depends(callers.identify)]

    def visible_cards(principal: Principal) -> list[dict[str, Any]]:
        return [card for card in pool.model_cards() if access.allows(principal, str(card["id"]))]

    @app.get("/v1/models")
    async def models(principal: CurrentPrincipal) -> Response:
        return JSONResponse({"object": "list", "data": visible_cards(principal)}, headers=NO_STORE)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, principal: CurrentPrincipal) -> Response:
        """One card of the list; a model hidden from or denied to the caller is as absent as an unknown one."""
        if not model_id:
            raise RouteNotFound("no such endpoint")
        for card in visible_cards(principal):
            if card["id"] == model_id:
                return JSONResponse(card, headers=NO_STORE)
        shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
        raise ModelNotFound(f"the model '{shown}' does not exist", param="model")

    @app.get("/v1/airlock/privacy")
    async def privacy(_: CurrentPrincipal) -> Response:
        return JSONResponse(privacy_posture(config, upstream_urls, coverage, engine_limits), headers=NO_STORE)

    @app.post("/v1/airlock/documents/preview")
    async def document_preview(request: Request, principal: CurrentPrincipal) -> Response:
        """The console's page thumbnails of a document (``Documents.preview``), counted in the user's own limits
        as a request is: the render workers are shared by everyone. A client that leaves stops the render."""
        async with admission.user_limits(principal):
            body = await request.body()
            async with cancelled_when_client_leaves(request.receive):
                return JSONResponse(await documents.preview(body), headers=NO_STORE)
            return Response(status_code=499)  # the client has gone: nobody reads this (nginx's "client closed")

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
        app.include_router(console_router(config, authentication, sessions, engine_limits,
                                          serving=lambda: bool(pool.model_cards())))

    install_error_handlers(app, metrics)
    forwarder = Forwarder(pool, metrics, settings.retry_after_s)
    other_routes = HeadAsGet(BoundedBody(app, settings.max_body_bytes))
    engine_routes = EngineRoutes(other_routes, config, callers, admission, access, pool, documents, screening,
                                 forwarder)
    # Inside the error boundary, which answers its refusals; with no sign-in (loopback only), this computer's names.
    guarded = ForeignOriginGuard(engine_routes, bind_host=settings.host,
                                 local_names_only=not config.auth.configured and is_loopback_host(settings.host))
    api: ASGIApp = ErrorBoundary(guarded, metrics)
    if settings.tls.enabled or settings.tls_terminated_by_proxy:
        # Every answer that travelled over TLS (here or at the trusted proxy) tells browsers to keep to https.
        api = with_hsts(api, settings.tls.hsts_max_age_s)
    # Outermost: it hands the server's own send to the engine routes' streamed chunks (server_send).
    api = MetricsMiddleware(api, metrics=metrics)
    separate = config.metrics.listener == "separate"
    return Gateway(api, metrics_app(metrics_endpoint(config, metrics, pool), config.metrics.host) if separate else None,
                   lambda: metrics.requests_started + metrics.requests_finished)


def metrics_endpoint(config: Settings, metrics: GatewayMetrics, pool: ReplicaPool) -> MetricsEndpoint:
    engines = pool.replicas if config.metrics.engine_series else []
    return MetricsEndpoint(metrics.registry, engines, config.metrics.engine_timeout_s)


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    """FastAPI catches its routes' errors before ``ErrorBoundary`` sees them: hand each to the boundary's renderer,
    so they leave in OpenAI's shape and refusals are counted as everywhere else."""

    async def airlock_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AirlockError)
        return refusal(exc, request.scope, metrics)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        methods = {name.lower(): value for name, value in (exc.headers or {}).items()}.get("allow", "")
        if "GET" in methods.split(", "):
            methods += ", HEAD"  # answered wherever GET is (HeadAsGet)
        allow = {"allow": methods} if methods else None
        error = {404: RouteNotFound("no such endpoint"),
                 405: MethodNotAllowed("method not allowed on this endpoint", headers=allow)}
        return refusal(error.get(exc.status_code, InvalidRequest("request refused")), request.scope, metrics)

    async def validation_error(request: Request, exc: Exception) -> Response:
        return refusal(InvalidRequest("the request is not valid"), request.scope, metrics)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return refusal(UNEXPECTED, request.scope, metrics)

    app.add_exception_handler(Exception, unexpected_error)
    app.add_exception_handler(AirlockError, airlock_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
