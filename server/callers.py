"""Who sent a request: the console's session, or the credentials of the ``Authorization`` header."""

from __future__ import annotations

from starlette.requests import Request

from .auth import Authentication, Principal
from .errors import Unauthenticated
from .metrics import ActiveUsers
from .sessions import CSRF_HEADER, SESSION_COOKIE, SessionStore, csrf_matches

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Callers:
    """Identifies callers for the engine routes and, as a FastAPI dependency, for every other API route."""

    def __init__(self, authentication: Authentication, sessions: SessionStore, active_users: ActiveUsers) -> None:
        self._authentication = authentication
        self._sessions = sessions
        self._active_users = active_users

    async def identify(self, request: Request) -> Principal:
        """The caller, or ``Unauthenticated`` (always the same message) / ``TooManyFailures``. Counted as active."""
        authorization = request.headers.get("authorization")
        session = None if authorization else self._sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            # The console's session cookie; anything but a read must also carry the page's CSRF token.
            if request.method not in SAFE_METHODS and not csrf_matches(session, request.headers.get(CSRF_HEADER)):
                raise Unauthenticated("the console's request lacks its token; reload the page")
            principal = session.principal
        else:
            source = request.client.host if request.client else "unknown"
            principal = await self._authentication.authenticate(authorization, source)
        self._active_users.saw(principal.key)
        return principal
