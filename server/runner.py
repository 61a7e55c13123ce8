"""Start Airlock: the engines (``airlock engine``), the gateway (``airlock gateway``), or both (``airlock up``)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from .app import Gateway, create_gateway
from .auth.watched import CredentialsFileError
from .config import ConfigError, Settings, is_loopback_host
from .engine import Device, ReplicaLaunch, build_replicas, replica_url, stream_interval
from .engine_limits import EngineLimits
from .engine_metrics import engine_metrics
from .gpus import Gpu, Run, discover_gpus, place_replicas
from .metrics_endpoint import metrics_app
from .privacy import harden_process
from .profiles import DEMO_PROFILE, ModelChoice, choose_model, load_profiles
from .runtime import settle_heap, trim_heap_when_quiet
from .sizing import EnginePlan, check_free_memory, plan_cpu, plan_engine
from .slow_clients import SlowClientGuard, guarded
from .supervisor import Supervisor
from .tls import (
    CertificateFiles,
    CertificateReloader,
    TlsFileError,
    from_systemd_credentials,
    names_host,
    reloading,
    server_context,
)

log = logging.getLogger("airlock")

DEMO_WARNING = """
================================================================================
 Airlock is serving the DEMO model: a tiny Qwen3-VL with RANDOM weights.
 Its answers are noise. It is here so that Airlock runs out of the box.
 Why: {reason}.
 To serve real Qwen3-VL: copy the weights (e.g. Qwen3-VL-8B-Instruct) into
 {models_dir}/<name>, or set engine.model to a local model directory.
 See README.md, "Serving real Qwen3-VL weights".
================================================================================"""


CLIENT_KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: Airlock's runner decides the shutdown order; and with TLS, a
    handshake bounded by the listener's ``header_timeout_s`` (``slow_clients``), not asyncio's 60 s: the head's
    deadline starts only once the handshake is done, and uvicorn passes no handshake timeout of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        http = self.config.http
        if isinstance(http, type) and issubclass(http, SlowClientGuard):
            _bound_tls_handshakes(asyncio.get_running_loop(), http.header_timeout_s)
        await super().startup(sockets)


def _bound_tls_handshakes(loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
    """Every TLS listener this loop creates from now on gives up a handshake after ``timeout_s`` unless told
    otherwise (uvicorn passes no ``ssl_handshake_timeout``). Once per loop, for good: the API and metrics listeners
    start at the same time, and a wrapper set and taken away around each start would undo the other's."""
    create_server = loop.create_server
    if getattr(create_server, "bounds_tls_handshakes", False):
        return

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", timeout_s)
        return create_server(*args, **kwargs)

    bounded.bounds_tls_handshakes = True  # type: ignore[attr-defined]
    loop.create_server = bounded  # type: ignore[method-assign]


@dataclass(frozen=True)
class GatewayTls:
    """The gateway listener's TLS context, and what keeps its certificate in step with the files on disk."""

    context: ssl.SSLContext
    reloader: CertificateReloader


def load_gateway_tls(settings: Settings) -> GatewayTls | None:
    """The listener's context from ``gateway.tls`` (None when TLS is off); an unusable file stops the start here,
    before any engine starts, with a message naming the file (never its contents)."""
    tls = settings.gateway.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    certificate = CertificateFiles(tls.cert_file, tls.key_file, tls.chain_file)
    try:
        context = server_context(certificate)
    except TlsFileError as exc:
        raise ConfigError(f"gateway.tls: {exc}") from exc
    return GatewayTls(context, CertificateReloader(certificate, [context]))


