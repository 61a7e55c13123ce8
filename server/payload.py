"""The request body as a JSON object whose fields the gateway reads are of the types OpenAI documents.

A body is decoded by orjson where it reads it as Python's json with this module's hooks would (``_quick_decode``),
else by the latter (``_decode``), the reference for everything below. Every way a body can break a later step is
refused here with a 400, before anything else reads it:

- bytes that are not UTF-8 (JSON on the wire is UTF-8, RFC 8259 section 8.1);
- nesting deeper than ``screening.max_json_depth``: Python's decoder recurses once per level and stops with
  ``RecursionError`` near a thousand levels (refused as too deep); anything it decodes is measured after, walking
  the containers only (scanning the raw bytes first cost more than decoding them, for bodies of megabytes of
  images);
- ``NaN``, ``Infinity``, numbers out of a float's range and integers too long to convert (Python accepts the first
  two and refuses the last with a ``ValueError``; none is JSON an OpenAI client sends);
- strings that are not valid Unicode: an escaped lone UTF-16 surrogate (``"\\ud83d"``, half an emoji) decodes
  to a Python string that cannot be encoded again, so forwarding it would fail;
- the fields the gateway interprets (``stream``, ``n``, ``max_tokens``, ...) with a type OpenAI refuses. vLLM's
  pydantic models are lax (``"stream": "yes"`` is true there); OpenAI is strict, and so is the gateway. ``null``
  is accepted wherever OpenAI and vLLM accept it: it means the field is absent.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any

import orjson

from .errors import InvalidRequest

# What the depth is read from: quotes (once escaped ones are gone) and brackets.
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
# An opener counts 2 and a closer 0, so the depth after i brackets is the sum of the first i, minus i.
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
# An escaped UTF-16 surrogate, paired or not: only then can a decoded string hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A key shown in an error's field path: a name in OpenAI's style (every field of its API is lower-case snake_case).
# Other keys (a schema's property names, say) may be something a user typed, and are shown as <key>.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Integers are 64-bit in OpenAI's API (a seed) and in vLLM's sampling: a larger one (a top_k of 2**64) fails inside
# the engine with a 500. Longer text is not even converted.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_INTEGER_DIGITS = 19

# The fields the gateway reads, and what OpenAI's API reference says each one is.
_BOOLEAN, _INTEGER, _NUMBER, _OBJECT = "a boolean", "an integer", "a number", "an object"
_ARRAY, _STRING, _STRING_OR_OBJECT = "an array", "a string", "a string or an object"
TYPED_FIELDS = {
    "stream": _BOOLEAN,
    "stream_options": _OBJECT,
    "n": _INTEGER,
    "best_of": _INTEGER,
    "max_tokens": _INTEGER,
    "max_completion_tokens": _INTEGER,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    # vLLM reads these as objects before its own validation does (a string made it answer 500).
    "response_format": _OBJECT,
    "structured_outputs": _OBJECT,
    "logit_bias": _OBJECT,
    "tools": _ARRAY,
    "tool_choice": _STRING_OR_OBJECT,
    "parallel_tool_calls": _BOOLEAN,
    # About OpenAI's service, not the answer: checked, then left out of what the engine gets (``screening``).
    "store": _BOOLEAN,
    "metadata": _OBJECT,
    "service_tier": _STRING,
    "prompt_cache_key": _STRING,
    "safety_identifier": _STRING,
    "verbosity": _STRING,
    "modalities": _ARRAY,
}
STREAM_OPTIONS = {"include_usage": _BOOLEAN, "continuous_usage_stats": _BOOLEAN}


def parse_request(body: bytes, max_depth: int) -> dict[str, Any]:
    """The JSON object of an OpenAI request, with a ``model`` string and the interpreted fields well typed."""
    payload = _quick_decode(body)
    if payload is _UNDECIDED:
        payload = _decode(body, max_depth)
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    _check_depth(payload, max_depth)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model", code="missing_model")
    check_types(payload)
    return payload


def _quick_decode(body: bytes) -> Any:
    """The body as orjson decodes it, when that is what the reference decoder (``_decode``) would give; else
    ``_UNDECIDED``. orjson parses a department's 675 KB page request in 0.19 ms where json takes 0.42, and the UTF-8
    check and the surrogate scan (0.2 ms each) come with it; this runs on the event loop's thread.

    What orjson refuses (a byte order mark, invalid UTF-8, ``NaN``, a number out of a float's range, an escaped lone
    surrogate, 1,024 levels) goes to the reference decoder, which accepts or refuses it as before, with its own
    message. What orjson accepts differently is found in its result: integers outside 64 bits (it gives them up to
    unsigned 64 bits, and a float beyond), so an integer outside the signed range, or a float as large as one, also
    goes to the reference decoder. orjson combines surrogate pairs as json does, and keeps a repeated key's last
    value, as json does."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _UNDECIDED
    pending = [payload]
    while pending:  # scalars are few (a body of megabytes of images is a few dozen values)
        value = pending.pop()
        for child in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            kind = type(child)
            if kind is dict or kind is list:
                pending.append(child)
            elif (kind is int and not INT64_MIN <= child <= INT64_MAX) or (kind is float and abs(child) >= 2.0**63):
                return _UNDECIDED
    return payload


