"""Per-iteration ES diagnostics users watch on TensorBoard (``es/...``; ``update/...`` come from
:class:`alignment.es.weights.UpdateStats`, ``scoring/...`` from the pair cache).

- ``es/fitness_spread``: max − min fitness of the population (0: no signal, no step);
- ``es/antithetic_answer_disagreement``: over antithetic pairs (θ ± σε), the share of prompts whose
  two answers differ (0: the pair says nothing about ε);
- ``es/antithetic_fitness_gap``: mean |f₊ − f₋| over the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignment.es.population import Member


def antithetic_pairs(members: Sequence[Member]) -> list[tuple[int, int]]:
    """Indices (i, i+1) of members that share a seed with opposite signs, as ``population`` orders them."""
    return [
        (i, i + 1)
        for i in range(0, len(members) - 1, 2)
        if members[i][0] == members[i + 1][0] and members[i][1] == -members[i + 1][1]
    ]


def population_diagnostics(
    members: Sequence[Member], responses: Sequence[Sequence[str]], f: np.ndarray
) -> dict[str, float]:
    """``responses[i]``: member i's answers to the batch; ``f``: (N,) fitness."""
    out = {"es/fitness_spread": float(f.max() - f.min())}
    pairs = antithetic_pairs(members)
    if pairs:
        differ = [
            np.mean([a != b for a, b in zip(responses[i], responses[j], strict=True)]) for i, j in pairs
        ]
        out["es/antithetic_answer_disagreement"] = float(np.mean(differ))
        out["es/antithetic_fitness_gap"] = float(np.mean([abs(f[i] - f[j]) for i, j in pairs]))
    return out
