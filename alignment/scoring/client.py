"""The one client of the scorer service, shared by the ES trainer, GRPO reward and evaluation.

    client = ScorerClient()                     # url="auto": every healthy replica that published
    scores = client.score(prompts, responses)   # scores.rewards, scores.costs, in input order

Large calls are split into requests of ``batch_size`` items, sent concurrently. Each request goes
to the replica with the fewest requests in flight (:mod:`alignment.scoring.replicas`); when that
replica fails (connection refused or reset, timeout, 5xx) the request is sent to another one at
once, and each chunk's scores come from exactly one answer, so nothing is lost, scored twice into
the results or mismatched. While no replica can serve, requests wait with exponential backoff and
jitter (at least a 503's ``Retry-After``), re-reading the address sources so restarted and added
replicas are found, for at most ``retry_budget`` seconds of outage in all (not per request): one
warning when the outage starts and one when it ends, naming the hosts. Then the client raises
:class:`ScorerUnavailableError`: it never returns made-up scores (zeros for a failed request
silently corrupt training). 4xx answers are not retried; an answer whose scores are not finite
numbers, or whose ``truncated`` indices are out of range, is a :class:`ScorerError`, never a score.

With ``url="auto"`` each replica's URL and bearer token come from one reading of its address file;
that token is sent only to that URL.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from alignment.cli import UserError
from alignment.scoring.address import address_sources
from alignment.scoring.replicas import Outage, ReplicaPool

logger = logging.getLogger(__name__)

TOKEN_ENV = "SCORER_TOKEN"
URL_ENV = "SCORER_URL"
DEFAULT_RETRY_BUDGET = 120.0  # s of outage before a trainer stops (with its resume command)


class ScorerError(RuntimeError):
    """Base class of scorer-client errors."""


class ScorerRequestError(ScorerError, UserError):
    """The scorer rejected the request (4xx): retrying the same request cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"scorer rejected the request ({status}): {message}")
        self.status, self.message = status, message


class ScorerUnavailableError(ScorerError, UserError):
    """No scorer replica could serve for the whole retry budget; the message names the hosts."""


@dataclass
class Scores:
    """Scores aligned with the input: ``rewards[i]``, ``costs[i]``; ``truncated`` lists cut items."""

    rewards: list[float]
    costs: list[float]
    truncated: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rewards)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # absent, or an HTTP date: fall back to the exponential backoff
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


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


def _split_urls(url: str | Sequence[str]) -> list[str]:
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip().rstrip("/") for u in parts if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise UserError(f"scorer URL {u!r} does not start with http:// or https:// (or use auto)")
    if not urls:
        raise UserError("no scorer URL given")
    return urls


