"""Request screening: what a request may carry before it reaches an engine.

Fields are on an allow-list (anything that changes how the server builds prompts or caches, such as
``mm_processor_kwargs`` or a per-request ``chat_template``, is refused); images must be inline ``data:`` URLs within
limits (see ``images``); a client's ``uuid`` on a content part (vLLM's multimodal cache key: another user could read
or poison the cached image) and a client's ``cache_salt`` are refused; ``max_tokens`` is capped, never filled in
(the engine bounds a missing one by what is left of its context, which only it knows); and the gateway sets
``cache_salt`` from the tenant, so the prefix cache is never shared across tenants. Types were checked when the
body was parsed (``payload``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from .auth import Principal
from .config import ScreeningSettings
from .errors import InvalidRequest
from .forwarded_body import ForwardedBody
from .images import CheckedImage, ImageLimits, check_image_url, limit_png_text, load_image_plugins
from .payload import shown_name
from .tenancy import TenantSalts

Route = Literal["chat", "completions"]

_SAMPLING = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stream_options", "stop",
    "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "min_tokens", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "length_penalty", "response_format", "structured_outputs", "user",
})
FIELDS: dict[Route, frozenset[str]] = {
    "chat": _SAMPLING | {
        "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
        "reasoning_effort", "add_generation_prompt", "continue_final_message", "echo",
    },
    "completions": _SAMPLING | {"prompt", "echo", "suffix", "best_of"},
}
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
PART_FIELDS = {"text": frozenset({"type", "text"}), "image_url": frozenset({"type", "image_url"})}
IMAGE_URL_FIELDS = frozenset({"url", "detail"})


@dataclass(frozen=True)
class Screened:
    """A request fit to forward: its body, the tenant's cache salt, and each image's width and height (for its
    cost: the engine's processor resizes each image on its own, by its sides, so a sum of pixels would not do)."""

    body: bytes
    cache_salt: str
    image_sizes: tuple[tuple[int, int], ...]


class Screening:
    def __init__(self, settings: ScreeningSettings, salts: TenantSalts, max_images: int | None = None) -> None:
        """``max_images``: images a request may carry (default: screening.max_images_per_request; lower where the
        engines take fewer)."""
        self._settings = settings
        self._salts = salts
        self._max_images = settings.max_images_per_request if max_images is None else max_images
        self._images = ImageLimits(frozenset(settings.image_formats), settings.max_image_bytes,
                                   settings.max_image_pixels, settings.max_image_aspect_ratio)
        self._body = ForwardedBody()
        load_image_plugins()
        limit_png_text()
        self._caps = (("max_tokens", settings.max_tokens_limit, "max_tokens_too_large"),
                      ("max_completion_tokens", settings.max_tokens_limit, "max_tokens_too_large"),
                      ("n", settings.max_choices, "too_many_choices"),
                      ("best_of", settings.max_choices, "too_many_choices"))

    def screen(self, route: Route, payload: dict[str, Any], principal: Principal) -> Screened:
        """The body to forward, or ``InvalidRequest`` saying what to change. ``payload`` is left as forwarded."""
        for field in payload:
            if field == "cache_salt":
                raise InvalidRequest("cache_salt is set by this server for each user; leave it out",
                                     param="cache_salt", code="field_not_allowed")
            if field not in FIELDS[route]:
                raise InvalidRequest(f"the field '{_shown(field)}' is not accepted by this server",
                                     param=_shown(field), code="field_not_allowed")
        payload.pop("user", None)  # OpenAI's end-user id: an identity the engine has no use for
        self._cap_tokens(payload)
        sizes: tuple[tuple[int, int], ...] = ()
        images: list[tuple[dict[str, Any], bytes | memoryview]] = []  # for ForwardedBody
        if route == "chat":
            _check_tools(payload.get("tools"), payload.get("tool_choice"))
            sizes = self._check_messages(payload.get("messages"), images)
            self._check_template_kwargs(payload.get("chat_template_kwargs"))
        else:
            _check_prompt(payload.get("prompt"))
        payload["cache_salt"] = salt = self._salts.salt_for(principal)
        return Screened(self._body.encode(payload, images), salt, sizes)

    def _cap_tokens(self, payload: dict[str, Any]) -> None:
        """Refuse more tokens or choices than this server allows; a field left out (or null) stays out."""
        for field, limit, code in self._caps:
            value = payload.get(field)
            if value is None:
                continue
            if value < 1:  # an integer: payload.check_types saw to it
                raise InvalidRequest(f"{field} must be at least 1", param=field, code="invalid_value")
            if value > limit:
                raise InvalidRequest(f"{field} is above this server's limit of {limit}", param=field, code=code)

    def _check_messages(self, messages: Any,
                        images: list[tuple[dict[str, Any], bytes | memoryview]]) -> tuple[tuple[int, int], ...]:
        """The width and height of every image in the messages; each one's ``image_url`` object and base64 added to
        ``images``."""
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages", code="invalid_messages")
        sizes: list[tuple[int, int]] = []
        for m, message in enumerate(messages):
            where = f"messages[{m}]"
            if not isinstance(message, dict):
                raise InvalidRequest(f"{where} must be an object", param=where, code="invalid_messages")
            unknown = set(message) - MESSAGE_FIELDS
            if unknown:
                raise InvalidRequest(f"{where} has a field this server does not accept: '{_shown(min(unknown))}'",
                                     param=where, code="field_not_allowed")
            role = message.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(ROLES))}", param=where,
                                     code="invalid_messages")
            if message.get("tool_calls") is not None:
                _settle_tool_call_arguments(message["tool_calls"])
            content = message.get("content")
            if content is None or isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise InvalidRequest(f"{where}.content must be a string or a list of parts", param=where,
                                     code="invalid_messages")
            for p, part in enumerate(content):
                image = self._check_part(part, f"{where}.content[{p}]")
                if image is not None:
                    sizes.append(image.size)
                    images.append((part["image_url"], image.base64))
        if len(sizes) > self._max_images:
            raise InvalidRequest(f"{len(sizes)} images in one request, limit {self._max_images}",
                                 param="messages", code="too_many_images")
        return tuple(sizes)

    def _check_part(self, part: Any, where: str) -> CheckedImage | None:
        """An image part's check; None for text."""
        if not isinstance(part, dict) or not isinstance(part.get("type"), str) or part["type"] not in PART_FIELDS:
            raise InvalidRequest(f"{where} must be a part of type text or image_url", param=where,
                                 code="unsupported_content")
        if "uuid" in part:
            raise InvalidRequest(f"{where}: 'uuid' is not accepted (this server caches nothing across users)",
                                 param=where, code="field_not_allowed")
        unknown = set(part) - PART_FIELDS[part["type"]]
        if unknown:
            raise InvalidRequest(f"{where} has a field this server does not accept: '{_shown(min(unknown))}'",
                                 param=where, code="field_not_allowed")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.text must be a string", param=where, code="invalid_messages")
            return None
        image_url = part.get("image_url")
        if isinstance(image_url, str):  # a shorthand some clients send
            image_url = part["image_url"] = {"url": image_url}
        if not isinstance(image_url, dict) or set(image_url) - IMAGE_URL_FIELDS:
            raise InvalidRequest(f"{where}.image_url must be {{\"url\": \"data:...\"}}", param=where,
                                 code="invalid_image")
        image = check_image_url(image_url.get("url"), self._images, where)
        image_url["url"] = image.url
        return image

    def _check_template_kwargs(self, kwargs: Any) -> None:
        if kwargs is None:
            return
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be an object", param="chat_template_kwargs",
                                 code="invalid_value")
        refused = set(kwargs) - set(self._settings.chat_template_kwargs)
        if refused:
            raise InvalidRequest(
                f"chat_template_kwargs may only set {', '.join(self._settings.chat_template_kwargs) or 'nothing'}",
                param="chat_template_kwargs", code="field_not_allowed",
            )


