"""The scorer's work queue: bounded, fair between callers, and isolating failures.

Callers (HTTP requests) ``submit`` lists of already-encoded items with their token lengths, or
``submit_parts`` them as they are encoded. One loop takes a *step* of work at a time and runs it in
one worker thread through ``fn(items) -> results`` (which packs the step into length-sorted,
token-budgeted forward passes):

- **a new request is in the next step**: the first ``NEW_SHARE`` of every step's rows and tokens
  goes to requests that have had no step yet, so a 1-item request that arrives while 2,048 long
  rows wait is scored in the step after the one running, whatever is queued;
- **fair**: the rest of a step is shared round-robin, ``quantum`` items per request per round,
  starting with the request served least recently, so a 4,096-item request is split over many
  steps and neither it nor anyone else is starved;
- **bounded**: at most ``max_queue_items`` items wait at once (a request counts in full from the
  moment it is submitted, parts not yet encoded included); beyond that ``submit`` raises
  :class:`QueueFull` (answered 503 with ``Retry-After``), except into an empty queue;
- **abandoned work is dropped**: the items of a caller that went away (its ``submit`` was
  cancelled) are removed before they reach a forward pass, and its parts stop being encoded;
- **failures stay with their cause**: when a step that merged several requests fails, each
  request's part is re-run on its own and only those that fail again get the error;
- **a dead loop is visible**: if the loop itself ends (a bug, an error in a hook), every waiting
  and later ``submit`` raises :class:`SchedulerStopped` at once and :attr:`alive` turns false.

Only the standard library is imported here, so the loop's behaviour can be checked on every
Python version the project supports without its heavy dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# asyncio.wait_for raises asyncio.TimeoutError, which is the builtin TimeoutError only from Python
# 3.11; on 3.10 catching the builtin alone lets the timeout escape and end the loop.
WAIT_TIMEOUT = (asyncio.TimeoutError, TimeoutError)
STEP_FORWARDS = 4  # a step holds up to this many full forward passes: room to sort, short to wait
NEW_SHARE = 0.5  # of a step's rows and tokens, offered first to requests that have had no step yet


class QueueFull(RuntimeError):
    """The queue holds ``max_queue_items`` already; retry after ``retry_after`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"the scorer's queue is full ({queued} items waiting, limit {limit})")
        self.retry_after = retry_after


class SchedulerStopped(RuntimeError):
    """The scheduling loop has ended (shut down or crashed): no request can be scored here."""


@dataclass(eq=False)
class _Job:
    total: int
    future: asyncio.Future
    enqueued: float
    items: list[Any] = field(default_factory=list)  # arrived so far (all of them for ``submit``)
    lengths: list[int] = field(default_factory=list)
    todo: deque[int] = field(default_factory=deque)  # indices arrived and not yet taken into a step
    results: list[Any] = field(default_factory=list)
    left: int = 0  # items without a result yet (not arrived, waiting or in a running step)
    started: bool = False
    served: int = -1  # the last step that took items of this job

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


Step = list[tuple[_Job, list[int]]]


class BatchScheduler:
    """Queue and schedule scoring work for a blocking ``fn(items) -> results`` (one result per item).

    Args:
        fn: scores a list of items in the worker thread.
        max_rows: rows of one forward pass; a step holds up to ``STEP_FORWARDS`` times as many.
        max_tokens: padded tokens of one forward pass; bounds a step's tokens the same way.
        max_wait_s: how long the oldest waiting request waits for company before its step starts.
        merge: merge requests into one step; ``False`` scores each request on its own (benchmarks).
        max_queue_items: items allowed to wait at once.
        on_step: ``on_step(n_items, first_waits)`` for every step: ``first_waits`` holds the queue
            wait of each request whose first items the step scores. Runs outside the step's error
            handling (an error there ends the loop, visibly).
        on_drop: ``on_drop(n_items)`` when items of callers that went away are dropped.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_rows: int = 32,
        max_tokens: int = 16384,
        max_wait_s: float = 0.005,
        merge: bool = True,
        max_queue_items: int = 16384,
        on_step: Callable[[int, list[float]], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if max_rows < 1 or max_tokens < 1 or max_queue_items < 1:
            raise ValueError("max_rows, max_tokens and max_queue_items must be positive")
        self.fn, self.max_rows, self.max_tokens = fn, max_rows, max_tokens
        self.max_wait_s, self.merge, self.max_queue_items = max_wait_s, merge, max_queue_items
        self.on_step, self.on_drop = on_step, on_drop
        self.quantum = max(1, max_rows // 4)
        self._jobs: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: str | None = None
        self._steps = 0
        self._rate = 0.0  # items per second, smoothed: for Retry-After
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")

    # ---- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="batch-scheduler")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._error is None

    @property
    def error(self) -> str | None:
        """Why the loop ended, once it has."""
        if self._error is None and self._task is not None and self._task.done():
            return "the batch scheduler is not running"
        return self._error

    @property
    def queued_items(self) -> int:
        return sum(job.left for job in self._jobs if job.live)

    # ---- callers ----------------------------------------------------------------------------

    async def submit(self, items: Sequence[Any], lengths: Sequence[int]) -> list[Any]:
        """Results for ``items`` in order; raises what scoring them raised, :class:`QueueFull` or
        :class:`SchedulerStopped`. Cancelling the call drops its items that have not started."""
        if len(items) != len(lengths):
            raise ValueError(f"{len(items)} items but {len(lengths)} lengths")
        job = self._open(len(items))
        if job is None:
            return []
        job.add(items, lengths)
        return await self._wait(job)

    async def submit_parts(
        self, total: int, parts: AsyncIterator[tuple[Sequence[Any], Sequence[int]]]
    ) -> list[Any]:
        """Like :meth:`submit` for ``total`` items that arrive as ``(items, lengths)`` parts (the
        slices of a request being tokenised): the first part is scored while later ones are still
        being made. An exception from ``parts`` is raised here (the items not yet scored are
        dropped); cancelling the call also stops ``parts``."""
        job = self._open(total)
        if job is None:
            return []
        feeder = asyncio.ensure_future(self._feed(job, parts))
        try:
            return await self._wait(job)
        finally:
            if not feeder.done():
                feeder.cancel()

    def _open(self, total: int) -> _Job | None:
        if self._wake is None:
            raise RuntimeError("BatchScheduler.submit called before start()")
        if not self.alive:
            raise SchedulerStopped(self.error or "the batch scheduler is not running")
        if total <= 0:
            return None
        queued = self.queued_items
        if queued and queued + total > self.max_queue_items:
            raise QueueFull(queued, self.max_queue_items, self._retry_after(queued))
        job = _Job(total, asyncio.get_running_loop().create_future(), time.perf_counter())
        job.results = [None] * total
        job.left = total
        self._jobs.append(job)
        return job

    async def _feed(self, job: _Job, parts: AsyncIterator[tuple[Sequence[Any], Sequence[int]]]) -> None:
        assert self._wake is not None
        try:
            async for items, lengths in parts:
                if not job.live:
                    return
                job.add(items, lengths)
                self._wake.set()
            if job.live and len(job.items) != job.total:
                raise RuntimeError(f"{len(job.items)} of {job.total} items arrived")
        except Exception as exc:  # e.g. a text that cannot be tokenised: the caller's error
            job.todo.clear()
            job.left = 0
            if job.live:
                job.future.set_exception(exc)

    async def _wait(self, job: _Job) -> list[Any]:
        assert self._wake is not None
        self._wake.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # the caller went away: forget what has not started
                job.future.cancel()
            if job.future.cancelled():
                self._drop(job)

    def _retry_after(self, queued: int) -> int:
        seconds = queued / self._rate if self._rate > 0 else 1.0
        return int(min(30, max(1, math.ceil(seconds))))

    def _drop(self, job: _Job) -> None:
        n = len(job.todo) + job.total - len(job.items)  # waiting, and parts that will not be made
        job.todo.clear()
        job.left -= n
        if n and self.on_drop is not None:
            self.on_drop(n)

    # ---- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._wait_for_work()
                step = self._take_step()
                if step:
                    await self._run_step(step)
        except asyncio.CancelledError:
            self._error = "the scorer is shutting down"
            self._fail_all(SchedulerStopped(self._error))
            raise
        except BaseException as exc:  # a bug or a failing hook: say so everywhere, never hang
            logger.critical("the batch scheduler stopped; /health now answers 503", exc_info=exc)
            self._error = f"the batch scheduler stopped: {type(exc).__name__}: {exc}"
            self._fail_all(SchedulerStopped(self._error))
            if not isinstance(exc, Exception):
                raise

    def _waiting(self) -> list[_Job]:
        return [job for job in self._jobs if job.live and job.todo]

    async def _wait_for_work(self) -> None:
        assert self._wake is not None
        while not self._waiting():
            self._wake.clear()
            await self._wake.wait()
        if not self.merge:
            return
        deadline = min(job.enqueued for job in self._waiting()) + self.max_wait_s
        while True:
            waiting = self._waiting()
            rows = sum(len(job.todo) for job in waiting)
            tokens = sum(job.lengths[i] for job in waiting for i in job.todo)
            remaining = deadline - time.perf_counter()
            if rows >= self.max_rows or tokens >= self.max_tokens or remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except WAIT_TIMEOUT:
                return

    def _take_step(self) -> Step:
        """Items of the waiting requests for one step: first up to ``NEW_SHARE`` of the step for
        requests that have had no step yet, then round-robin over all, least recently served first."""
        self._jobs = deque(job for job in self._jobs if job.live and job.left > 0)
        waiting = self._waiting()
        if not self.merge and waiting:
            waiting = waiting[:1]
            self._jobs.remove(waiting[0])  # the next step starts with the next request
            self._jobs.append(waiting[0])
        row_cap, token_cap = self.max_rows * STEP_FORWARDS, self.max_tokens * STEP_FORWARDS
        taken: dict[int, tuple[_Job, list[int]]] = {}
        budget = [0, 0]  # rows, tokens taken

        def fill(jobs: list[_Job], rows_allowed: float, tokens_allowed: float) -> None:
            while any(job.todo for job in jobs):
                for job in jobs:
                    for _ in range(min(self.quantum, len(job.todo))):
                        length = job.lengths[job.todo[0]]
                        rows, tokens = budget
                        # the first row of a step always fits: a row longer than the budget runs alone
                        if rows and (rows + 1 > rows_allowed or tokens + length > tokens_allowed):
                            return
                        taken.setdefault(id(job), (job, []))[1].append(job.todo.popleft())
                        budget[0], budget[1] = rows + 1, tokens + length

        new = [job for job in waiting if not job.started]
        fill(new, row_cap * NEW_SHARE, token_cap * NEW_SHARE)
        fill(sorted(waiting, key=lambda job: (not job.started, job.served)), row_cap, token_cap)
        self._steps += 1
        for job, _ in taken.values():
            job.served = self._steps
        return list(taken.values())

    async def _run_step(self, step: Step) -> None:
        now = time.perf_counter()
        first_waits = [now - job.enqueued for job, _ in step if not job.started]
        for job, _ in step:
            job.started = True
        items = [job.items[i] for job, idx in step for i in idx]
        if self.on_step is not None:
            self.on_step(len(items), first_waits)
        try:
            results = await self._score(items)
        except Exception as exc:
            if len(step) == 1:
                self._fail(step[0][0], exc)
            else:
                await self._isolate(step, exc)
            return
        rate = len(items) / max(time.perf_counter() - now, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        offset = 0
        for job, idx in step:
            self._deliver(job, idx, results[offset : offset + len(idx)])
            offset += len(idx)

    async def _score(self, items: list[Any]) -> Sequence[Any]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.fn, items)
        if len(results) != len(items):
            raise RuntimeError(f"scoring returned {len(results)} results for {len(items)} items")
        return results

    async def _isolate(self, step: Step, exc: Exception) -> None:
        """Re-run each request's part of a failed step on its own; fail only those that fail again."""
        logger.warning(
            "a step merging %d requests failed (%s: %s); scoring each request on its own",
            len(step),
            type(exc).__name__,
            exc,
        )
        for job, idx in step:
            if not job.live:
                continue
            try:
                results = await self._score([job.items[i] for i in idx])
            except Exception as own:
                self._fail(job, own)
            else:
                self._deliver(job, idx, results)

    def _deliver(self, job: _Job, idx: list[int], results: Sequence[Any]) -> None:
        for i, result in zip(idx, results, strict=True):
            job.results[i] = result
            job.items[i] = None  # scored: its token ids are not needed any more
        job.left -= len(idx)
        if job.left == 0 and job.live:
            job.future.set_result(job.results)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        logger.error("scoring a request of %d items failed: %s: %s", job.total, type(exc).__name__, exc)
        job.todo.clear()
        job.left = 0
        if job.live:
            job.future.set_exception(exc)

    def _fail_all(self, exc: SchedulerStopped) -> None:
        for job in self._jobs:
            job.todo.clear()
            job.left = 0
            if job.live:
                job.future.set_exception(exc)
        self._jobs.clear()
