"""The JSON body of an OpenAI request (placeholder: helper "input" replaces it with the bounded parser)."""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRequest


def parse_request(body: bytes, max_depth: int) -> dict[str, Any]:
    """The JSON object of an OpenAI request, with a ``model`` string."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model", code="missing_model")
    return payload
