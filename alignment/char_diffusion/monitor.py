"""Is GRPO learning the text or gaming the judge? The masked characters are known, so every figure
here compares the judge's opinion with the ground truth.

* :func:`fill_accuracies` and :func:`pair_agreement`: within each group (the k fills of one masked
  input, which differ only in their draws), how often the judge orders two fills as their true
  accuracy does. GRPO only ever uses the judge's ranking inside a group (advantages are
  group-relative), so this, not the judge's error across blocks, is the judge quality that
  decides whether GRPO helps.
* :class:`HackingWatch`: the held-out evaluations in order; reward above and fill accuracy below
  the most accurate evaluation so far, ``patience`` evaluations in a row, is the judge-hacking
  pattern, and it says so.
* :class:`BestKeeper`: the best held-out fill accuracy so far, to keep a ``best/`` checkpoint by it.

Both classes round-trip through ``state_dict`` so that a resumed run warns and keeps ``best/``
exactly as an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from alignment.char_diffusion.sampling import to_positions


def fill_accuracies(draws: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each fill's masked characters equal to the original: draws long[k, N], tokens
    long[B, T], mask bool[B, T] (N = mask.sum()) -> float[B, k]."""
    right = (draws == tokens[mask].unsqueeze(0)).float()  # [k, N]
    per_row = to_positions(right, mask).sum(-1)  # [B, k]
    return per_row / mask.sum(-1, keepdim=True).clamp(min=1)


def pair_agreement(scores: torch.Tensor, truth: torch.Tensor) -> tuple[float, int]:
    """How often ``scores`` order two members of a group as ``truth`` does.

    scores, truth: float[B, k] (a group per row). Pairs tied in ``truth`` carry no information and
    are skipped; a tie in ``scores`` counts one half. Returns (agreement in [0, 1], pairs counted);
    (nan, 0) when no pair differs in truth. 0.5 is a judge that cannot rank fills at all.
    """
    ds = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # [B, k, k]
    dt = truth.unsqueeze(-1) - truth.unsqueeze(-2)
    upper = torch.ones_like(dt, dtype=torch.bool).triu(diagonal=1)
    informative = upper & (dt != 0)
    pairs = int(informative.sum())
    if pairs == 0:
        return float("nan"), 0
    agree = torch.where(ds == 0, 0.5, ((ds > 0) == (dt > 0)).float())
    return float(agree[informative].sum()) / pairs, pairs


@dataclass
class HackingWatch:
    """Flags judge hacking in the held-out evaluations of a run.

    The reference is the most accurate evaluation so far (where ``best/`` was saved). An evaluation
    diverges from it when its judge reward is higher and its fill accuracy lower by more than
    ``tolerance``; ``patience`` diverging evaluations in a row are judge hacking (0: never flags).
    Comparing with the reference, not only with the previous evaluation, catches an accuracy that
    drops at once and then stays down while the reward keeps creeping up. :meth:`update` returns the
    warning text at every evaluation of such a streak from the ``patience``-th on, else None.
    """

    patience: int = 2
    tolerance: float = 0.005
    streak: int = 0
    reference: tuple[int, float, float] | None = None  # (iteration, reward, accuracy) of the most accurate
    flagged: list[int] = field(default_factory=list)  # iterations at which it warned

    def update(self, iteration: int, reward: float, accuracy: float) -> str | None:
        if self.reference is None or accuracy > self.reference[2]:
            self.reference, self.streak = (iteration, reward, accuracy), 0
            return None
        it0, r0, a0 = self.reference
        self.streak = self.streak + 1 if reward > r0 and accuracy < a0 - self.tolerance else 0
        if self.patience < 1 or self.streak < self.patience:
            return None
        self.flagged.append(iteration)
        return (
            f"judge hacking: held-out judge reward rose {r0:.4f} -> {reward:.4f} while fill accuracy fell "
            f"{a0:.4f} -> {accuracy:.4f} (iteration {it0}, the most accurate so far, to {iteration}; "
            f"{self.streak} evaluations in a row): the policy is exploiting the judge, not learning the text; "
            f"best/ keeps iteration {it0}. Stop, or raise kl_beta, lower learning_rate, or train a better "
            f"judge (its pair agreement)"
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience, self.tolerance, self.streak = (
            int(state["patience"]),
            float(state["tolerance"]),
            int(state["streak"]),
        )
        self.reference = tuple(state["reference"]) if state["reference"] is not None else None
        self.flagged = [int(i) for i in state["flagged"]]


@dataclass
class BestKeeper:
    """The best held-out fill accuracy seen and where; :meth:`improves` says whether a new
    evaluation beats it (strictly: on a tie the earlier, closer-to-reference policy stays)."""

    accuracy: float = float("-inf")
    iteration: int = -1
    reward: float = float("nan")

    def improves(self, iteration: int, accuracy: float, reward: float) -> bool:
        if accuracy <= self.accuracy:
            return False
        self.accuracy, self.iteration, self.reward = accuracy, iteration, reward
        return True

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accuracy, self.iteration, self.reward = (float(state["accuracy"]), int(state["iteration"]),
                                                      float(state["reward"]))  # fmt: skip