class ScorerClient:
    """Thread-safe client of one scorer or several replicas.

    Args:
        url: ``http://host:port``, several (a list, or comma-separated), or ``"auto"``/``None`` to find
            every healthy replica in the address sources (``$SCORER_URL`` wins when set).
        token: bearer token (default ``$SCORER_TOKEN``; with ``auto`` and neither, each replica's token
            from its own address file, sent only to that replica's URL).
        timeout: seconds for one HTTP request.
        retry_budget: seconds an outage (no replica can serve) may last before the client gives up
            with :class:`ScorerUnavailableError`; a request in flight may end up to ``timeout`` later.
        retries: also give up after this many waits of one request (None: only the budget counts);
            sending a request to another replica after one failed is not a retry.
        batch_size: items per HTTP request.
        backoff: first wait in seconds; it doubles up to ``max_backoff``, plus jitter.
        max_concurrency: requests of one call in flight at once.
        address_file, address_dir: where ``auto`` looks (default: see
            :func:`alignment.scoring.address.address_sources`); either may be a file or a directory.
        refresh_interval: seconds between re-readings of the address sources.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = "auto",
        token: str | None = None,
        timeout: float = 300.0,
        retries: int | None = None,
        batch_size: int = 64,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_concurrency: int = 4,
        address_file: str | Path | None = None,
        retry_budget: float = DEFAULT_RETRY_BUDGET,
        address_dir: str | Path | None = None,
        refresh_interval: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if retries is not None and retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not retry_budget >= 0:
            raise ValueError(f"retry_budget must be >= 0 seconds, got {retry_budget}")
        url = url or "auto"
        if url == "auto" and os.environ.get(URL_ENV):
            url = os.environ[URL_ENV]
        token = (token if token is not None else os.environ.get(TOKEN_ENV)) or None
        self.timeout, self.retries, self.batch_size = timeout, retries, batch_size
        self.backoff, self.max_backoff, self.max_concurrency = backoff, max_backoff, max(1, max_concurrency)
        self.retry_budget = retry_budget
        # one client serves many threads (the ES trainer's scoring pool, TRL's reward calls), each
        # call up to max_concurrency requests, spread over the replicas: room for 8 such calls
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=self.max_concurrency * 8),
        )
        if url == "auto":
            sources = address_sources(address_file, address_dir)
            self._pool = ReplicaPool(
                self._http, sources=sources, token=token, refresh_interval=refresh_interval
            )
        else:
            self._pool = ReplicaPool(self._http, urls=_split_urls(url), token=token)
        self._outage = Outage(retry_budget)

    @property
    def urls(self) -> list[str]:
        """The replicas known now (finds them first when ``auto`` knows none yet)."""
        if not self._pool.urls():
            self._pool.refresh(force=True)
        return self._pool.urls()

    @property
    def url(self) -> str:
        """The first replica's base URL (kept for callers of a single scorer)."""
        urls = self.urls
        if not urls:
            raise ScorerUnavailableError(self._pool.problem())
        return urls[0]

    def spread(self) -> dict[str, dict[str, int]]:
        """How requests were spread: per replica URL, requests answered, items, failures, in flight."""
        return self._pool.spread()

    def close(self) -> None:
        spread = {url: s for url, s in self.spread().items() if s["requests"] or s["failures"]}
        if len(spread) > 1 or any(s["failures"] for s in spread.values()):
            logger.info("scorer requests by replica: %s", "; ".join(
                f"{url} {s['requests']} requests ({s['items']} items), {s['failures']} failed"
                for url, s in spread.items()))  # fmt: skip
        self._http.close()

    def __enter__(self) -> ScorerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self, waits: int, hinted: float) -> float:
        """Exponential backoff with jitter, at least until a resting replica may be tried again."""
        delay = min(self.max_backoff, self.backoff * 2**waits) + random.uniform(0, self.backoff)
        return max(delay, min(hinted, self.max_backoff))

    def _request(
        self, method: str, route: str, payload: dict[str, Any] | None = None, size: int | None = None
    ) -> Any:
        """One request, sent to the replica with the fewest requests in flight and on to the others
        when it fails; waits and retries while none can serve, within the retry budget."""
        tried: set[str] = set()
        waits = 0
        stuck_since: float | None = None  # when this request first found no replica to try
        last_error = ""  # of this request (a 500 leaves the replica usable: the pool does not say)
        failed_here = False  # a 500 was logged for this request
        while True:
            replica = self._pool.acquire(tried)
            if replica is None:
                self._pool.refresh(force=True)  # restarted or added replicas, stale files dropped
                replica = self._pool.acquire(tried)
            if replica is None:
                if self._pool.all_rejected():
                    raise ScorerRequestError(
                        401, f"every scorer rejected the bearer token: {self._pool.problem()}"
                    )
                problem = self._pool.problem()
                now = time.monotonic()
                stuck_since = now if stuck_since is None else stuck_since
                # an outage (no replica alive) is the client's, logged once; busy replicas or a
                # request that failed on every replica concern this request alone
                lasted = self._outage.elapsed(problem) if not self._pool.alive() else 0.0
                lasted = max(lasted, now - stuck_since)
                left = self.retry_budget - lasted
                if left <= 0 or (self.retries is not None and waits >= self.retries):
                    why = f"retry budget of {self.retry_budget:.0f}s used up" if left <= 0 else (
                        f"{self.retries} retries used up")  # fmt: skip
                    last = f"; this request's last error: {last_error}" if last_error else ""
                    raise ScorerUnavailableError(
                        f"no scorer could serve {route} for {lasted:.0f}s ({why}): {problem}{last}"
                    )
                delay = min(self._delay(waits, self._pool.rest_left()), left)
                logger.debug("no scorer can serve %s; retrying in %.2fs: %s", route, delay, problem)
                time.sleep(delay)
                waits += 1
                tried.clear()
                continue
            tried.add(replica.url)
            token = self._pool.token_for(replica)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            target = f"{replica.url}{route}"
            try:
                response = self._http.request(method, target, json=payload, headers=headers)
            except httpx.TransportError as exc:
                last_error = f"{replica.url}: {type(exc).__name__}: {exc}"
                self._pool.failed(replica, f"{type(exc).__name__}: {exc}", "down")
                continue
            finally:
                self._pool.release(replica)
            status = response.status_code
            if status >= 500 or status == 429:
                why = f"HTTP {status}: {_message(response)}"
                last_error = f"{replica.url}: {why}"
                hint = _retry_after(response)
                kind = "request" if status == 500 else "busy" if hint is not None else "down"
                self._pool.failed(replica, why, kind, retry_after=hint)
                if kind == "request" and not failed_here:  # once per request, not per retry
                    logger.warning("scorer %s could not score a request to %s (%s); retrying it on "
                                   "the replicas within the retry budget", replica.url, route, why)  # fmt: skip
                failed_here = failed_here or kind == "request"
                continue
            if response.status_code in (401, 403):
                self._pool.reject(replica, f"HTTP {response.status_code}: {_message(response)}")
                continue
            if response.status_code >= 400:
                raise ScorerRequestError(response.status_code, f"{_message(response)} (from {target})")
            try:
                body = response.json()
            except ValueError as exc:
                raise ScorerError(f"scorer answered {target} with a body that is not JSON: {exc}") from exc
            if size is not None:
                body = check_answer(target, body, size)  # a malformed answer is an error, not retried
            self._pool.succeeded(replica, size or 0)
            self._outage.over(replica.url)
            return body

    def health(self) -> dict[str, Any]:
        """``GET /health`` of one replica (with retries)."""
        return self._request("GET", "/health")

    def _post_chunks(self, route: str, payloads: list[dict[str, Any]], sizes: list[int]) -> Scores:
        def post(i: int) -> Scores:
            return self._request("POST", route, payloads[i], sizes[i])

        if len(payloads) == 1 or self.max_concurrency == 1:
            answers = [post(i) for i in range(len(payloads))]
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(payloads))) as pool:
                answers = list(pool.map(post, range(len(payloads))))  # in chunk order, whoever answered
        rewards: list[float] = []
        costs: list[float] = []
        truncated: list[int] = []
        offset = 0
        for part, size in zip(answers, sizes, strict=True):
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
