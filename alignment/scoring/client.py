"""The one client of the scorer service, shared by the ES trainer, GRPO reward and evaluation.

    client = ScorerClient()                     # url="auto": read logs/scorer_address.json
    scores = client.score(prompts, responses)   # scores.rewards, scores.costs

Large calls are split into requests of ``batch_size`` items, sent concurrently. Connection errors,
timeouts and 5xx answers are retried with exponential backoff and jitter (tenacity; a 503's
``Retry-After`` is honoured); 4xx answers are not retried. When the retries are used up the client
raises :class:`ScorerUnavailableError`: it never returns made-up scores (zeros for a failed request
silently corrupt training). An answer whose scores are not finite numbers, or whose ``truncated``
indices are out of range, is a :class:`ScorerError`, never a score.

With ``url="auto"`` the URL and the bearer token come from one reading of the address file; that
token is sent only to that URL.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
)

from alignment.scoring.address import ScorerAddress, default_address_file, read_address

logger = logging.getLogger(__name__)

TOKEN_ENV = "SCORER_TOKEN"
URL_ENV = "SCORER_URL"


class ScorerError(RuntimeError):
    """Base class of scorer-client errors."""


class ScorerRequestError(ScorerError):
    """The scorer rejected the request (4xx): retrying the same request cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"scorer rejected the request ({status}): {message}")
        self.status, self.message = status, message


class ScorerUnavailableError(ScorerError):
    """The scorer could not be reached or kept failing after every retry."""


@dataclass
class Scores:
    """Scores aligned with the input: ``rewards[i]``, ``costs[i]``; ``truncated`` lists cut items."""

    rewards: list[float]
    costs: list[float]
    truncated: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rewards)


class _ServerError(Exception):
    """A 5xx answer: retried like a connection error (after ``retry_after`` seconds when given)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # absent, or an HTTP date: fall back to the exponential backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, _ServerError, FileNotFoundError))


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error") or body.get("detail") or body)
    except ValueError:
        return response.text[:500]


def _check_strings(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return list(values)


def _numbers(route: str, name: str, values: object, size: int) -> list[float]:
    if not isinstance(values, list) or len(values) != size:
        raise ScorerError(f"scorer answered {route} with {name} that is not a list of {size} numbers")
    out = []
    for i, v in enumerate(values):
        # bool is an int in Python and json.loads turns NaN/Infinity into floats: neither is a score
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ScorerError(f"scorer answered {route} with {name}[{i}] = {v!r}, not a finite number")
        out.append(float(v))
    return out


def _indices(route: str, values: object, size: int) -> list[int]:
    if not isinstance(values, list):
        raise ScorerError(f"scorer answered {route} with truncated = {values!r:.100}, not a list")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size:
            raise ScorerError(
                f"scorer answered {route} with truncated index {v!r}, not an item index of 0..{size - 1}"
            )
    if len(set(values)) != len(values):
        raise ScorerError(f"scorer answered {route} with repeated truncated indices {values!r:.100}")
    return list(values)


def check_answer(route: str, answer: object, size: int) -> Scores:
    """The scores in a scorer's answer for ``size`` items; :class:`ScorerError` if malformed."""
    if not isinstance(answer, dict):
        raise ScorerError(f"scorer answered {route} with {answer!r:.200} instead of a JSON object")
    rewards = _numbers(route, "rewards", answer.get("rewards"), size)
    costs = _numbers(route, "costs", answer.get("costs"), size)
    return Scores(rewards, costs, _indices(route, answer.get("truncated", []), size))


