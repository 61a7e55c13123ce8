"""Authorization: which principals may use which models."""

from __future__ import annotations

from fnmatch import fnmatchcase

from ..config import AuthorizationSettings
from .principal import Principal

EVERYONE = "*"


class ModelAccess:
    """A model named by one or more rules is for the members of those rules' groups (``*``: every signed-in user);
    a model no rule names is open to every authenticated user."""

    def __init__(self, settings: AuthorizationSettings) -> None:
        self._rules = [(tuple(rule.models), frozenset(rule.groups)) for rule in settings.rules]
        self.hide_denied = settings.hide_denied_models

    def allows(self, principal: Principal, model: str) -> bool:
        allowed: set[str] = set()
        named = False
        for patterns, groups in self._rules:
            if any(fnmatchcase(model, pattern) for pattern in patterns):
                named = True
                allowed |= groups
        return not named or EVERYONE in allowed or bool(allowed & principal.groups)
