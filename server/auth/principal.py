"""Who is asking: the one thing every authenticator produces and everything after authentication reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Source = Literal["local", "oidc", "anonymous"]


@dataclass(frozen=True)
class Principal:
    """An authenticated user. ``key`` tells local and OIDC users with the same name apart.

    Never log or export any field of it: they identify a person.
    """

    user_id: str
    source: Source
    display_name: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)

    @property
    def key(self) -> str:
        return f"{self.source}:{self.user_id}"


# Everyone, when no authentication is configured and the gateway listens on loopback only.
ANONYMOUS = Principal(user_id="anonymous", source="anonymous", display_name="anonymous")


def local_principal(user: str, groups_by_user: dict[str, frozenset[str]]) -> Principal:
    """A user of Airlock's own files (htpasswd, API keys), with groups from ``auth.local_groups``."""
    return Principal(user_id=user, source="local", display_name=user, groups=groups_by_user.get(user, frozenset()))