class ScorerClient:
    """Thread-safe client of the scorer service.

    Args:
        url: ``http://host:port``, or ``"auto"``/``None`` to read the address file (``$SCORER_URL``
            wins when set). With ``auto`` the file is read again before each retry.
        token: bearer token (default ``$SCORER_TOKEN``; with ``auto`` and neither, the token in the
            address file, sent only to the URL in that file).
        timeout: seconds for one HTTP request.
        retries: retries after the first attempt for connection errors, timeouts and 5xx.
        batch_size: items per HTTP request.
        backoff: first retry delay in seconds; it doubles up to ``max_backoff``.
        max_concurrency: requests of one call in flight at once.
    """

    def __init__(
        self,
        url: str | None = "auto",
        token: str | None = None,
        timeout: float = 300.0,
        retries: int = 8,
        batch_size: int = 64,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_concurrency: int = 4,
        address_file: str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        url = url or "auto"
        if url == "auto" and os.environ.get(URL_ENV):
            url = os.environ[URL_ENV]
        self._auto = url == "auto"
        self._address_file = Path(address_file) if address_file else None
        self._url = None if self._auto else url.rstrip("/")
        self._token = (token if token is not None else os.environ.get(TOKEN_ENV)) or None
        self.timeout, self.retries, self.batch_size = timeout, retries, batch_size
        self.backoff, self.max_backoff, self.max_concurrency = backoff, max_backoff, max(1, max_concurrency)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=self.max_concurrency * 2),
        )

    def _address(self) -> ScorerAddress:
        """Where to send a request and the token for exactly that place."""
        if self._auto:
            found = read_address(self._address_file or default_address_file())
            return ScorerAddress(found.url, self._token or found.token)
        assert self._url is not None
        return ScorerAddress(self._url, self._token)

    @property
    def url(self) -> str:
        """The scorer's base URL (reads the address file when ``auto``)."""
        return self._address().url

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, at least a 503's Retry-After (any tenacity >= 8.2)."""
        delay = min(self.max_backoff, self.backoff * 2 ** (state.attempt_number - 1))
        delay += random.uniform(0, self.backoff)
        exc = state.outcome.exception() if state.outcome is not None else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            delay = max(delay, min(float(hinted), self.max_backoff))
        return delay

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ScorerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, route: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(_retryable),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=False,
        )
        target = route
        try:
            for attempt in retrying:
                with attempt:
                    address = self._address()
                    target = f"{address.url}{route}"
                    headers = {"Authorization": f"Bearer {address.token}"} if address.token else {}
                    response = self._http.request(method, target, json=payload, headers=headers)
                    if response.status_code >= 500:
                        raise _ServerError(response.status_code, _message(response), _retry_after(response))
                    if response.status_code >= 400:
                        raise ScorerRequestError(response.status_code, _message(response))
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise ScorerError(
                            f"scorer answered {target} with a body that is not JSON: {exc}"
                        ) from exc
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise ScorerUnavailableError(
                f"scorer at {target} failed after {self.retries + 1} attempts; last error: "
                f"{type(last).__name__}: {last}"
            ) from last
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        """``GET /health`` (with retries)."""
        return self._request("GET", "/health")

    def _post_chunks(self, route: str, payloads: list[dict[str, Any]], sizes: list[int]) -> Scores:
        if len(payloads) == 1 or self.max_concurrency == 1:
            answers = [self._request("POST", route, p) for p in payloads]
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(payloads))) as pool:
                answers = list(pool.map(lambda p: self._request("POST", route, p), payloads))
        rewards: list[float] = []
        costs: list[float] = []
        truncated: list[int] = []
        offset = 0
        for answer, size in zip(answers, sizes, strict=True):
            part = check_answer(route, answer, size)
            rewards += part.rewards
            costs += part.costs
            truncated += [offset + i for i in part.truncated]
            offset += size
        if truncated:
            logger.warning("%d of %d texts were truncated by the scorer", len(truncated), offset)
        return Scores(rewards, costs, truncated)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        """Reward and cost of each (prompt, response) pair, in order."""
        prompts = _check_strings("prompts", prompts)
        responses = _check_strings("responses", responses)
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses differ in length: {len(prompts)} != {len(responses)}")
        if not prompts:
            return Scores([], [], [])
        spans = range(0, len(prompts), self.batch_size)
        payloads = [
            {"prompts": prompts[i : i + self.batch_size], "responses": responses[i : i + self.batch_size]}
            for i in spans
        ]
        return self._post_chunks("/score", payloads, [len(p["prompts"]) for p in payloads])

    def score_texts(self, texts: Sequence[str]) -> Scores:
        """Reward and cost of texts already in the conversation template."""
        texts = _check_strings("texts", texts)
        if not texts:
            return Scores([], [], [])
        payloads = [{"texts": texts[i : i + self.batch_size]} for i in range(0, len(texts), self.batch_size)]
        return self._post_chunks("/score_texts", payloads, [len(p["texts"]) for p in payloads])
