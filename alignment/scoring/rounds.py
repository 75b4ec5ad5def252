"""Which queued items the scorer runs next: the bookkeeping of a request (:class:`Job`) and the
choice of a round (:func:`take_round`) and its forward passes (:func:`split_passes`).

A round is up to a few forward passes' worth of rows, chosen so that a new request is in the
first pass and nobody starves:

1. requests that have had no step yet ("new") get the first ``NEW_SHARE`` of the round's rows and
   tokens, ``quantum`` items each at a time;
2. then every waiting request, those that have had steps first, least recently served first,
   ``quantum`` items each at a time, up to the round's whole budget.

Only the standard library is imported here (see :mod:`alignment.scoring.scheduler`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

NEW_SHARE = 0.5  # of a round's rows and tokens, offered first to requests that have had no step yet


@dataclass(eq=False)
class Job:
    """One request in the queue: ``total`` items, of which ``items`` have arrived; ``future`` gets
    the results (in order) or the request's error."""

    total: int
    future: asyncio.Future
    enqueued: float
    items: list[Any] = field(default_factory=list)  # arrived so far (all of them for ``submit``)
    lengths: list[int] = field(default_factory=list)
    todo: deque[int] = field(default_factory=deque)  # indices arrived and not yet taken into a step
    results: list[Any] = field(default_factory=list)
    left: int = 0  # items without a result yet (not arrived, waiting or in a running step)
    started: bool = False
    served: int = -1  # the last round that took items of this job

    @property
    def live(self) -> bool:
        return not self.future.done()

    def add(self, items: Sequence[Any], lengths: Sequence[int]) -> None:
        if len(items) != len(lengths):
            raise ValueError(f"{len(items)} items but {len(lengths)} lengths")
        if len(self.items) + len(items) > self.total:
            raise ValueError(f"more than the {self.total} items announced")
        self.todo.extend(range(len(self.items), len(self.items) + len(items)))
        self.items.extend(items)
        self.lengths.extend(lengths)


Step = list[tuple[Job, list[int]]]  # items (indices) of each job


def one_pass(lengths: list[int]) -> list[list[int]]:
    """The plan that runs a whole round as one forward pass."""
    return [list(range(len(lengths)))]


def take_round(waiting: list[Job], row_cap: int, token_cap: int, quantum: int, round_no: int) -> Step:
    """Take items off the ``todo`` queues of ``waiting`` jobs (oldest first) for round ``round_no``:
    at most ``row_cap`` rows and ``token_cap`` tokens (the first row always fits: a row longer than
    the budget runs alone). Marks the jobs taken from as served in this round."""
    taken: dict[int, tuple[Job, list[int]]] = {}
    budget = [0, 0]  # rows, tokens taken

    def fill(jobs: list[Job], rows_allowed: float, tokens_allowed: float) -> None:
        while any(job.todo for job in jobs):
            for job in jobs:
                for _ in range(min(quantum, len(job.todo))):
                    length = job.lengths[job.todo[0]]
                    rows, tokens = budget
                    if rows and (rows + 1 > rows_allowed or tokens + length > tokens_allowed):
                        return
                    taken.setdefault(id(job), (job, []))[1].append(job.todo.popleft())
                    budget[0], budget[1] = rows + 1, tokens + length

    fill([job for job in waiting if not job.started], row_cap * NEW_SHARE, token_cap * NEW_SHARE)
    fill(sorted(waiting, key=lambda job: (not job.started, job.served)), row_cap, token_cap)
    for job, _ in taken.values():
        job.served = round_no
    return list(taken.values())


def split_passes(chosen: Step, plan: Callable[[list[int]], list[list[int]]]) -> list[Step]:
    """The forward passes ``plan`` cuts ``chosen`` into, those holding a new request first."""
    flat = [(job, i) for job, idx in chosen for i in idx]
    passes: list[Step] = []
    for rows in plan([job.lengths[i] for job, i in flat]):
        grouped: dict[int, tuple[Job, list[int]]] = {}
        for r in rows:
            job, i = flat[r]
            grouped.setdefault(id(job), (job, []))[1].append(i)
        passes.append(list(grouped.values()))
    passes.sort(key=lambda step: all(job.started for job, _ in step))  # stable: new requests first
    return passes
