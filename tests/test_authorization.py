"""Which groups may use which models: patterns on the served name that ignore case, 403 (or 404 when hidden),
/v1/models listing only what is allowed, and rules that name no served model said out loud (log and posture).
Every rule Airlock ships (example configs, README snippets) names a model a shipped profile serves."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.auth import ModelAccess, Principal, RuleCoverage
from server.auth.access import unmatched_rules
from server.config import AccessRule, AuthorizationSettings, load_settings
from server.profiles import GENERIC_PROFILE, load_profiles
from server.routing import LeastOutstanding
from server.upstream import ReplicaPool

from .conftest import ROOT, Credentials, Stack, airlock_cli
from .servers import ThreadedServer, gateway_in_front_of

# The served names of the shipped profiles (the generic profile serves a directory under its own name).
SHIPPED_NAMES = sorted(profile.served_model_name for name, profile in load_profiles().items()
                       if name != GENERIC_PROFILE)


def who(*groups: str) -> Principal:
    return Principal(user_id="someone", source="local", groups=frozenset(groups))


def access_for(*rules: dict[str, list[str]], hide: bool = False) -> ModelAccess:
    return ModelAccess(AuthorizationSettings.model_validate({"rules": list(rules), "hide_denied_models": hide}))


def test_rules_by_group() -> None:
    access = access_for(
        {"models": ["Qwen3-VL-8B-*"], "groups": ["radiology"]},
        {"models": ["Qwen3-VL-8B-Thinking"], "groups": ["research"]},
        {"models": ["Qwen3-VL-4B-*"], "groups": ["*"]},
    )
    assert access.allows(who("radiology"), "Qwen3-VL-8B-Instruct")
    assert not access.allows(who("research"), "Qwen3-VL-8B-Instruct")
    assert access.allows(who("research"), "Qwen3-VL-8B-Thinking")  # rules that name a model add up
    assert access.allows(who(), "Qwen3-VL-4B-Instruct")  # "*": everyone signed in
    assert access.allows(who(), "some-other-model")  # named by no rule: open
    assert ModelAccess(AuthorizationSettings()).allows(who(), "anything")


@pytest.mark.parametrize("pattern", ["qwen3-vl-8b-*", "QWEN3-VL-8B-*", "Qwen3-VL-8B-Instruct", "qwen3-vl-8b-instruct",
                                     "qwen3-vl-?b-[i]nstruct", "*-INSTRUCT"])
def test_patterns_ignore_case(pattern: str) -> None:
    """The bug this guards against: `qwen3-vl-8b-*` named nothing, so everybody got `Qwen3-VL-8B-Instruct`."""
    access = access_for({"models": [pattern], "groups": ["radiology"]})
    for model in ("Qwen3-VL-8B-Instruct", "qwen3-vl-8b-instruct", "QWEN3-VL-8B-INSTRUCT"):
        assert not access.allows(who("research"), model), (pattern, model)
        assert access.allows(who("radiology"), model), (pattern, model)
    assert access.allows(who("research"), "Qwen3-VL-4B-Thinking")  # still a pattern: others stay open


def test_character_classes_and_wildcards_keep_their_meaning() -> None:
    access = access_for({"models": ["qwen3-vl-[48]b-thinking"], "groups": ["research"]})
    assert not access.allows(who(), "Qwen3-VL-4B-Thinking")
    assert not access.allows(who(), "Qwen3-VL-8B-Thinking")
    assert access.allows(who(), "Qwen3-VL-2B-Thinking")
    assert access.allows(who(), "Qwen3-VL-8B-Thinking-FP8")  # no trailing *: the whole name must match


def rule(*patterns: str, groups: tuple[str, ...] = ("radiology",)) -> AccessRule:
    return AccessRule(models=list(patterns), groups=list(groups))


def test_unmatched_rules_and_patterns_are_found() -> None:
    rules = [rule("AIRLOCK-DEMO-*"), rule("qwen3-vl-8b-*", "airlock-demo-qwen3-vl"), rule("Qwen3-VL-4B-*")]
    found = unmatched_rules(rules, ["airlock-demo-qwen3-vl"])
    assert [(f.number, f.patterns, f.matches_nothing) for f in found] == [
        (2, ("qwen3-vl-8b-*",), False),  # one pattern of the rule names nothing; the other still restricts
        (3, ("Qwen3-VL-4B-*",), True),
    ]
    assert unmatched_rules(rules, ["airlock-demo-qwen3-vl", "Qwen3-VL-8B-Instruct", "Qwen3-VL-4B-Thinking"]) == []


def test_coverage_warns_once_per_set_of_served_models_and_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    coverage = RuleCoverage(access_for({"models": ["Qwen3-VL-8B-*"], "groups": ["radiology"]},
                                       {"models": ["airlock-demo-*"], "groups": ["*"]}))
    caplog.set_level(logging.INFO, logger="server.auth.access")
    assert coverage.posture()["checked_against_served_models"] is False
    coverage.served_models([])  # nothing learnt yet: nothing to say
    assert caplog.records == []
    coverage.served_models(["airlock-demo-qwen3-vl"])
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith("authorization rule 1 (groups: radiology): 'Qwen3-VL-8B-*' names no "
                                           "served model (served: airlock-demo-qwen3-vl); the rule restricts nothing")
    assert coverage.posture()["rules_naming_no_served_model"] == [
        {"rule": 1, "patterns": ["Qwen3-VL-8B-*"], "groups": ["radiology"], "restricts_nothing": True}]
    coverage.served_models(["airlock-demo-qwen3-vl"])  # the same set again (a replica came back): said already
    assert len(caplog.records) == 1
    coverage.served_models(["airlock-demo-qwen3-vl", "Qwen3-VL-8B-Instruct"])
    assert [r.levelname for r in caplog.records[1:]] == ["INFO"]
    assert caplog.records[1].getMessage().startswith("authorization rules 1 now name served models")
    assert coverage.posture()["rules_naming_no_served_model"] == []
    coverage.served_models(["Qwen3-VL-4B-Instruct"])  # another model in its place: both rules name nothing now
    assert [r.getMessage().split(":")[0] for r in caplog.records[2:]] == ["authorization rule 1 (groups",
                                                                       "authorization rule 2 (groups"]


# Rules as users see them: every example config and README snippet names models the shipped profiles serve.

def rules_in_readme() -> list[AccessRule]:
    """The rules in the README's YAML snippets, wherever they sit (an Airlock config, chart values)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return [AccessRule.model_validate(item) for block in blocks for item in access_rules(yaml.safe_load(block))]


