"""The scorer's work queue: bounded, fair between callers, and isolating failures.

Callers (HTTP requests) ``submit`` lists of already-encoded items with their token lengths, or
``submit_parts`` them as they are encoded. One loop chooses a *round* of work (up to
``STEP_FORWARDS`` forward passes' worth: room to sort rows by length), cuts it into forward passes
with ``plan`` and runs them one *step* (one call of ``fn(items) -> results``, one pass) at a time
in one worker thread:

- **a new request is in the next forward pass**: a request that arrives during a round ends that
  round after the running pass (the rest goes back to the front of the queue), the first
  ``NEW_SHARE`` of every round's rows and tokens goes to requests that have had no step yet, and
  their passes run first; so a 1-item request that arrives while 2,048 rows of 512 tokens wait
  is scored after at most one of their passes, whatever is queued (before: after all of them);
- **fair**: the rest of a round is shared round-robin, ``quantum`` items per request at a time,
  starting with the request served least recently, so a 4,096-item request is split over many
  rounds and neither it nor anyone else is starved;
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
from typing import Any

from alignment.scoring.rounds import Job, Step, one_pass, split_passes, take_round

logger = logging.getLogger(__name__)

# asyncio.wait_for raises asyncio.TimeoutError, which is the builtin TimeoutError only from Python
# 3.11; on 3.10 catching the builtin alone lets the timeout escape and end the loop.
WAIT_TIMEOUT = (asyncio.TimeoutError, TimeoutError)
STEP_FORWARDS = 4  # a round holds up to this many full forward passes: room to sort, short to wait


class QueueFull(RuntimeError):
    """The queue holds ``max_queue_items`` already; retry after ``retry_after`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"the scorer's queue is full ({queued} items waiting, limit {limit})")
        self.retry_after = retry_after


class SchedulerStopped(RuntimeError):
    """The scheduling loop has ended (shut down or crashed): no request can be scored here."""


class BatchScheduler:
    """Queue and schedule scoring work for a blocking ``fn(items) -> results`` (one result per item).

    Args:
        fn: scores a list of items (one forward pass) in the worker thread.
        max_rows: rows of one forward pass; a round holds up to ``STEP_FORWARDS`` times as many.
        max_tokens: padded tokens of one forward pass; bounds a round's tokens the same way.
        plan: ``plan(lengths) -> passes`` cuts a round into forward passes (lists of indices into
            ``lengths``, covering each once); by default the round is one pass.
        max_wait_s: how long the oldest waiting request waits for company before its round starts.
        merge: merge requests into one round; ``False`` scores each request on its own (benchmarks).
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
        plan: Callable[[list[int]], list[list[int]]] | None = None,
        max_wait_s: float = 0.005,
        merge: bool = True,
        max_queue_items: int = 16384,
        on_step: Callable[[int, list[float]], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if max_rows < 1 or max_tokens < 1 or max_queue_items < 1:
            raise ValueError("max_rows, max_tokens and max_queue_items must be positive")
        self.fn, self.max_rows, self.max_tokens = fn, max_rows, max_tokens
        self.plan = plan or one_pass
        self.max_wait_s, self.merge, self.max_queue_items = max_wait_s, merge, max_queue_items
        self.on_step, self.on_drop = on_step, on_drop
        self.quantum = max(1, max_rows // 4)
        self._jobs: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: str | None = None
        self._rounds = 0
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

    def _open(self, total: int) -> Job | None:
        if self._wake is None:
            raise RuntimeError("BatchScheduler.submit called before start()")
        if not self.alive:
            raise SchedulerStopped(self.error or "the batch scheduler is not running")
        if total <= 0:
            return None
        queued = self.queued_items
        if queued and queued + total > self.max_queue_items:
            raise QueueFull(queued, self.max_queue_items, self._retry_after(queued))
        job = Job(total, asyncio.get_running_loop().create_future(), time.perf_counter())
        job.results = [None] * total
        job.left = total
        self._jobs.append(job)
        return job

    async def _feed(self, job: Job, parts: AsyncIterator[tuple[Sequence[Any], Sequence[int]]]) -> None:
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

    async def _wait(self, job: Job) -> list[Any]:
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

    def _drop(self, job: Job) -> None:
        n = len(job.todo) + job.total - len(job.items)  # waiting, and parts that will not be made
        job.todo.clear()
        job.left -= n
        self._dropped(n)

    # ---- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._wait_for_work()
                chosen = self._take_round()
                if chosen:
                    await self._run_round(chosen)
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

    def _waiting(self) -> list[Job]:
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

    def _take_round(self) -> Step:
        self._jobs = deque(job for job in self._jobs if job.live and job.left > 0)
        waiting = self._waiting()
        if not self.merge and waiting:
            waiting = waiting[:1]
            self._jobs.remove(waiting[0])  # the next round starts with the next request
            self._jobs.append(waiting[0])
        self._rounds += 1
        cap = (self.max_rows * STEP_FORWARDS, self.max_tokens * STEP_FORWARDS)
        return take_round(waiting, *cap, self.quantum, self._rounds)

    async def _run_round(self, chosen: Step) -> None:
        """Run the round's forward passes, those holding new requests first; stop after the running
        pass when a request arrives that is not in this round, putting the rest back."""
        passes = split_passes(chosen, self.plan)
        for k, step in enumerate(passes):
            if k and any(not job.started and job.served != self._rounds for job in self._waiting()):
                self._put_back([part for rest in passes[k:] for part in rest])
                return
            live = [(job, idx) for job, idx in step if job.live]
            self._dropped(sum(len(idx) for job, idx in step if not job.live))
            if live:
                await self._run_step(live)

    def _put_back(self, rest: Step) -> None:
        """Return items taken into a round but not run to the front of their requests' queues."""
        back: dict[int, tuple[Job, list[int]]] = {}
        for job, idx in rest:
            back.setdefault(id(job), (job, []))[1].extend(idx)
        for job, idx in back.values():
            if job.live:
                job.todo.extendleft(sorted(idx, reverse=True))
            else:
                self._dropped(len(idx))

    def _dropped(self, n: int) -> None:
        if n and self.on_drop is not None:
            self.on_drop(n)

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

    def _deliver(self, job: Job, idx: list[int], results: Sequence[Any]) -> None:
        for i, result in zip(idx, results, strict=True):
            job.results[i] = result
            job.items[i] = None  # scored: its token ids are not needed any more
        job.left -= len(idx)
        if job.left == 0 and job.live:
            job.future.set_result(job.results)

    def _fail(self, job: Job, exc: BaseException) -> None:
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
