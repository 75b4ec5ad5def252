"""Request errors and limits of the scorer service: item count, text length, valid Unicode.

Each check answers with a 4xx JSON error that names what was wrong, before any model work. (Body
size, body read time and the bearer token are checked earlier, before the body is parsed:
:mod:`alignment.scoring.gate`.)
"""

from __future__ import annotations

from dataclasses import dataclass


class ApiError(Exception):
    """An error the service answers as JSON ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class RequestLimits:
    max_items: int
    max_text_chars: int


def check_texts(limits: RequestLimits, field: str, texts: list[str]) -> None:
    """Raise an ``ApiError`` (413 or 422) naming ``field`` when ``texts`` exceed the limits.

    JSON can carry a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode character: the
    tokenizer cannot encode it, so it is the sender's error (422), found here before it can fail
    a batch shared with other callers.
    """
    if len(texts) > limits.max_items:
        raise ApiError(413, f"{field} has {len(texts)} items; at most {limits.max_items} per request")
    for i, text in enumerate(texts):
        if len(text) > limits.max_text_chars:
            raise ApiError(
                413, f"{field}[{i}] has {len(text)} characters; at most {limits.max_text_chars} per text"
            )
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(
                    422,
                    f"{field}[{i}] is not valid Unicode: lone surrogate {text[exc.start]!r} at "
                    f"character {exc.start}",
                ) from None