def check_engine_tls(settings: Settings, own_engines: bool) -> None:
    """Load ``engine.tls`` as vLLM will, before any engine starts: an unusable file is refused now, naming the
    setting, not after minutes of loading the model in engines that then restart forever. With ``own_engines``
    (``airlock up``), the certificate must also name the host the gateway reaches them at."""
    tls = settings.engine.tls
    if tls is None:
        return
    host = urlsplit(replica_url(settings.engine, Path(), 0)).hostname or ""
    try:
        server_context(CertificateFiles(tls.cert_file, tls.key_file), tls.client_ca_file)
        named = names_host(tls.cert_file, host)
    except TlsFileError as exc:
        raise ConfigError(f"engine.tls: {exc}") from exc
    if own_engines and not named:
        kind = "IP" if _is_address(host) else "DNS"
        raise ConfigError(
            f"engine.tls.cert_file ({tls.cert_file}) does not name {host}, the address `airlock up` reaches its "
            f"engines at (from engine.host): add {kind}:{host} to the certificate's subject alternative names, or "
            "the gateway refuses its own engines"
        )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _uvicorn_config(app: object, settings: Settings, tls: GatewayTls | None = None,
                    forwarded_from: list[str] | None = None) -> uvicorn.Config:
    """uvicorn's settings for a listener: TLS with our own context (its certificate is replaced in place on
    renewal, which uvicorn's file-based options could not do), and the proxy headers believed only from
    ``forwarded_from``."""
    context = tls.context if tls is not None else None
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        access_log=False,  # an access log would record who asked what, and from where
        # X-Forwarded-For / -Proto give the client address (failed-login throttle) and scheme (Secure cookies,
        # HSTS): believed only from the proxies named in gateway.trusted_proxies, never from anyone else.
        proxy_headers=bool(forwarded_from),
        forwarded_allow_ips=list(forwarded_from or []),
        ssl_context_factory=(lambda _config, _default: context) if context is not None else None,
        server_header=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=settings.gateway.shutdown_grace_s,
        # Longer than client connection pools keep idle connections (httpx, which the OpenAI SDK uses: 5 s), so a
        # client never reuses a connection the gateway is closing at that very moment.
        timeout_keep_alive=CLIENT_KEEP_ALIVE_S,
        # uvicorn has no deadline for a request's head or body: a client could hold connections forever.
        http=guarded(settings.gateway.header_timeout_s, settings.gateway.body_timeout_s),
    )


@dataclass(frozen=True)
class EnginesPlan:
    """What the launcher will start: the model, where, sized how, and each replica's command line."""

    choice: ModelChoice
    device: Device
    plan: EnginePlan
    # One group of GPUs per replica (None on CPU).
    gpu_groups: list[list[Gpu]] | None
    launches: list[ReplicaLaunch]


def plan_engines(settings: Settings, runtime_dir: Path, environ: Mapping[str, str] | None = None,
                 nvidia_smi: Run | None = None, cpu_count: int | None = None) -> EnginesPlan:
    """Decide the model, the device, its sizing and the replica command lines; nothing is started. Raises
    ConfigError (sizing.DoesNotFit among them) when no replica could start: said now, not by engines that fail
    and restart. ``environ`` is the engines' parent environment (default: this process's); ``nvidia_smi`` runs
    nvidia-smi (default: the real one)."""
    environ = os.environ if environ is None else environ
    engine = settings.engine
    profiles = load_profiles(engine.profiles_dir)
    gpus = discover_gpus(environ, nvidia_smi) if engine.device != "cpu" else []
    device: Device = ("gpu" if gpus else "cpu") if engine.device == "auto" else engine.device
    if device == "gpu" and not gpus:
        raise ConfigError("engine.device is 'gpu' but no GPU is usable here (nvidia-smi lists none, or "
                          "CUDA_VISIBLE_DEVICES hides them all)")
    groups = place_replicas(gpus, engine.replicas, engine.tensor_parallel_size) if device == "gpu" else None
    if groups is not None and len({gpu.compute_capability for group in groups for gpu in group}) > 1:
        # One plan (model, precision, dtype) for every replica: a card without bf16 or FP8 would refuse it.
        raise ConfigError("the GPUs Airlock would use are of different generations (compute capabilities): set "
                          "CUDA_VISIBLE_DEVICES to GPUs of one model")
    # Every replica serves the same model with the same settings: sized for the smallest group.
    weakest = min(groups, key=lambda group: min(gpu.total_mib for gpu in group)) if groups else []
    expected = settings.admission.expected_tokens_per_request
    choice = choose_model(engine, weakest, profiles, expected)
    if choice.is_demo:
        # The demo's processor and context are its own: an image budget meant for the real model does not apply.
        engine = engine.model_copy(update={"max_pixels": None, "min_pixels": None})
    if groups is None:
        plan = plan_cpu(choice.profile, engine, expected)
    else:
        plan = choice.plan or plan_engine(choice.profile, weakest, engine, expected)
        for group in groups:
            check_free_memory(group, plan.gpu_memory_utilization)
    launches = build_replicas(engine, choice, plan, runtime_dir, groups, environ, cpu_count,
                              default_max_tokens=settings.screening.max_tokens_limit)
    return EnginesPlan(choice, device, plan, groups, launches)


