"""Request bodies parsed within bounds: the memory a body takes is a small multiple of its size.

``json.loads`` builds whatever a body describes: 48 MB of ``["ab","ab",...]`` is 9.6 million
string objects (about 570 MB), 48 MB of ``[0.5,0.5,...]`` made pydantic collect 8 million
validation errors, and the framework kept the raw body, its decoded text and the parsed object
alive until the answer was sent. :func:`load_json` parses the same JSON as ``json.loads`` (the
same values, the same error messages, strings decoded by the same C ``scanstring``) but stops at
``max_values`` values (no valid request has more than its lists' item limits allow: 413) and at
``MAX_DEPTH`` levels of nesting (422); :func:`parse_request` decodes, parses and validates a body
and drops each intermediate as soon as the next one exists.
"""

from __future__ import annotations

import json
import re
from json.decoder import JSONDecodeError, scanstring
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from alignment.scoring.limits import ApiError

MAX_DEPTH = 64  # a valid request is 2 levels deep; json.loads only stops at Python's recursion limit
VALUE_SLACK = 64  # values beyond what a valid request can hold, so small mistakes get pydantic's errors

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_CONSTANTS = {
    "null": None, "true": True, "false": False,
    "NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf"),
}  # fmt: skip
_CONSTANT_STARTS = {"n": "null", "t": "true", "f": "false", "N": "NaN", "I": "Infinity", "-": "-Infinity"}

M = TypeVar("M", bound=BaseModel)


class TooManyValues(ValueError):
    """The body holds more JSON values than ``max_values``."""


class TooDeep(ValueError):
    """The body nests arrays and objects deeper than ``MAX_DEPTH``."""


def max_values_for(model: type[BaseModel], max_items: int) -> int:
    """Values in the largest valid body of ``model``: an object of lists of ``max_items`` scalars."""
    return 1 + len(model.model_fields) * (1 + max_items) + VALUE_SLACK


def _scalar(s: str, pos: int) -> tuple[Any, int]:
    """A number or constant at ``pos`` (as ``json.loads`` reads it), and the index after it."""
    number = _NUMBER.match(s, pos)
    if number is not None:
        integer, frac, exp = number.groups()
        if frac or exp:
            return float(integer + (frac or "") + (exp or "")), number.end()
        return int(integer), number.end()
    name = _CONSTANT_STARTS.get(s[pos : pos + 1])
    if name is not None and s.startswith(name, pos):
        return _CONSTANTS[name], pos + len(name)
    raise JSONDecodeError("Expecting value", s, pos)


def load_json(s: str, max_values: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(s)``, raising :class:`TooManyValues` past ``max_values`` values (strings,
    numbers, constants, arrays and objects each count one) and :class:`TooDeep` past ``max_depth``
    levels, before building them. Iterative: no recursion, whatever the nesting."""
    values = 0
    stack: list[list[Any]] = []  # [container, key of the value being read (objects)]
    pos = _WS.match(s, 0).end()  # type: ignore[union-attr]
    while True:
        # one value at pos
        values += 1
        if values > max_values:
            raise TooManyValues(f"the body holds more than {max_values} JSON values")
        char = s[pos : pos + 1]
        if char == '"':
            value, pos = scanstring(s, pos + 1, True)
        elif char in ("{", "["):
            if len(stack) >= max_depth:
                raise TooDeep(f"the body nests arrays and objects deeper than {max_depth} levels")
            container: Any = {} if char == "{" else []
            pos = _WS.match(s, pos + 1).end()  # type: ignore[union-attr]
            closer = "}" if char == "{" else "]"
            if s[pos : pos + 1] == closer:
                value, pos = container, pos + 1
            else:
                stack.append([container, None])
                if char == "{":
                    pos = _key(s, pos, stack[-1])
                continue
        else:
            value, pos = _scalar(s, pos)
        # attach it to its container; close the containers it completes
        while True:
            if not stack:
                end = _WS.match(s, pos).end()  # type: ignore[union-attr]
                if end != len(s):
                    raise JSONDecodeError("Extra data", s, end)
                return value
            frame = stack[-1]
            container = frame[0]
            if isinstance(container, dict):
                container[frame[1]] = value  # a repeated key keeps its last value, as json.loads does
            else:
                container.append(value)
            pos = _WS.match(s, pos).end()  # type: ignore[union-attr]
            char = s[pos : pos + 1]
            if char == ",":
                pos = _WS.match(s, pos + 1).end()  # type: ignore[union-attr]
                if isinstance(container, dict):
                    pos = _key(s, pos, frame)
                break
            if char == ("}" if isinstance(container, dict) else "]"):
                stack.pop()
                value, pos = container, pos + 1
                continue
            raise JSONDecodeError("Expecting ',' delimiter", s, pos)


def _key(s: str, pos: int, frame: list[Any]) -> int:
    """Read ``"key":`` at ``pos`` into ``frame``; the index of the value after it."""
    if s[pos : pos + 1] != '"':
        raise JSONDecodeError("Expecting property name enclosed in double quotes", s, pos)
    frame[1], pos = scanstring(s, pos + 1, True)
    pos = _WS.match(s, pos).end()  # type: ignore[union-attr]
    if s[pos : pos + 1] != ":":
        raise JSONDecodeError("Expecting ':' delimiter", s, pos)
    return _WS.match(s, pos + 1).end()  # type: ignore[union-attr]


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _invalid(kind: str, message: str, loc: tuple = ("body",), **ctx: Any) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": loc, "msg": message, "ctx": ctx}])


def parse_request(body: bytearray | bytes, content_type: str | None, model: type[M], max_values: int) -> M:
    """The request ``model`` a JSON body holds. Empties ``body`` (a bytearray) once decoded.

    Raises ``RequestValidationError`` (answered 422 naming the fields, as FastAPI's own parsing
    does), or :class:`~alignment.scoring.limits.ApiError` (400: not UTF-8 encoded JSON; 413:
    more values than any valid request holds; 422: nested too deep).
    """
    if not body:
        raise _invalid("missing", "Field required")
    if not _is_json(content_type):
        raise _invalid("content_type", f"Content-Type {content_type!r} is not JSON; send application/json")
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # what json.loads does
    except (UnicodeDecodeError, LookupError):
        raise ApiError(400, "request body could not be parsed: it must be UTF-8 encoded JSON") from None
    if isinstance(body, bytearray):
        body.clear()  # the caller's copy: gone before the parsed one is built
    if text.startswith("\ufeff"):
        raise _invalid("json_invalid", "JSON decode error", error="Unexpected UTF-8 BOM")
    try:
        data = load_json(text, max_values)
    except JSONDecodeError as exc:
        raise _invalid("json_invalid", "JSON decode error", ("body", exc.pos), error=exc.msg) from None
    except TooManyValues as exc:
        raise ApiError(413, f"{exc}; a request holds at most its item limit per list") from None
    except TooDeep as exc:
        raise ApiError(422, str(exc)) from None
    except ValueError as exc:  # a number too long to convert
        raise _invalid("json_invalid", "JSON decode error", error=str(exc)) from None
    del text
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {k: v for k, v in e.items() if k != "input"} | {"loc": ("body", *e["loc"])} for e in exc.errors()
        ]
        raise RequestValidationError(errors) from None