def access_rules(node: object) -> Iterator[object]:
    """Every item of an ``authorization: {rules: [...]}`` in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "authorization" and isinstance(value, dict) and "rules" in value:
                yield from value["rules"]
            else:
                yield from access_rules(value)
    elif isinstance(node, list):
        for item in node:
            yield from access_rules(item)


def rules_written_anywhere(path: Path) -> list[list[str]]:
    """Every ``models: [...]`` list in a YAML file, commented-out examples included."""
    lines = re.findall(r"^[#\s-]*models:\s*(\[.*\])\s*$", path.read_text(), flags=re.MULTILINE)
    return [yaml.safe_load(line) for line in lines]


def shipped_configs() -> list[Path]:
    return sorted((ROOT / "configs").glob("*.yaml"))


def shipped_yaml() -> list[Path]:
    """Example configs and the chart's values (its gateway.settings are an Airlock config)."""
    chart = ROOT / "helm" / "airlock"
    return [*shipped_configs(), chart / "values.yaml", *sorted((chart / "ci").glob("*.yaml"))]


def names_a_shipped_model(pattern: str) -> bool:
    """Written as served, in the exact case too, so that a reader copies real names."""
    return any(fnmatchcase(name, pattern) for name in SHIPPED_NAMES)


def test_the_shipped_served_names_are_known() -> None:
    assert "airlock-demo-qwen3-vl" in SHIPPED_NAMES and "Qwen3-VL-8B-Instruct" in SHIPPED_NAMES


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda path: path.name)
def test_every_rule_in_a_shipped_config_names_a_shipped_model(path: Path) -> None:
    for pattern in (pattern for r in load_settings(path).authorization.rules for pattern in r.models):
        assert names_a_shipped_model(pattern), f"{path.name}: {pattern} names no shipped model"