def check_model(choice: ModelChoice, settings: Settings) -> None:
    """Refuse weights that do not match their manifest (``engine.verify_model``), or whose manifest is not signed by
    ``engine.manifest_public_key`` when one is set, before anything loads them."""
    from .manifest import MANIFEST_NAME, ManifestError, verify_model
    from .signing import SignatureError, load_public_key

    mode, key_path = settings.engine.verify_model, settings.engine.manifest_public_key
    if choice.is_demo or mode == "off":
        return
    if not (choice.path / MANIFEST_NAME).exists():
        if mode == "require" or key_path is not None:
            setting = "verify_model is 'require'" if mode == "require" else "manifest_public_key is set"
            raise ConfigError(f"engine.{setting} and {choice.path} has no {MANIFEST_NAME} "
                              "(write one with `airlock bundle` where the model was fetched)")
        return
    log.info("checking the model's files against %s%s", MANIFEST_NAME, " and its signature" if key_path else "")
    try:
        public_key = load_public_key(key_path) if key_path is not None else None
    except SignatureError as exc:
        raise ConfigError(f"engine.manifest_public_key: {exc}") from exc
    try:
        result = verify_model(choice.path, public_key=public_key)
    except ManifestError as exc:
        raise ConfigError(f"engine.verify_model: {exc}") from exc
    except SignatureError as exc:
        raise ConfigError(f"the model at {choice.path} is not signed by engine.manifest_public_key ({exc}); "
                          "refusing to start it") from exc
    if not result.ok:
        raise ConfigError(f"the model at {choice.path} does not match its manifest ({result.summary()}); "
                          "refusing to start it")
    log.info("model files match the manifest (%d files)%s", result.checked, "; its signature verifies" if key_path
             else "")


def ensure_demo_model(choice: ModelChoice, python: str | None) -> None:
    """Build the demo model in a child process, so that torch never loads into the gateway's process."""
    from .demo_model import is_built

    if not choice.is_demo or is_built(choice.path):
        return
    log.info("building the demo model once (a few seconds)")
    subprocess.run(
        [python or sys.executable, "-m", "server.cli", "demo-model", str(choice.path)],
        check=True,
    )


