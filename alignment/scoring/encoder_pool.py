"""Tokenising requests off the event loop, in slices, each request taking its turn.

:class:`EncoderPool` runs a blocking ``encode(texts) -> items`` on worker threads, ``slice_items``
texts at a time. A request has at most one slice queued or running, and slices run in the order
they were queued, so requests take turns: a 4,096-text request is tokenised as 128 slices, and a
1-text request that arrives meanwhile waits for one slice of each request ahead of it, not for the
whole big one (before, one thread tokenised every request whole, in arrival order: 32.7 s for a
47.7 MB request, during which nobody else's text was tokenised). Slices come back as they are
done (:meth:`EncoderPool.parts`), so a request's first slices are scored while its later ones are
still being tokenised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from alignment.scoring.batcher import TextEncodingError


class EncoderPool:
    """``threads`` tokenising threads shared by every request, one slice per request at a time.

    Args:
        encode: tokenises a list of texts in a worker thread; may raise
            :class:`~alignment.scoring.batcher.TextEncodingError` (its index is within the slice;
            :meth:`parts` re-raises it with the index within the request).
        threads: worker threads (each tokenizer call releases the GIL while the Rust code runs).
        slice_items: texts per slice.
    """

    def __init__(
        self, encode: Callable[[list[str]], list[Any]], threads: int = 2, slice_items: int = 32
    ) -> None:
        if threads < 1 or slice_items < 1:
            raise ValueError("threads and slice_items must be positive")
        self.encode, self.slice_items = encode, slice_items
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenizer")
        self._free = threads
        self._turns: deque[asyncio.Future] = deque()

    async def parts(self, texts: Sequence[str]) -> AsyncIterator[tuple[int, list[Any]]]:
        """``(offset, items)`` for each slice of ``texts``, in order, as each is tokenised."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(texts), self.slice_items):
            chunk = list(texts[start : start + self.slice_items])
            await self._turn(loop)
            running = loop.run_in_executor(self._executor, self.encode, chunk)
            del chunk
            # the turn passes on when the thread is done, even if this request was cancelled meanwhile
            running.add_done_callback(self._done)
            try:
                items = await asyncio.shield(running)
            except TextEncodingError as exc:
                raise TextEncodingError(start + exc.index, exc.reason) from exc
            yield start, items

    async def encode_all(self, texts: Sequence[str]) -> list[Any]:
        """Every item of ``texts`` (all slices), in order."""
        out: list[Any] = []
        async for _, items in self.parts(texts):
            out += items
        return out

    async def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._free > 0 and not self._turns:
            self._free -= 1
            return
        turn = loop.create_future()
        self._turns.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._pass_on()  # given the turn just as it was cancelled: hand it to the next one
            else:
                with contextlib.suppress(ValueError):
                    self._turns.remove(turn)
            raise

    def _done(self, running: asyncio.Future) -> None:
        if not running.cancelled():
            running.exception()  # retrieved: an abandoned slice's error is not logged as unhandled
        self._pass_on()

    def _pass_on(self) -> None:
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
