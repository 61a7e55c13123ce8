"""Which groups may use which models: 403 (or 404 when hidden), and /v1/models lists only what is allowed."""

from __future__ import annotations

import httpx
import pytest

from server.auth import ModelAccess, Principal
from server.config import AuthorizationSettings

from .conftest import Credentials, Stack
from .servers import gateway_in_front_of


def who(*groups: str) -> Principal:
    return Principal(user_id="someone", source="local", groups=frozenset(groups))


def test_rules_by_group() -> None:
    access = ModelAccess(AuthorizationSettings.model_validate({"rules": [
        {"models": ["qwen3-vl-8b-*"], "groups": ["radiology"]},
        {"models": ["qwen3-vl-8b-thinking"], "groups": ["research"]},
        {"models": ["qwen3-vl-4b-*"], "groups": ["*"]},
    ]}))
    assert access.allows(who("radiology"), "qwen3-vl-8b-instruct")
    assert not access.allows(who("research"), "qwen3-vl-8b-instruct")
    assert access.allows(who("research"), "qwen3-vl-8b-thinking")  # rules that name a model add up
    assert access.allows(who(), "qwen3-vl-4b-instruct")  # "*": everyone signed in
    assert access.allows(who(), "some-other-model")  # named by no rule: open
    assert ModelAccess(AuthorizationSettings()).allows(who(), "anything")


@pytest.mark.engine
@pytest.mark.parametrize("hide", [False, True])
def test_denied_model_is_403_or_hidden(stack: Stack, credentials: Credentials, hide: bool) -> None:
    auth = {"htpasswd_file": str(credentials.htpasswd), "local_groups": {"vision": ["alice"]}}
    rules = {"rules": [{"models": ["airlock-demo-*"], "groups": ["vision"]}], "hide_denied_models": hide}
    with gateway_in_front_of(stack.engine_socket, auth=auth, authorization=rules) as gateway:
        alice = ("alice", credentials.passwords["alice"])
        bob = ("bob", credentials.passwords["bob"])
        assert [card["id"] for card in httpx.get(f"{gateway}/v1/models", auth=alice).json()["data"]] == [stack.model]
        assert httpx.get(f"{gateway}/v1/models", auth=bob).json()["data"] == []
        body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{gateway}/v1/chat/completions", json=body, auth=alice, timeout=60).status_code == 200
        denied = httpx.post(f"{gateway}/v1/chat/completions", json=body, auth=bob, timeout=60)
        error = denied.json()["error"]
        if hide:
            assert (denied.status_code, error["code"]) == (404, "model_not_found")
        else:
            assert (denied.status_code, error["type"], error["code"]) == (403, "permission_error", "model_not_allowed")
