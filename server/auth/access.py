"""Authorization: which principals may use which models, and which rules name no model the engines serve.

Model patterns are shell patterns matched case-insensitively (both sides casefolded): `Qwen3-VL-8B-*` and
`qwen3-vl-8b-*` both name `Qwen3-VL-8B-Instruct`. A rule is only as good as the names it matches, and a rule that
matches nothing fails open (the model it meant to restrict stays open to everyone), so ``RuleCoverage`` says so in
the log and in the privacy posture whenever the set of served models is learnt or changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from ..config import AccessRule, AuthorizationSettings
from .principal import Principal

log = logging.getLogger(__name__)

EVERYONE = "*"


def pattern_matches(pattern: str, model: str) -> bool:
    """``model`` matches the shell pattern ``pattern``, ignoring case."""
    return fnmatchcase(model.casefold(), pattern.casefold())


class ModelAccess:
    """A model named by one or more rules is for the members of those rules' groups (``*``: every signed-in user);
    a model no rule names is open to every authenticated user."""

    def __init__(self, settings: AuthorizationSettings) -> None:
        self.rules = list(settings.rules)
        self._rules = [(tuple(p.casefold() for p in rule.models), frozenset(rule.groups)) for rule in settings.rules]
        self.hide_denied = settings.hide_denied_models

    def allows(self, principal: Principal, model: str) -> bool:
        folded = model.casefold()
        allowed: set[str] = set()
        named = False
        for patterns, groups in self._rules:
            if any(fnmatchcase(folded, pattern) for pattern in patterns):
                named = True
                allowed |= groups
        return not named or EVERYONE in allowed or bool(allowed & principal.groups)


@dataclass(frozen=True)
class UnmatchedRule:
    """A rule (numbered from 1, as the operator reads the config) with the patterns that match no served model."""

    number: int
    rule: AccessRule
    patterns: tuple[str, ...]

    @property
    def matches_nothing(self) -> bool:
        return len(self.patterns) == len(self.rule.models)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.number, "patterns": list(self.patterns), "groups": list(self.rule.groups),
                "restricts_nothing": self.matches_nothing}


def unmatched_rules(rules: Iterable[AccessRule], served: Iterable[str]) -> list[UnmatchedRule]:
    """The rules with patterns that match none of the ``served`` model names."""
    names = list(served)
    found = []
    for number, rule in enumerate(rules, start=1):
        missing = tuple(p for p in rule.models if not any(pattern_matches(p, name) for name in names))
        if missing:
            found.append(UnmatchedRule(number, rule, missing))
    return found


class RuleCoverage:
    """Checks the rules against the models the engines serve, each time that set is learnt or changes: a WARNING
    for every rule with a pattern that names no served model, and the same findings for the privacy posture.

    Log lines name rules by number, with their patterns and groups (the operator's own config) and the served model
    names; never a user.
    """

    def __init__(self, access: ModelAccess) -> None:
        self._access = access
        self._served: frozenset[str] | None = None
        self.unmatched: list[UnmatchedRule] = []

    def served_models(self, models: Iterable[str]) -> None:
        """The engines now serve ``models`` (all replicas' names together). Nothing is said until some are known."""
        served = frozenset(models)
        if not served or served == self._served:
            return
        first, self._served = self._served is None, served
        before = {finding.number for finding in self.unmatched}
        self.unmatched = unmatched_rules(self._access.rules, served)
        names = sorted(served)
        for finding in self.unmatched:
            _warn(finding, names)
        fixed = before - {finding.number for finding in self.unmatched}
        if not first and fixed:
            log.info("authorization rules %s now name served models (served: %s)",
                     ", ".join(str(number) for number in sorted(fixed)), ", ".join(names))

    def posture(self) -> dict[str, Any]:
        """What the privacy posture shows: how rules match, and those naming no served model (patterns and groups
        only: listing the served models here would reveal the ones ``hide_denied_models`` hides)."""
        return {
            "rules": len(self._access.rules),
            "model_patterns": "shell patterns on the served name, case-insensitive",
            "models_no_rule_names": "open to every signed-in user",
            "hide_denied_models": self._access.hide_denied,
            "checked_against_served_models": self._served is not None,
            "rules_naming_no_served_model": [finding.describe() for finding in self.unmatched],
        }


def _warn(finding: UnmatchedRule, served: list[str]) -> None:
    patterns = ", ".join(repr(pattern) for pattern in finding.patterns)
    if finding.matches_nothing:
        consequence = ("the rule restricts nothing, and a model it was meant to restrict is open to every signed-in "
                       "user")
    else:
        consequence = "the rule's other patterns still apply"
    log.warning(
        "authorization rule %d (groups: %s): %s %s no served model (served: %s); %s. Patterns ignore case: use the "
        "served names (GET /v1/models)",
        finding.number, ", ".join(finding.rule.groups), patterns,
        "names" if len(finding.patterns) == 1 else "name", ", ".join(served), consequence,
        extra={"event": {"event": "authorization_rule_unmatched", **finding.describe(),
                         "served_models": served}},
    )