@pytest.mark.parametrize("path", shipped_yaml(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_rule_written_in_a_shipped_file_names_a_shipped_model(path: Path) -> None:
    """Rules in effect anywhere in the file, and commented-out examples a reader would uncomment."""
    written = [AccessRule.model_validate(item).models for item in access_rules(yaml.safe_load(path.read_text()))]
    for pattern in (pattern for patterns in [*written, *rules_written_anywhere(path)] for pattern in patterns):
        assert names_a_shipped_model(pattern), f"{path.name}: {pattern} names no shipped model"


def test_shipped_configs_and_readme_carry_rules_at_all() -> None:
    """The checks above could pass on nothing: the examples do show rules."""
    assert sum(len(load_settings(path).authorization.rules) for path in shipped_configs()) >= 2
    assert rules_in_readme()
    assert sum(len(rules_written_anywhere(path)) for path in shipped_yaml()) >= 3  # airlock.example.yaml's too


def test_every_rule_in_the_readme_names_a_shipped_model() -> None:
    for pattern in (pattern for r in rules_in_readme() for pattern in r.models):
        assert names_a_shipped_model(pattern), f"README: {pattern} names no shipped model"


# Through the real gateway and the real engine.

def log_events(path: Path, event: str) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == event]


@pytest.mark.engine
def test_the_stack_warns_about_its_rule_that_names_no_served_model(stack: Stack, credentials: Credentials) -> None:
    """The session stack (`airlock up`) has a rule for Qwen3-VL-8B-*, and serves only the demo model."""
    (event,) = log_events(stack.log_path, "authorization_rule_unmatched")
    assert event["level"] == "warning"
    assert (event["rule"], event["patterns"], event["groups"], event["served_models"]) == (
        1, ["Qwen3-VL-8B-*"], ["radiology"], [stack.model])
    assert "restricts nothing" in str(event["message"])
    for secret in ("alice", "bob", credentials.api_key, *credentials.passwords.values()):
        assert secret not in json.dumps(event)
    posture = httpx.get(f"{stack.base_url}/v1/airlock/privacy", headers=stack.auth).json()["authorization"]
    assert posture["checked_against_served_models"] is True
    assert posture["rules_naming_no_served_model"] == [
        {"rule": 1, "patterns": ["Qwen3-VL-8B-*"], "groups": ["radiology"], "restricts_nothing": True}]
    assert stack.model not in json.dumps(posture)  # hidden models stay hidden: served names are not listed


def scripted_control_plane(model: str) -> Starlette:
    """The control plane of an engine serving ``model``: a second real vLLM would cost this 2-core machine a minute,
    and only /health and /v1/models are asked (no request is routed to it)."""

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({})

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "max_model_len": 4096}]})

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models)])


