"""Request screening: what a request may carry before it reaches an engine.

Fields are on an allow-list (anything that changes how the server builds prompts or caches, such as
``mm_processor_kwargs`` or a per-request ``chat_template``, is refused); images must be inline ``data:`` URLs within
limits (see ``images``); a client's ``uuid`` on a content part (vLLM's multimodal cache key: another user could read
or poison the cached image) and a client's ``cache_salt`` are refused; ``max_tokens`` is capped, never filled in
(the engine bounds a missing one by what is left of its context, which only it knows); and the gateway sets
``cache_salt`` from the tenant, so the prefix cache is never shared across tenants. Types were checked when the
body was parsed (``payload``).

Fields of OpenAI's API that are about OpenAI's own service, not the answer (``store``, ``metadata``,
``service_tier``, ``prompt_cache_key``, ``safety_identifier``, ``verbosity``, ``user``, and ``modalities`` when
it asks for text), are accepted and left out of what the engine gets: nothing is stored here, there is one tier, and
an identifier of the user goes no further. So are the fields the SDK writes into the assistant message it returns
(``refusal``, ``annotations``, ``parsed``, and ``audio`` and ``function_call`` as null), so that a conversation can
send that message back as it came; a refusal with no content becomes the turn's content, as the model said it, and a
refusal part a text part.
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
# OpenAI's, about its service rather than the answer: accepted, checked, and not forwarded (the module docstring).
SERVICE_FIELDS: dict[str, frozenset[str] | None] = {  # the values OpenAI's API reference allows, where it lists them
    "store": None, "metadata": None, "prompt_cache_key": None, "safety_identifier": None,
    "service_tier": frozenset({"auto", "default", "flex", "scale", "priority"}),
    "verbosity": frozenset({"low", "medium", "high"}),
    "modalities": None,
}
FIELDS: dict[Route, frozenset[str]] = {
    "chat": _SAMPLING | SERVICE_FIELDS.keys() | {
        "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
        "reasoning_effort", "add_generation_prompt", "continue_final_message", "echo",
    },
    "completions": _SAMPLING | {"prompt", "echo", "suffix", "best_of"},
}
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "reasoning_content"})
# What the SDK's own assistant message (``ChatCompletionMessage``; ``parsed`` from ``ParsedChatCompletionMessage``, as
# the ``parse`` and ``stream`` helpers return it) carries besides those, sent back as it came in a conversation:
# accepted on an assistant message, and not forwarded (``_settle_sdk_echo``).
SDK_ECHO_FIELDS = frozenset({"refusal", "annotations", "audio", "function_call", "parsed"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
PART_FIELDS = {"text": frozenset({"type", "text"}), "image_url": frozenset({"type", "image_url"})}
# An assistant's refusal as a content part (OpenAI's, on assistant messages only): forwarded as the text part vLLM
# reads it as, so that the cost estimate and the documents' page budget count its text too.
REFUSAL_PART = frozenset({"type", "refusal"})
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
        if route == "chat":
            _drop_service_fields(payload)
        self._cap_tokens(payload)
        self._cap_constraints(payload)
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

    def _cap_constraints(self, payload: dict[str, Any]) -> None:
        """Refuse output constraints larger than ``screening.max_structured_output_bytes``: the engine compiles them
        into a grammar (xgrammar) before it answers, on its own CPU, and that grows faster than their size (the demo
        engine here: a JSON schema's enum of 8 KB took 0.4 s, 32 KB 0.8 s, 128 KB 5.2 s, 700 KB about a minute).
        ``tools`` count when vLLM enforces them with such a grammar: when ``tool_choice`` requires a call
        ("required" or a named function), and, unless it is "none", when a tool is ``strict`` (vLLM's
        ``VLLM_ENFORCE_STRICT_TOOL_CALLING``, on by default, compiles a strict tool's parameters into a structural
        tag even with "auto"). Otherwise they are only part of the prompt."""
        fields = ["response_format", "structured_outputs"]
        tool_choice, tools = payload.get("tool_choice"), payload.get("tools")
        strict = isinstance(tools, list) and any(
            isinstance(tool, dict) and isinstance(tool.get("function"), dict) and tool["function"].get("strict")
            for tool in tools)
        if tool_choice == "required" or isinstance(tool_choice, dict) or (strict and tool_choice != "none"):
            fields.append("tools")
        sizes = {field: len(json.dumps(payload[field], ensure_ascii=False, separators=(",", ":")).encode())
                 for field in fields if payload.get(field) is not None}
        limit = self._settings.max_structured_output_bytes
        if sum(sizes.values()) > limit:
            raise InvalidRequest(
                f"the output constraints ({', '.join(sizes)}) take {sum(sizes.values())} bytes, above this server's "
                f"limit of {limit}: the engine compiles them before answering, which takes seconds at this size",
                param=max(sizes, key=sizes.__getitem__), code="structured_output_too_large")

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
            role = message.get("role")
            assistant = role == "assistant"
            unknown = set(message) - MESSAGE_FIELDS - (SDK_ECHO_FIELDS if assistant else frozenset())
            if unknown:
                raise InvalidRequest(f"{where} has a field this server does not accept: '{_shown(min(unknown))}'",
                                     param=where, code="field_not_allowed")
            if not isinstance(role, str) or role not in ROLES:
                raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(ROLES))}", param=where,
                                     code="invalid_messages")
            if message.get("tool_calls") is not None:
                _settle_tool_call_arguments(message["tool_calls"])
            if assistant and not SDK_ECHO_FIELDS.isdisjoint(message):
                _settle_sdk_echo(message, where)
            content = message.get("content")
            if content is None or isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise InvalidRequest(f"{where}.content must be a string or a list of parts", param=where,
                                     code="invalid_messages")
            for p, part in enumerate(content):
                if assistant and isinstance(part, dict) and part.get("type") == "refusal":
                    _settle_refusal_part(part, f"{where}.content[{p}]")
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
            raise InvalidRequest(f"{where} must be a part of type text or image_url (or refusal, from an assistant)",
                                 param=where, code="unsupported_content")
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


def _drop_service_fields(payload: dict[str, Any]) -> None:
    """``SERVICE_FIELDS`` checked as OpenAI checks them (a value outside its list, or output other than text, is a
    400) and taken out of ``payload``."""
    for field, allowed in SERVICE_FIELDS.items():
        value = payload.pop(field, None)
        if value is None:
            continue
        if allowed is not None and value not in allowed:
            raise InvalidRequest(f"{field} must be one of {', '.join(sorted(allowed))}", param=field,
                                 code="invalid_value")
        if field == "modalities" and any(modality != "text" for modality in value):
            raise InvalidRequest("this server answers in text only: modalities may only be [\"text\"]",
                                 param=field, code="unsupported_modality")


def _settle_refusal_part(part: dict[str, Any], where: str) -> None:
    """An assistant's refusal part (``REFUSAL_PART``) made the text part it is for the engine, in place."""
    if set(part) - REFUSAL_PART:
        unknown = min(set(part) - REFUSAL_PART)
        raise InvalidRequest(f"{where} has a field this server does not accept: '{_shown(unknown)}'", param=where,
                             code="field_not_allowed")
    if not isinstance(part.get("refusal"), str):
        raise InvalidRequest(f"{where}.refusal must be a string", param=where, code="invalid_messages")
    text = part.pop("refusal")
    part.update(type="text", text=text)


def _settle_sdk_echo(message: dict[str, Any], where: str) -> None:
    """The SDK's assistant message sent back (``SDK_ECHO_FIELDS``): its ``refusal`` becomes the content when there is
    none, and the rest goes (``parsed`` repeats the content). Audio and the deprecated ``function_call`` are refused
    unless null: this server answers neither, so a non-null one came from elsewhere and would be lost."""
    for field in ("audio", "function_call"):
        if message.get(field) is not None:
            hint = "send tool_calls instead" if field == "function_call" else "this server answers in text only"
            raise InvalidRequest(f"{where}.{field} is not accepted: {hint}", param=where, code="field_not_allowed")
    annotations = message.get("annotations")
    if annotations is not None and not isinstance(annotations, list):
        raise InvalidRequest(f"{where}.annotations must be an array", param=where, code="invalid_messages")
    refusal = message.get("refusal")
    if refusal is not None and not isinstance(refusal, str):
        raise InvalidRequest(f"{where}.refusal must be a string", param=where, code="invalid_messages")
    for field in SDK_ECHO_FIELDS:
        message.pop(field, None)
    if refusal and not message.get("content"):
        message["content"] = refusal


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str) and prompt:
        return
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return
    # Token IDs are not taken: the queue's cost estimate reads a prompt's characters (admission.estimate_cost).
    raise InvalidRequest("prompt must be a non-empty string or list of strings (token IDs are not accepted)",
                         param="prompt", code="invalid_prompt")


def _shown(name: str) -> str:
    """A field name as an error may show it: an OpenAI-style name, never other text a client typed there."""
    return shown_name(name)
