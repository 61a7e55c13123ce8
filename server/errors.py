"""One error hierarchy, rendered the OpenAI way: ``{"error": {"message", "type", "param", "code"}}``.

    class                             status  OpenAI type            metric reason (airlock_rejected_requests)
    AirlockError                      500 server_error           -  (a bug in the gateway)
    ├── InvalidRequest                400 invalid_request_error  screening
    │   ├── BodyTooLarge              413 invalid_request_error  screening
    │   ├── UnsupportedMediaType      415 invalid_request_error  screening
    │   ├── DocumentTooLarge          413 invalid_request_error  screening (one document above documents.max_bytes)
    │   └── UnprocessableDocument     422 invalid_request_error  screening (a document the renderer cannot take)
    ├── Unauthenticated               401 authentication_error   auth (with WWW-Authenticate)
    ├── PermissionDenied              403 permission_error       forbidden
    ├── TooManyFailures               429 rate_limit_error       auth (with Retry-After)
    ├── RateLimited                   429 rate_limit_error       limits (with Retry-After)
    ├── ModelNotFound                 404 not_found_error        not_found
    ├── RouteNotFound                 404 not_found_error        not_found
    ├── MethodNotAllowed              405 invalid_request_error  not_found (with Allow)
    ├── EngineUnavailable             503 server_error           no_engine (with Retry-After)
    ├── Overloaded                    503 server_error           queue (with Retry-After)
    ├── EngineRejected                4xx as the engine answered -  (the engine's own refusal of this request)
    ├── EngineFailed                  502 server_error           -  (counted in airlock_upstream_errors)
    └── EngineTimeout                 504 server_error           -  (counted in airlock_upstream_errors)

Each class carries its status, type, default code and metric reason, so a refusal is counted by what it is, not by
what its class is called. Rendering happens in one place (``server.boundary``): an OpenAI error body before the
response has started, an SSE error event after. Messages are written for the user and never carry request content,
credentials or addresses. Builtin exceptions are never turned into 4xx: a bug in Airlock stays a 500 and is not
blamed on the client.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, ClassVar

from starlette.responses import Response

NO_STORE = {"cache-control": "no-store"}


class AirlockError(Exception):
    status: int = 500
    type: str = "server_error"
    default_code: ClassVar[str] = "internal_error"
    # The reason label of airlock_rejected_requests_total; None for failures (the gateway's or an engine's).
    reason: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["retry-after"] = str(retry_after_s)

    def to_response(self) -> Response:
        """The OpenAI error answer, for a response that has not started."""
        return error_response(self.status, self.message, self.type, self.code, self.param, self.headers)

    def to_event(self) -> bytes:
        """The same error as a server-sent event, for a stream that has already started (OpenAI's SDKs raise it)."""
        return b"data: " + error_body(self.message, self.type, self.code, self.param) + b"\n\n"


class InvalidRequest(AirlockError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"
    reason = "screening"


class BodyTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes")


class UnsupportedMediaType(InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"


class DocumentTooLarge(InvalidRequest):
    """One document's bytes are above ``documents.max_bytes`` (the body as a whole was within its own limit): the
    content is larger than the server is willing to process (RFC 9110, 15.5.14)."""

    status = 413
    default_code = "document_too_large"


class UnprocessableDocument(InvalidRequest):
    """A well-formed request whose document cannot be rendered within the limits (a worker that ran out of memory
    or CPU time, or crashed on it): the request is understood, the document is not."""

    status = 422
    default_code = "document_unprocessable"


class Unauthenticated(AirlockError):
    """Always the same message, whatever was wrong: no hint of which user, key or claim failed."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_credentials"
    reason = "auth"


class PermissionDenied(AirlockError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"
    reason = "forbidden"


class TooManyFailures(AirlockError):
    status = 429
    type = "rate_limit_error"
    default_code = "too_many_failed_logins"
    reason = "auth"


class RateLimited(AirlockError):
    """A user's own limit: requests in progress, per minute, or waiting."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    reason = "limits"


class ModelNotFound(AirlockError):
    status = 404
    type = "not_found_error"
    default_code = "model_not_found"
    reason = "not_found"


class RouteNotFound(AirlockError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"
    reason = "not_found"


class MethodNotAllowed(AirlockError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"
    reason = "not_found"


class EngineUnavailable(AirlockError):
    status = 503
    default_code = "engine_unavailable"
    reason = "no_engine"


class Overloaded(AirlockError):
    """The server as a whole is at capacity: the queue is full, or a request waited too long in it."""

    status = 503
    default_code = "overloaded"
    reason = "queue"


class EngineFailed(AirlockError):
    """An engine failed (an error status, a broken answer); its own message is never shown."""

    status = 502
    default_code = "engine_error"


class EngineTimeout(AirlockError):
    status = 504
    default_code = "engine_timeout"


# OpenAI error types by status, for errors that come back from an engine.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        error_body(message, type_, code, param),
        status_code=status,
        media_type="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


class EngineRejected(AirlockError):
    """An engine's 4xx about the client's own request: its status and message are kept (they help the user fix the
    request), put in OpenAI shape. Not one of the gateway's refusals, so it has no metric reason."""

    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message, code="model_not_found" if status == 404 else "invalid_request", param=param)
        self.status = status
        self.type = _TYPE_BY_STATUS.get(status, "invalid_request_error")


def translate_engine_error(status: int, raw: bytes) -> AirlockError:
    """What the client is told of an engine's error answer ``raw`` with HTTP ``status``.

    A 4xx concerns the client's own request and keeps the engine's message; a 5xx is the engine's problem and
    becomes a generic 502 whose message reveals nothing of the engine's internals.
    """
    if status >= 500 or status < 400:
        return EngineFailed("the model engine failed to answer this request; try again")
    message, param = _engine_message(raw)
    return EngineRejected(status, message, param)


def _engine_message(raw: bytes) -> tuple[str, str | None]:
    fallback = "the model engine rejected this request"
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        return fallback, None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return fallback, None
    message = error.get("message")
    param = error.get("param")
    if not isinstance(message, str) or not message:
        message = fallback
    elif VALIDATION_ERRORS.match(message):
        message = _without_inputs(message) or fallback
    elif PYDANTIC_ERRORS.match(message):
        message = _pydantic_without_inputs(message) or fallback
    else:
        message = _without_values(message) or fallback
    # vLLM names a field of the body as "body.<field>"; OpenAI's param is the field alone.
    return message[:2000], param.removeprefix("body.") if isinstance(param, str) else None


# vLLM's answer to a request its pydantic models refuse: a count, then one Python dict per error, each repeating the
# offending value under 'input' (vllm/entrypoints/serve/exception_handling/handlers/validation.py).
VALIDATION_ERRORS = re.compile(r"\d+ validation errors?:\n")
# Pydantic's own text of a ValidationError (``str(error)``), which vLLM passes on from a check inside its request
# handling (a content part it reads on its own: an image_url's ``detail``, say): a count and a title, then for each
# error its location, an indented message ending in "[type=..., input_value=..., input_type=...]", and a
# further-indented link (pydantic_core's ``ValidationError.__str__``; a validator's message may span lines).
PYDANTIC_ERRORS = re.compile(r"\d+ validation errors? for [^\n]+\n")
# An error's details: its type, then (unless hidden) the input again. The first such bracket ends the message.
PYDANTIC_DETAILS = re.compile(r"(.*?) \[type=([a-z_]+)[,\]]", re.DOTALL)
LOCATION_PART = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}|\d{1,9}")
# Error types whose message is pydantic's own template, naming what was expected and never the input
# (pydantic_core's ErrorType messages); any other (a validator's text, a union's tag) is shown without values.
TEMPLATE_ONLY = frozenset({
    "missing", "literal_error", "enum", "extra_forbidden", "none_required", "string_type", "int_type", "int_parsing",
    "int_from_float", "float_type", "float_parsing", "bool_type", "bool_parsing", "dict_type", "list_type",
    "model_type", "model_attributes_type", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
    "too_short", "too_long", "string_too_short", "string_too_long", "union_tag_not_found", "finite_number",
})


# What in an engine's message may repeat what the client sent: vLLM's "(parameter=..., value=...)" suffix
# (vllm/exceptions.py, VLLMValidationError), and quoted or bracketed text ("Unsupported type \"...\"", "token IDs:
# ['...']"). Numbers stay: "maximum context length is 4096 tokens" is what a user needs to fix the request.
PARAMETER_SUFFIX = re.compile(r"\s*\(parameter=[^()]*?(?:, value=.*)?\)\s*$", re.DOTALL)
QUOTED = re.compile(r"(?<!\w)'[^'\n]*'|\"[^\"\n]*\"|\[[^\]\n]*\]")
# A bracketed range of numbers is the engine's limit ("temperature must be in [0, 2]"), not the client's text.
NUMBERS = re.compile(r"\[[-+0-9.,e ]*(?:inf)?\]")
# Pydantic's own messages name types and allowed values, never the input; a validator's text may hold anything.
VALIDATOR_TEXT = ("Value error", "Assertion failed")


# vLLM puts field names in backticks (`tool_choice`), and sometimes a value too: only a field name stays.
BACKTICKED = re.compile(r"`([^`\n]*)`")
FIELD_NAME = re.compile(r"[a-z][a-z0-9_.]{0,63}")


def _without_values(message: str) -> str:
    """``message`` with anything that may be a value the client sent left out (shown as ``...``)."""
    message = PARAMETER_SUFFIX.sub("", message)
    message = BACKTICKED.sub(lambda name: name.group(0) if FIELD_NAME.fullmatch(name.group(1)) else "`...`", message)
    return QUOTED.sub(lambda quoted: quoted.group(0) if NUMBERS.fullmatch(quoted.group(0))
                      else quoted.group(0)[0] + "..." + quoted.group(0)[-1], message)


def _pydantic_without_inputs(message: str) -> str:
    """Pydantic's text of a ValidationError (``PYDANTIC_ERRORS``) as ``location: what is wrong`` lines. Each error's
    message (its lines up to the one holding its details bracket) is cut at that bracket, which repeats the input;
    only messages of ``TEMPLATE_ONLY`` types are kept whole, others go without values; a location's parts that are
    not names or indices (a dict's keys may be the client's) show as ``[...]``."""
    errors: list[tuple[str, list[str]]] = []
    complete = True  # the last error's message has reached its details: what follows is a link or a location
    for line in message.splitlines()[1:]:
        if complete:
            if not line.startswith("    For further information"):
                errors.append((line.strip(), []))
                complete = False
        else:
            errors[-1][1].append(line.strip())
            complete = PYDANTIC_DETAILS.match(line) is not None
    shown = []
    for location, text in errors:
        where = ".".join(part if LOCATION_PART.fullmatch(part) else "[...]" for part in location.split("."))
        details = PYDANTIC_DETAILS.match(" ".join(text))
        what, kind = details.groups() if details else (" ".join(text), "")
        if kind not in TEMPLATE_ONLY or what.startswith(VALIDATOR_TEXT):
            what = _without_values(what) or "invalid value"
        shown.append(f"{where}: {what}")
    return "; ".join(shown)


def _without_inputs(message: str) -> str:
    """vLLM's validation errors as ``field: what is wrong`` lines, without the values the client sent (a message may
    name a field, never echo what was in it). Lines that cannot be read are left out."""
    lines = []
    for line in message.splitlines()[1:]:
        try:
            entry = ast.literal_eval(line.strip())  # literals only: nothing is evaluated
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("msg"), str):
            where = entry.get("loc")
            where = where.removeprefix("body.") if isinstance(where, str) else "the request"
            what = entry["msg"]
            lines.append(f"{where}: {_without_values(what) if what.startswith(VALIDATOR_TEXT) else what}")
    return "; ".join(lines)