@contextlib.contextmanager
def runtime_directory(settings: Settings) -> Iterator[Path]:
    """Where engine sockets live: a private (0700) directory, removed at exit unless configured."""
    if settings.engine.socket_dir is not None:
        settings.engine.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The engines trust whoever reaches their sockets: nobody but this user may.
        settings.engine.socket_dir.chmod(0o700)
        yield settings.engine.socket_dir
        return
    path = Path(tempfile.mkdtemp(prefix="airlock-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _announce(planned: EnginesPlan, settings: Settings) -> None:
    """One line on what runs where and why, from the plan (no address, no identity)."""
    choice, plan = planned.choice, planned.plan
    where = "cpu"
    if planned.gpu_groups is not None:
        names = sorted({gpu.name for group in planned.gpu_groups for gpu in group})
        where = f"gpu ({', '.join(names)})"
        if settings.engine.tensor_parallel_size > 1:
            where += f", tensor parallel {settings.engine.tensor_parallel_size}"
    tokens = stream_interval(settings.engine, plan, on_gpu=planned.gpu_groups is not None)
    log.info("model %s on %s, %d replica(s): %s; context %d tokens, %d sequences at once, images up to %d px "
             "(%d a request), streamed %s", choice.served_name, where, len(planned.launches), plan.reason,
             plan.max_model_len, plan.max_num_seqs, plan.max_pixels, plan.max_images_per_request,
             "token by token" if tokens == 1 else f"{tokens} tokens an event after the first")
    if choice.is_demo:
        print(DEMO_WARNING.format(reason=choice.reason, models_dir=settings.engine.models_dir),
              file=sys.stderr, flush=True)


class Signals:
    """SIGINT/SIGTERM for the whole run: the first asks for a clean stop; a second one only hurries it (the
    gateway stops waiting for open connections), so the engines are still stopped and nothing is orphaned."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.server: uvicorn.Server | None = None

    def _received(self) -> None:
        if self.stop.is_set() and self.server is not None:
            self.server.force_exit = True
        self.stop.set()

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received)
        return self

    def __exit__(self, *_: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    async def serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        """Run the gateway until a signal (or until it stops by itself)."""
        self.server = server
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def metrics_listener(gateway: Gateway, settings: Settings) -> AsyncIterator[None]:
    """The separate metrics listener, when configured: up with the gateway, down after it."""
    if gateway.metrics is None:
        yield
        return
    metrics = settings.metrics
    with listen(metrics.host, metrics.port, "metrics") as sock:
        server = _Server(_uvicorn_config(gateway.metrics, settings))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        # Plain HTTP on purpose: the series name nobody and carry no content or credential, and a scraper needs no
        # CA; off loopback, fence the port with a network policy (README, "Monitoring").
        log.info("metrics on http://%s:%d/metrics%s", metrics.host, metrics.port,
                 "" if is_loopback_host(metrics.host) else " (plain HTTP, no sign-in: restrict who can reach it)")
        try:
            yield
        finally:
            server.should_exit = True
            await serving


@contextlib.asynccontextmanager
async def engine_metrics_listener(settings: Settings, launches: Sequence[ReplicaLaunch]) -> AsyncIterator[None]:
    """The launcher's own metrics listener (``engine.metrics_port``, see server/engine_metrics.py), when set."""
    engine = settings.engine
    if engine.metrics_port is None:
        yield
        return
    served = engine_metrics(settings, launches)
    try:
        with listen(engine.metrics_host, engine.metrics_port, "engine.metrics") as sock:
            server = _Server(_uvicorn_config(metrics_app(served.endpoint, engine.metrics_host), settings))
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not serving.done():  # listening once this returns
                await asyncio.sleep(0.05)
            log.info("engine metrics on http://%s:%d/metrics (plain HTTP, no sign-in%s)", engine.metrics_host,
                     engine.metrics_port, "" if is_loopback_host(engine.metrics_host) else
                     ": restrict who can reach it")
            try:
                async with reloading([served.reloader] if served.reloader is not None else []):
                    yield
            finally:
                server.should_exit = True
                await serving
    finally:
        await served.aclose()


def listen(host: str, port: int, section: str = "gateway", host_setting: str | None = None) -> socket.socket:
    """Bind an address up front, so a taken port fails at once, before any engine starts. Errors name
    ``host_setting`` (default ``<section>.host``) and ``section``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise ConfigError(f"{host_setting or section + '.host'}: cannot resolve {host!r}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({section}): {exc.strerror}") from exc
    return sock


def engine_limits(plan: EnginePlan) -> EngineLimits:
    """What the gateway must know of engines it started itself: their image budget and concurrency ceiling."""
    return EngineLimits(plan.max_pixels, plan.min_pixels, plan.max_num_seqs, plan.max_images_per_request,
                        plan.expected_tokens_per_request, plan.profile.answer_reserve_tokens,
                        demo=plan.profile.name == DEMO_PROFILE)


def build_gateway(settings: Settings, upstream_urls: list[str], tls: GatewayTls | None = None,
                  limits: EngineLimits | None = None) -> Gateway:
    """The gateway apps, with the credentials files read (and refused, naming the line, if unusable). ``limits``:
    from the engines' plan under ``airlock up``; else (None) from the settings."""
    try:
        gateway = create_gateway(settings, upstream_urls, tls.reloader if tls is not None else None,
                                 engine_limits=limits)
    except CredentialsFileError as exc:
        raise ConfigError(str(exc)) from exc
    methods = [name for name, on in (
        ("basic (htpasswd)", settings.auth.htpasswd_file), ("api keys", settings.auth.api_keys_file),
        ("oidc", settings.auth.oidc.enabled),
    ) if on]
    log.info("authentication: %s", ", ".join(methods) if methods else "none (every local client is let in)")
    return gateway


async def run_up(settings: Settings) -> None:
    """Engines and gateway in one command: replicas start, the gateway serves (ready once they are)."""
    harden_process()
    _log_start("up", settings)
    gateway_settings = settings.gateway
    with runtime_directory(settings) as runtime_dir, listen(gateway_settings.host, gateway_settings.port) as sock:
        tls = load_gateway_tls(settings)
        check_engine_tls(settings, own_engines=True)
        planned = plan_engines(settings, runtime_dir)
        _announce(planned, settings)
        check_model(planned.choice, settings)
        ensure_demo_model(planned.choice, settings.engine.python)
        launches = planned.launches
        gateway = build_gateway(settings, [launch.url for launch in launches], tls, engine_limits(planned.plan))
        settle_heap()
        supervisor = Supervisor(launches, settings.engine)
        with Signals() as signals:
            supervisor.start()
            try:
                async with (supervisor.stopping_on_failure(signals.stop),
                            engine_metrics_listener(settings, launches)):
                    await serve_gateway(gateway, settings, sock, signals, tls)
            finally:
                log.info("stopping the engines")
                await supervisor.stop()


async def run_engines(settings: Settings) -> None:
    """Only the engines, for a gateway that runs elsewhere (its upstreams are printed)."""
    harden_process()
    _log_start("engine", settings)
    check_engine_tls(settings, own_engines=False)
    with runtime_directory(settings) as runtime_dir:
        planned = plan_engines(settings, runtime_dir)
        _announce(planned, settings)
        check_model(planned.choice, settings)
        ensure_demo_model(planned.choice, settings.engine.python)
        launches = planned.launches
        supervisor = Supervisor(launches, settings.engine)
        with Signals() as signals:
            supervisor.start()
            for launch in launches:
                print(f"replica {launch.index}: {launch.url}", flush=True)
            try:
                async with (supervisor.stopping_on_failure(signals.stop),
                            engine_metrics_listener(settings, launches)):
                    await signals.stop.wait()
            finally:
                await supervisor.stop()


async def run_gateway(settings: Settings) -> None:
    """Only the gateway, in front of the engines listed under ``upstreams``."""
    harden_process()
    _log_start("gateway", settings)
    if not settings.upstreams:
        raise ConfigError("upstreams: list at least one engine (url: unix:/path.sock or http://host:port)")
    tls = load_gateway_tls(settings)
    gateway = build_gateway(settings, [upstream.url for upstream in settings.upstreams], tls)
    settle_heap()
    with listen(settings.gateway.host, settings.gateway.port) as sock, Signals() as signals:
        await serve_gateway(gateway, settings, sock, signals, tls)


async def serve_gateway(gateway: Gateway, settings: Settings, sock: socket.socket, signals: Signals,
                        tls: GatewayTls | None) -> None:
    """The gateway's listener (and the metrics one) until a signal; a renewed certificate is picked up meanwhile."""
    trim_heap_when_quiet(gateway.activity)
    gateway_settings = settings.gateway
    scheme = "https" if tls is not None else "http"
    log.info("gateway on %s://%s:%d/v1 (ready once an engine is healthy: GET /readyz)",
             scheme, gateway_settings.host, gateway_settings.port)
    if tls is not None and from_systemd_credentials(tls.reloader.certificate.paths):
        # LoadCredential= copies the files once, at the service's start: a renewed original never reaches them.
        log.info("TLS: certificate from %s; certificate files come from systemd credentials: a renewal takes "
                 "`systemctl restart`", gateway_settings.tls.cert_file)
    elif tls is not None:
        log.info("TLS: certificate from %s; a renewed certificate and key are used for new connections within %.0f s",
                 gateway_settings.tls.cert_file, tls.reloader.interval_s)
    if gateway_settings.tls_terminated_by_proxy:
        log.info("TLS is terminated by a proxy in front; client address and scheme are taken from "
                 "X-Forwarded-For / X-Forwarded-Proto of gateway.trusted_proxies only")
    forwarded_from = gateway_settings.trusted_proxies if gateway_settings.tls_terminated_by_proxy else None
    config = _uvicorn_config(gateway.api, settings, tls, forwarded_from)
    async with metrics_listener(gateway, settings), reloading([tls.reloader] if tls is not None else []):
        await signals.serve(_Server(config), sock)


def _log_start(command: str, settings: Settings) -> None:
    """What started, with the settings that shape operations (no secret, path of a secret, or identity)."""
    event = {
        "event": "start", "command": command, "version": version("airlock"),
        "gateway": {"host": settings.gateway.host, "port": settings.gateway.port, "tls": settings.gateway.client_tls},
        "metrics": settings.metrics.listener, "routing": settings.routing.strategy,
        "replicas": settings.engine.replicas if command != "gateway" else len(settings.upstreams),
        "log_level": settings.log_level,
    }
    log.info("airlock %s %s starting", command, event["version"], extra={"event": event})
