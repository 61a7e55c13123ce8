"""Requests that a web page elsewhere made the user's browser send: refused before anything reads them.

A page on any site can make the browser POST to Airlock's URL (a form, or ``fetch`` with ``no-cors``): the answer
stays hidden from the page, but the request runs with whatever the browser holds for Airlock (its Basic
credentials, or nothing at all where no sign-in is configured on loopback). Such a request is refused when the
browser says where it came from (Go's ``net/http.CrossOriginProtection`` does the same, for the same reason):
``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` (the W3C Fetch Metadata headers, sent by every current
browser), or, from an older browser, an ``Origin`` whose host is not the ``Host`` asked for. Reads (GET, HEAD,
OPTIONS) change nothing and pass; clients that are not browsers (the SDKs, curl) send neither header and pass.

Where nothing asks who is calling (the API with no sign-in configured, on loopback only; the plain-HTTP metrics
listeners on loopback), a page could also rename itself: DNS rebinding points its own host name at 127.0.0.1, and
the browser then treats the answers as the page's own, free to read. So there only this computer's names are
accepted as the ``Host``: ``localhost``, a loopback address (``127.0.0.1``, ``[::1]``), or the address listened on,
with any port. A rebinding page can only use a name of its own.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import is_loopback_host
from .errors import InvalidRequest, PermissionDenied, error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_SITE_FETCHES = frozenset({b"same-origin", b"none"})
# The headers judged here. A browser sends each once; two would let this check and the app read different ones.
JUDGED = (b"host", b"origin", b"sec-fetch-site")
NOT_THIS_COMPUTER = ("while no sign-in is configured, this server answers only to this computer's own names "
                     "(localhost, 127.0.0.1, [::1])")


class ForeignOriginGuard:
    """Pure ASGI middleware around the API (see the module docstring); raises ``PermissionDenied`` (403) or, for a
    judged header sent twice, ``InvalidRequest`` (400), for the error boundary around it to answer.
    ``local_names_only``: accept only this computer's names as the Host (no sign-in configured); ``bind_host``: the
    address the gateway listens on."""

    def __init__(self, app: ASGIApp, *, local_names_only: bool, bind_host: str) -> None:
        self.app = app
        self.local_names_only = local_names_only
        self.bind_host = bind_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        unsafe = scope["type"] == "http" and scope["method"] not in SAFE_METHODS
        if unsafe or (self.local_names_only and scope["type"] == "http"):  # else nothing here to judge
            host, origin, site = judged_headers(scope)
            if self.local_names_only and not names_this_computer(host, self.bind_host):
                raise PermissionDenied(NOT_THIS_COMPUTER, code="host_not_allowed")
            if unsafe and _from_another_site(host, origin, site):
                raise PermissionDenied("a request another web site made the browser send is not accepted",
                                       code="cross_origin_request")
        await self.app(scope, receive, send)


class LocalNamesOnly:
    """Pure ASGI middleware for a listener with no sign-in on loopback (the metrics listeners): a Host that is not this
    computer's name gets the same 403 as the API gives (see the module docstring)."""

    def __init__(self, app: ASGIApp, bind_host: str) -> None:
        self.app = app
        self.bind_host = bind_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                host = judged_headers(scope)[0]
            except InvalidRequest as repeated:
                await error_response(400, repeated.message, repeated.type, repeated.code)(scope, receive, send)
                return
            if not names_this_computer(host, self.bind_host):
                await error_response(403, NOT_THIS_COMPUTER, "permission_error", "host_not_allowed")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def judged_headers(scope: Scope) -> tuple[str, bytes | None, bytes | None]:
    """The request's ``Host`` (empty if none), ``Origin`` and ``Sec-Fetch-Site``; ``InvalidRequest`` if one of them
    came twice."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in JUDGED:
            if name in found:
                raise InvalidRequest(f"the {name.decode()} header was sent more than once", code="repeated_header")
            found[name] = value
    return found.get(b"host", b"").decode("latin-1"), found.get(b"origin"), found.get(b"sec-fetch-site")


def names_this_computer(host: str, bind_host: str) -> bool:
    """Whether a ``Host`` header names this computer (``localhost``, a loopback address, or ``bind_host``), whatever
    its port. A request without one (HTTP/1.0) came from no browser."""
    if not host:
        return True
    name = host_name(host)
    return is_loopback_host(name) or name == bind_host.strip("[]").lower()


def host_name(host: str) -> str:
    """The name in a ``Host`` header, in lower case and without its port (``[::1]:8000`` gives ``::1``)."""
    host = host.lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _from_another_site(host: str, origin: bytes | None, site: bytes | None) -> bool:
    if site is not None:
        return site not in SAME_SITE_FETCHES
    if origin is None:
        return False  # not a browser, or a browser that sends no Origin on this request: nothing to judge
    return urlsplit(origin.decode("latin-1")).netloc.lower() != host.lower()
