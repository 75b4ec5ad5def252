"""A small model's member noise for one ES iteration: drawn once, kept until the update, and on a CPU
drawn ahead in a background thread while the engine generates (:class:`MemberNoise`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


class MemberNoise:
    """A small model's member noise, drawn once per iteration and kept until the update (which needs it
    again, as does the antithetic twin), at most ``slots`` members.

    :meth:`prefetch` draws the members an engine is about to evaluate in a background thread while it
    generates (CPU engines: generation leaves a core free, so the noise stops being a serial cost);
    :meth:`get` waits for a member being drawn. The values are the ones drawn on demand: only when
    they are computed changes. A failed background draw is logged and the member drawn on demand.
    """

    def __init__(self, draw: Callable[[int], list[torch.Tensor]], slots: int) -> None:
        self._draw, self.slots = draw, slots
        self._noise: dict[int, list[torch.Tensor]] = {}
        self._drawing: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def get(self, seed: int, keep: bool) -> list[torch.Tensor] | None:
        """``seed``'s noise blocks if kept (or being drawn); with ``keep``, drawn and kept if there is room."""
        event = self._drawing.get(seed)
        if event is not None:
            event.wait()
        with self._lock:
            if seed in self._noise or not keep or len(self._noise) >= self.slots:
                return self._noise.get(seed)
        noise = self._draw(seed)
        with self._lock:
            self._noise[seed] = noise
        return noise

    def prefetch(self, seeds: Sequence[int]) -> None:
        """Draw ``seeds``' noise (as many as there are free slots) in a background thread, in order."""
        self.join()
        with self._lock:
            todo = [s for s in dict.fromkeys(seeds) if s not in self._noise][
                : max(0, self.slots - len(self._noise))
            ]
            self._drawing = {s: threading.Event() for s in todo}
        if not todo:
            return

        def work() -> None:
            try:
                for seed in todo:
                    noise = self._draw(seed)
                    with self._lock:
                        self._noise[seed] = noise
                    self._drawing[seed].set()
            except Exception:  # noqa: BLE001 - the members not drawn yet are drawn on demand
                logger.exception("drawing ES noise ahead failed; drawing on demand")
            finally:
                for event in self._drawing.values():
                    event.set()

        self._thread = threading.Thread(target=work, name="es-noise-prefetch", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def clear(self) -> None:
        """Forget every member (the next iteration draws other ones)."""
        self.join()
        with self._lock:
            self._noise.clear()
            self._drawing = {}
