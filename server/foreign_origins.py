"""Requests that a web page elsewhere made the user's browser send: refused before anything reads them.

A page on any site can make the browser POST to Airlock's URL (a form, or ``fetch`` with ``no-cors``): the answer
stays hidden from the page, but the request runs with whatever the browser holds for Airlock (its Basic
credentials, or nothing at all where no sign-in is configured on loopback). Such a request is refused when the
browser says where it came from (Go's ``net/http.CrossOriginProtection`` does the same, for the same reason):
``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` (the W3C Fetch Metadata headers, sent by every current
browser), or, from an older browser, an ``Origin`` whose host is not the ``Host`` asked for. Reads (GET, HEAD,
OPTIONS) change nothing and pass; clients that are not browsers (the SDKs, curl) send neither header and pass.

With no sign-in configured (loopback only), a page could also rename itself: DNS rebinding points its own host name
at 127.0.0.1, and the browser then treats Airlock's answers as the page's own. So there only the names of this
computer (``localhost``, ``127.0.0.1``, ``[::1]`` and the configured bind address, any port) are accepted as the
``Host``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import PermissionDenied

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_SITE_FETCHES = frozenset({b"same-origin", b"none"})
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "127.0.0.1", "::1"})


class ForeignOriginGuard:
    """Pure ASGI middleware (see the module docstring); raises ``PermissionDenied`` (403) for the error boundary
    around it to answer. ``loopback_names``: accept only this computer's names as the Host (no sign-in configured);
    ``bind_host``: the address the gateway listens on, one of those names."""

    def __init__(self, app: ASGIApp, *, loopback_names: bool, bind_host: str) -> None:
        self.app = app
        self.hosts = LOOPBACK_NAMES | {bind_host.strip("[]").lower()} if loopback_names else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])  # the last of a repeated header: browsers send each of these once
            host = headers.get(b"host", b"").decode("latin-1")
            if self.hosts is not None and host and _host_name(host) not in self.hosts:
                raise PermissionDenied("this server answers only to this computer's own names (localhost, "
                                       "127.0.0.1); sign-in must be configured to serve other names",
                                       code="host_not_allowed")
            if scope["method"] not in SAFE_METHODS and _from_another_site(headers, host):
                raise PermissionDenied("a request another web site made the browser send is not accepted",
                                       code="cross_origin_request")
        await self.app(scope, receive, send)


def _from_another_site(headers: dict[bytes, bytes], host: str) -> bool:
    site = headers.get(b"sec-fetch-site")
    if site is not None:
        return site not in SAME_SITE_FETCHES
    origin = headers.get(b"origin")
    if origin is None:
        return False  # not a browser, or a browser that sends no Origin on this request: nothing to judge
    return urlsplit(origin.decode("latin-1")).netloc.lower() != host.lower()


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` gives ``::1``)."""
    host = host.lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