def _decode(body: bytes, max_depth: int) -> Any:
    """The reference decoder: Python's json with the hooks below, for what ``_quick_decode`` leaves undecided."""
    try:
        # A byte order mark is allowed, as Python's json (and so vLLM) allows it; str() of a view copies nothing more.
        text = str(memoryview(body)[3:], "utf-8") if body.startswith(codecs.BOM_UTF8) else body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (at byte {exc.start})", code="invalid_json") from exc
    try:
        payload = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON (line {exc.lineno}, column {exc.colno})",
                             code="invalid_json") from exc
    except RecursionError as exc:
        # Python's decoder recurses once per level and stops cleanly at its recursion limit (about a thousand
        # levels, far above the setting's highest value): deeper than any limit.
        raise _too_deep(max_depth) from exc
    if "\\" in text and _SURROGATE_ESCAPE.search(text) and isinstance(payload, dict):
        _check_depth(payload, max_depth)  # before the recursive walk below
        _check_unicode(payload, "")
    return payload


def check_types(payload: dict[str, Any]) -> None:
    """``InvalidRequest`` naming the first interpreted field whose type OpenAI would refuse.

    The request's own fields are looked at (a few), not every interpreted one (over twenty); only when one is refused
    are they checked in ``TYPED_FIELDS``' order, so that the same one is named first whatever the body's order.
    """
    for field in payload:
        expected = TYPED_FIELDS.get(field)
        if expected is not None and not _fits(payload[field], expected):
            _check_in_order(payload)
    options = payload.get("stream_options")
    if options is not None:
        for field, expected in STREAM_OPTIONS.items():
            _check_type(options.get(field), expected, f"stream_options.{field}")


def _check_in_order(payload: dict[str, Any]) -> None:
    for field, expected in TYPED_FIELDS.items():
        _check_type(payload.get(field), expected, field)


def _check_type(value: object, expected: str, param: str) -> None:
    if not _fits(value, expected):
        raise InvalidRequest(f"invalid type for '{param}': expected {expected}, but got {_kind(value)} instead",
                             param=param, code="invalid_type")


def _fits(value: object, expected: str) -> bool:
    """Whether ``value`` is of the ``expected`` kind (``null`` always is: the field is then absent)."""
    if value is None:
        return True
    if expected == _BOOLEAN:
        fits = isinstance(value, bool)
    elif expected == _OBJECT:
        fits = isinstance(value, dict)
    elif expected == _ARRAY:
        fits = isinstance(value, list)
    elif expected == _STRING:
        fits = isinstance(value, str)
    elif expected == _STRING_OR_OBJECT:
        fits = isinstance(value, (str, dict))
    elif isinstance(value, bool):  # a bool is an int in Python, never in JSON
        fits = False
    elif expected == _INTEGER:
        # JSON Schema's integer (and pydantic's): 2.0 is one, 2.5 is not.
        fits = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    else:
        fits = isinstance(value, (int, float))
    return fits


def _kind(value: object) -> str:
    """The JSON type of ``value``, as OpenAI's own messages name it (never the value itself)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_depth(payload: Any, max_depth: int) -> None:
    """``InvalidRequest`` when arrays and objects nest deeper than ``max_depth`` (the top-level object, ``payload``,
    is one level), walked without recursion. Only containers are visited: a body of megabytes of images, or one
    long string, is a few nodes."""
    pending: list[tuple[Any, int]] = [(payload, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        depth += 1
        for child in value.values() if isinstance(value, dict) else value:  # a plain loop: half a generator's cost
            if isinstance(child, (dict, list)):
                pending.append((child, depth))


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(f"the request's JSON nests deeper than this server's limit of {max_depth} levels",
                          code="json_too_deep")


def _check_unicode(value: Any, path: str) -> None:
    """``InvalidRequest`` naming where a string (or an object's key) holds a lone surrogate; the depth is bounded
    already, so recursion is safe here."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise InvalidRequest(f"{path or 'the request'} is not valid Unicode (a lone UTF-16 surrogate, such as "
                                 "half an emoji)", param=path or None, code="invalid_unicode")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                where = f"a key in {path}" if path else "a top-level key"
                raise InvalidRequest(f"{where} is not valid Unicode (a lone UTF-16 surrogate, such as half an "
                                     "emoji)", param=path or None, code="invalid_unicode")
            _check_unicode(item, f"{path}.{shown_name(key)}" if path else shown_name(key))


def shown_name(key: str) -> str:
    """A key as it may appear in a message: a field name, or a placeholder for anything a user may have typed."""
    return key if _NAME.fullmatch(key) else "<key>"


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"request body is not valid JSON ({name} is not a JSON number)", code="invalid_json")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest("a number in the request is out of range", code="invalid_json")
    return value


def _integer(text: str) -> int:
    value = int(text) if len(text.lstrip("-")) <= MAX_INTEGER_DIGITS else None
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRequest("an integer in the request is out of range (64-bit integers only)",
                             code="invalid_json")
    return value


# What _quick_decode returns when the reference decoder is to decide.
_UNDECIDED = object()
# Built once: json.loads with any option builds a decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite, parse_int=_integer)
