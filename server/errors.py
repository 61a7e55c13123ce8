"""One error hierarchy, rendered the OpenAI way: ``{"error": {"message", "type", "param", "code"}}``.

    AirlockError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   └── BodyTooLarge              413 invalid_request_error
    ├── Unauthenticated               401 authentication_error (with WWW-Authenticate)
    ├── PermissionDenied              403 permission_error
    ├── TooManyFailures               429 rate_limit_error (with Retry-After)
    ├── RateLimited                   429 rate_limit_error (with Retry-After)
    ├── ModelNotFound                 404 not_found_error
    ├── RouteNotFound                 404 not_found_error
    ├── MethodNotAllowed              405 invalid_request_error
    ├── EngineUnavailable             503 server_error (with Retry-After)
    ├── Overloaded                    503 server_error (with Retry-After)
    ├── EngineFailed                  502 server_error
    └── EngineTimeout                 504 server_error

Messages are written for the user and never carry request content, credentials or addresses. Builtin
exceptions are never turned into 4xx: a bug in Airlock stays a 500 and is not blamed on the client.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from starlette.responses import Response

NO_STORE = {"cache-control": "no-store"}


class AirlockError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers = headers or {}

    def to_response(self) -> Response:
        return error_response(self.status, self.message, self.type, self.code, self.param, self.headers)


class InvalidRequest(AirlockError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class BodyTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class Unauthenticated(AirlockError):
    """Always the same message, whatever was wrong: no hint of which user, key or claim failed."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_credentials"


class PermissionDenied(AirlockError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class TooManyFailures(AirlockError):
    status = 429
    type = "rate_limit_error"
    default_code = "too_many_failed_logins"


class RateLimited(AirlockError):
    """A user's own limit: requests in progress, per minute, or waiting."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ModelNotFound(AirlockError):
    status = 404
    type = "not_found_error"
    default_code = "model_not_found"


class RouteNotFound(AirlockError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowed(AirlockError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class EngineUnavailable(AirlockError):
    status = 503
    default_code = "engine_unavailable"


class Overloaded(AirlockError):
    """The server as a whole is at capacity: the queue is full, or a request waited too long in it."""

    status = 503
    default_code = "overloaded"


class EngineFailed(AirlockError):
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


def translate_engine_error(status: int, raw: bytes) -> Response:
    """Turn an engine's error answer into what the client sees.

    A 4xx concerns the client's own request, so the engine's message is kept (it helps the user fix it) and put
    in OpenAI shape; a 5xx is the engine's problem and becomes a generic 502 whose message reveals nothing of
    the engine's internals.
    """
    if status >= 500 or status < 400:
        return EngineFailed("the model engine failed to answer this request; try again").to_response()
    message, param = _engine_message(raw)
    type_ = _TYPE_BY_STATUS.get(status, "invalid_request_error")
    code = "model_not_found" if status == 404 else "invalid_request"
    return error_response(status, message, type_, code, param)


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
    return message[:2000], param if isinstance(param, str) else None