@pytest.mark.engine
def test_a_change_of_served_models_is_checked_again(stack: Stack, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.auth.access")
    second = tmp_path / "second.sock"
    rules = {"rules": [{"models": ["AIRLOCK-DEMO-*"], "groups": ["vision"]},
                       {"models": ["qwen3-vl-8b-*", "Qwen3-VL-4B-*"], "groups": ["radiology"]}]}
    with gateway_in_front_of(stack.engine_socket, authorization=rules,
                             upstreams_extra=[f"unix:{second}"]) as gateway:
        messages = [r.getMessage() for r in caplog.records if r.name == "server.auth.access"]
        # Rule 1 names the demo model (ignoring case); rule 2 names nothing served yet.
        assert messages == ["authorization rule 2 (groups: radiology): 'qwen3-vl-8b-*', 'Qwen3-VL-4B-*' name no "
                            "served model (served: airlock-demo-qwen3-vl); the rule restricts nothing, and a model "
                            "it was meant to restrict is open to every signed-in user. Patterns ignore case: use "
                            "the served names (GET /v1/models)"]
        caplog.clear()
        with ThreadedServer(scripted_control_plane("Qwen3-VL-8B-Instruct"), uds=str(second)):
            posture = wait_for_posture(gateway, lambda p: len(p["rules_naming_no_served_model"][0]["patterns"]) == 1)
        assert posture["rules_naming_no_served_model"] == [
            {"rule": 2, "patterns": ["Qwen3-VL-4B-*"], "groups": ["radiology"], "restricts_nothing": False}]
        warnings = [r for r in caplog.records if r.name == "server.auth.access"]
        assert [r.levelname for r in warnings] == ["WARNING"]
        assert warnings[0].getMessage().startswith(
            "authorization rule 2 (groups: radiology): 'Qwen3-VL-4B-*' names no served model (served: "
            "Qwen3-VL-8B-Instruct, airlock-demo-qwen3-vl); the rule's other patterns still apply")


def wait_for_posture(gateway: str, done: Callable[[dict[str, Any]], bool], seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        posture = httpx.get(f"{gateway}/v1/airlock/privacy").json()["authorization"]
        if done(posture):
            return dict(posture)
        assert time.monotonic() < deadline, posture
        time.sleep(0.1)


@contextmanager
def keys_for_alice_and_bob(credentials: Credentials, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A copy of the session's API keys (alice's) with a key for bob, made with the real `airlock keys create`."""
    keys = tmp_path / "api-keys.json"
    shutil.copyfile(credentials.api_keys, keys)
    keys.chmod(0o600)
    yield keys, airlock_cli("keys", "create", "--user", "bob", "--name", "tests", "--file", str(keys)).strip()


@pytest.mark.engine
@pytest.mark.parametrize("hide", [False, True])
def test_a_non_member_is_refused_whatever_the_case_and_a_member_is_served(
        stack: Stack, credentials: Credentials, tmp_path: Path, hide: bool) -> None:
    """A rule written in another case than the served name (as `Qwen3-VL-8B-*` against `Qwen3-VL-8B-Instruct` was not)
    restricts the model: through the real gateway and engine, with the OpenAI SDK."""
    with keys_for_alice_and_bob(credentials, tmp_path) as (keys, bob_key):
        auth = {"api_keys_file": str(keys), "local_groups": {"vision": ["alice"]}}
        rules = {"rules": [{"models": ["AIRLOCK-DEMO-*"], "groups": ["vision"]}], "hide_denied_models": hide}
        with gateway_in_front_of(stack.engine_socket, auth=auth, authorization=rules) as gateway:
            alice = openai.OpenAI(base_url=f"{gateway}/v1", api_key=credentials.api_key, max_retries=0, timeout=60)
            bob = openai.OpenAI(base_url=f"{gateway}/v1", api_key=bob_key, max_retries=0, timeout=60)
            assert [model.id for model in alice.models.list()] == [stack.model]
            assert [model.id for model in bob.models.list()] == []
            # One card: the same as the list's for a member; a model denied to bob is as absent as an unknown one.
            assert alice.models.retrieve(stack.model).model_dump() == alice.models.list().data[0].model_dump()
            with pytest.raises(openai.NotFoundError) as absent:
                bob.models.retrieve(stack.model)
            assert absent.value.code == "model_not_found"
            messages = [{"role": "user", "content": "hi"}]
            answer = alice.chat.completions.create(model=stack.model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
            assert answer.model == stack.model and answer.choices[0].message.content is not None
            refusal = openai.NotFoundError if hide else openai.PermissionDeniedError
            for name in (stack.model, stack.model.upper(), "Airlock-Demo-Qwen3-VL"):
                with pytest.raises(refusal) as refused:
                    bob.chat.completions.create(model=name, messages=messages, max_tokens=2)  # type: ignore[arg-type]
                assert refused.value.code == ("model_not_found" if hide else "model_not_allowed"), name


def test_an_engine_restarted_with_another_model_is_checked_again(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The pool re-reads a replica's models when it rejoins, and the rules are checked against the new set."""
    socket = tmp_path / "engine.sock"
    pool = ReplicaPool([f"unix:{socket}"], load_settings().gateway, LeastOutstanding(), 64)
    coverage = RuleCoverage(access_for({"models": ["Qwen3-VL-8B-*"], "groups": ["radiology"]}))
    pool.on_change.append(lambda: coverage.served_models(pool.served_models))

    async def check() -> None:
        await pool.check_all()

    async def close() -> None:
        await pool.close()

    with ThreadedServer(scripted_control_plane("Qwen3-VL-8B-Instruct"), uds=str(socket)):
        asyncio.run(check())
    assert pool.served_models == {"Qwen3-VL-8B-Instruct"} and coverage.unmatched == []
    asyncio.run(check())  # gone: out of the pool, its models still known
    assert not pool.any_healthy and pool.served_models == {"Qwen3-VL-8B-Instruct"}
    with ThreadedServer(scripted_control_plane("Qwen3-VL-4B-Instruct"), uds=str(socket)):
        asyncio.run(check())
    asyncio.run(close())
    assert pool.served_models == {"Qwen3-VL-4B-Instruct"}
    assert [finding.number for finding in coverage.unmatched] == [1]
    assert [r.levelname for r in caplog.records if r.name == "server.auth.access"] == ["WARNING"]
