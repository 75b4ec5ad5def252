"""Score each distinct (prompt, response) pair once per ES iteration.

With greedy decoding and a small σ many members give the same answer to the same prompt (and
antithetic pairs often do): a pair already sent this iteration is not sent again, and every member
that produced it gets the same score. On a scorer whose scores do not depend on which requests share
a batch (``--max-batch-size 1``) the results are exactly those of scoring every pair.

    cache = PairScoreCache(client.score, pool)
    pending = cache.submit(prompts, responses)       # sends only the pairs not seen yet
    scores = pending.result()                        # Scores aligned with (prompts, responses)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future

from alignment.scoring.client import Scores

ScoreFn = Callable[[list[str], list[str]], Scores]


class PendingScores:
    """Scores of one submitted batch; :meth:`result` waits for the requests that hold them."""

    def __init__(self, refs: list[tuple[Future, int]]) -> None:
        self._refs = refs

    def result(self) -> Scores:
        """Scores aligned with the submitted pairs; re-raises a failed request's error (e.g. ScorerError)."""
        rewards, costs, truncated = [], [], []
        for i, (future, j) in enumerate(self._refs):
            scores: Scores = future.result()
            rewards.append(scores.rewards[j])
            costs.append(scores.costs[j])
            if j in scores.truncated:
                truncated.append(i)
        return Scores(rewards, costs, truncated)


class PairScoreCache:
    """One iteration's pairs: each distinct (prompt, response) goes to ``score`` once (thread-safe)."""

    def __init__(self, score: ScoreFn, pool: Executor) -> None:
        self._score = score
        self._pool = pool
        self._lock = threading.Lock()
        self._where: dict[tuple[str, str], tuple[Future, int]] = {}
        self.pairs_total = 0
        self.pairs_sent = 0

    def submit(self, prompts: Sequence[str], responses: Sequence[str]) -> PendingScores:
        """Send the pairs not seen this iteration in one request (in the background); returns at once."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses differ in length: {len(prompts)} != {len(responses)}")
        keys = list(zip(prompts, responses, strict=True))
        with self._lock:
            fresh = list(dict.fromkeys(k for k in keys if k not in self._where))
            if fresh:
                future = self._pool.submit(self._score, [p for p, _ in fresh], [r for _, r in fresh])
                self._where.update({k: (future, j) for j, k in enumerate(fresh)})
            self.pairs_total += len(keys)
            self.pairs_sent += len(fresh)
            return PendingScores([self._where[k] for k in keys])

    def failure(self) -> BaseException | None:
        """The error of a request that already failed, if any (the caller stops early instead of
        generating answers nobody can score)."""
        with self._lock:
            futures = {id(f): f for f, _ in self._where.values()}
        for future in futures.values():
            if future.done() and future.exception() is not None:
                return future.exception()
        return None

    def metrics(self) -> dict[str, float]:
        """``scoring/pairs_total`` (every member's pairs), ``pairs_sent`` and ``duplicate_fraction``."""
        total, sent = self.pairs_total, self.pairs_sent
        return {
            "scoring/pairs_total": float(total),
            "scoring/pairs_sent": float(sent),
            "scoring/duplicate_fraction": 1.0 - sent / total if total else 0.0,
        }
