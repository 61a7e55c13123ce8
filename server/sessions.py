"""Browser sessions for the console, in memory only: a random cookie value names a signed-in principal.

Nothing about a session is written anywhere; a restart signs everyone out. Sessions end after ``idle_s`` without
use, after ``max_s`` in any case, on sign-out, and (oldest first) when ``max_sessions`` are open. The table is keyed
by a hash of the cookie, so even this process's memory does not hold a usable cookie. Each session has its own
CSRF token, which every request that changes something must repeat in a header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .auth import Principal

SESSION_COOKIE = "airlock_session"
CSRF_HEADER = "x-airlock-csrf"


@dataclass
class Session:
    principal: Principal
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

    def open(self, principal: Principal) -> tuple[str, Session]:
        """A new session: the cookie value to hand the browser, and the session."""
        cookie = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(principal, secrets.token_urlsafe(24), now, now)
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
        session.last_used = now
        self._sessions.move_to_end(key)
        return session

    def close(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_key(cookie), None)

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_matches(session: Session, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode())
