"""Browser sessions for the console, in memory only: a random cookie value names a signed-in principal.

Nothing about a session is written anywhere; a restart signs everyone out. Sessions end after ``idle_s`` without
use, after ``max_s`` in any case, on sign-out, (oldest first) when ``max_sessions`` are open, and as soon as the
credential they were opened with no longer stands: a Basic user removed or given a new password, an OIDC token past
its ``exp`` (``auth/standing.py``; re-checked on every request at the cost of an integer comparison while nothing
changed). A session that ended any of these ways is simply gone: the next request gets the same 401 as a lapsed
one. The table is keyed by a hash of the cookie, so even this process's memory does not hold a usable cookie. Each
session has its own CSRF token, which every request that changes something must repeat in a header.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .auth import Principal, Standing

log = logging.getLogger("airlock.console")

SESSION_COOKIE = "airlock_session"
CSRF_HEADER = "x-airlock-csrf"


@dataclass
class Session:
    principal: Principal
    standing: Standing
    csrf: str
    created: float
    last_used: float


def _key(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode()).digest()


class SessionStore:
    def __init__(self, idle_s: float, max_s: float, max_sessions: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._idle_s = idle_s
        self._max_s = max_s
        self._max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def open(self, principal: Principal, standing: Standing) -> tuple[str, Session]:
        """A new session, tied to ``standing``: the cookie value to hand the browser, and the session."""
        cookie = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(principal, standing, secrets.token_urlsafe(24), now, now)
        self._sessions[_key(cookie)] = session
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        key = _key(cookie)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_used > self._idle_s or now - session.created > self._max_s:
            del self._sessions[key]
            return None
        if not session.standing.holds():
            del self._sessions[key]
            # Says that it happened, never to whom.
            log.info("a console session ended: the credential it was opened with was removed, changed or expired")
            return None
        session.last_used = now
        self._sessions.move_to_end(key)
        return session

    def close(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_key(cookie), None)

    def lifetime_s(self, session: Session, wall_clock: Callable[[], float] = time.time) -> int:
        """How long the browser should keep the cookie: ``max_s``, or less when the credential lapses sooner (rounded
        up: the gateway's own check ends the session; the browser then drops a cookie that is of no use)."""
        lifetime = self._max_s
        if session.standing.ends_at is not None:
            lifetime = min(lifetime, session.standing.ends_at - wall_clock())
        return max(0, math.ceil(lifetime))

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_matches(session: Session, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode())
