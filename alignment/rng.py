"""RNG states for checkpoints: the one home of capturing and restoring them, so a resumed run draws
what an uninterrupted one would.

A state is a plain dict (``torch.save``-able with ``weights_only=True``)::

    torch     torch's CPU generator (a uint8 tensor)
    python    ``random``'s global state
    cuda      every CUDA device's generator (a list of tensors); only where CUDA was available
    <name>    each extra generator the caller names (a ``torch.Generator`` or a ``random.Random``)

Restoring is strict: a key the state must hold (``torch``, ``python`` and every named extra) that
is missing is an error naming it and the source. ``cuda`` is the exception: a state written on a
CPU machine has none, and CUDA's generators are only restored where the state has them and CUDA is
available. NumPy's global generator is not captured: neither trainer draws from it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

RNG = torch.Generator | random.Random
REQUIRED = ("torch", "python")


def rng_state(extra: Mapping[str, RNG] | None = None) -> dict[str, Any]:
    """This process's global RNG states (torch CPU, CUDA when available, Python), plus the state of
    each generator in ``extra`` under its name."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in (extra or {}).items():
        if name in state:
            raise ValueError(f"extra generator name {name!r} is taken by a global RNG state")
        state[name] = gen.get_state() if isinstance(gen, torch.Generator) else gen.getstate()
    return state


def set_rng_state(state: Mapping[str, Any], source: str, extra: Mapping[str, RNG] | None = None) -> None:
    """Restore what :func:`rng_state` captured into the global RNGs and the generators of ``extra``;
    a missing key raises ``ValueError`` naming it and ``source`` (e.g. the checkpoint file), before
    any generator is changed."""
    extra = extra or {}
    missing = [k for k in (*REQUIRED, *extra) if k not in state]
    if missing:
        raise ValueError(f"{source}: the RNG state lacks {missing} (has {sorted(state)})")
    torch.set_rng_state(state["torch"])
    random.setstate(_as_random_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in extra.items():
        if isinstance(gen, torch.Generator):
            gen.set_state(state[name])
        else:
            gen.setstate(_as_random_state(state[name]))


def _as_random_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a round trip through a checkpoint may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