TOOL_CHOICES = frozenset({"none", "auto", "required"})


def _check_tools(tools: Any, tool_choice: Any) -> None:
    """The shapes OpenAI documents for ``tools`` and ``tool_choice`` (their types are checked when parsed): vLLM
    reads them before validating (a tool without ``function`` made it answer 500) and repeats what it cannot use."""
    for t, tool in enumerate(tools or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not function["name"]):
            raise InvalidRequest(f'tools[{t}] must be {{"type": "function", "function": {{"name": ..., '
                                 '"parameters": {...}}}', param=f"tools[{t}]", code="invalid_tools")
    if tool_choice is None or (isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES):
        return
    named = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(named, dict)
            or not isinstance(named.get("name"), str)):
        raise InvalidRequest('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}', param="tool_choice", code="invalid_tools")
    if not any(isinstance(tool, dict) and tool["function"]["name"] == named["name"] for tool in tools or ()):
        raise InvalidRequest("tool_choice names a function that is not among the tools", param="tool_choice",
                             code="invalid_tools")


def _settle_tool_call_arguments(tool_calls: Any) -> None:
    """Earlier tool calls whose ``arguments`` are not a JSON object (a model's broken output, sent back with the
    conversation) become ``"{}"``, as vLLM makes them itself (vllm/renderers/chat_utils.py) so the conversation can
    go on; done here, vLLM does not write a warning naming the tool (what the user's conversation holds) to its log,
    and a string nested too deep to decode cannot fail the engine. Anything else about the calls is vLLM's to judge."""
    if not isinstance(tool_calls, list):
        return
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(arguments, str) or not arguments:
            continue
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            function["arguments"] = "{}"  # type: ignore[index]


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str) and prompt:
        return
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return
    raise InvalidRequest("prompt must be a non-empty string or list of strings", param="prompt",
                         code="invalid_prompt")


def _shown(name: str) -> str:
    """A field name as an error may show it: an OpenAI-style name, never other text a client typed there."""
    return shown_name(name)
