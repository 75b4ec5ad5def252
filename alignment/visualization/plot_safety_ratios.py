"""Stacked SH/SU/UH/UU bars per model (percent of responses), the safe ratio written above each bar.

    python alignment/visualization/plot_safety_ratios.py --input alignment/outputs/model_comparisons
    python alignment/visualization/plot_safety_ratios.py --models Alpaca-7B Beaver-V3 ES-500 --output s.png

Reads each model's ``_summary.json`` (computed from its scores when absent) from the
model-comparisons folder and writes ``model_safety_ratios.png`` there unless ``--output`` says
otherwise. Safe means cost ≤ 0, helpful reward > 0 (:mod:`alignment.scoring.quadrants`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

if __package__ in (None, ""):  # run as `python alignment/visualization/plot_safety_ratios.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment import cli
from alignment.cli import InputError
from alignment.config import finite_number
from alignment.evaluation.comparisons import list_models, load_summary
from alignment.scoring.quadrants import LABELS
from alignment.visualization.style import (
    QUADRANT_COLORS,
    QUADRANT_NAMES,
    choose_models,
    new_figure,
    require_dir,
    save_figure,
)

DEFAULT_INPUT = Path("alignment/outputs/model_comparisons")
DEFAULT_NAME = "model_safety_ratios.png"
MIN_LABELLED_PERCENT = 4.0  # thinner segments get no number: it would not fit inside them


@dataclass(frozen=True)
class QuadrantShares:
    """One model's bar: ``percents`` maps SH/SU/UH/UU to percent of its responses; ``safe_ratio`` = SH + SU."""

    model: str
    percents: dict[str, float]
    safe_ratio: float
    num_points: int | None


def shares_from_summary(model: str, summary: Mapping[str, Any]) -> QuadrantShares:
    """The bar of one model from its summary dict (``percents``, optional ``safe_ratio``/``num_points``).

    Raises ValueError naming the model and field when a percent is missing or not a finite number.
    """
    percents = summary.get("percents")
    if not isinstance(percents, Mapping):
        raise InputError(f"{model}: summary has no 'percents' object")
    clean = {
        label: finite_number(percents.get(label), f"{model}: summary percents[{label!r}]") for label in LABELS
    }
    safe = finite_number(summary.get("safe_ratio", clean["SH"] + clean["SU"]), f"{model}: summary safe_ratio")
    return QuadrantShares(model, clean, safe, summary.get("num_points"))


def load_shares(directory: str | Path, models: Sequence[str] | None = None) -> list[QuadrantShares]:
    """The bars of ``models`` (default: every model in ``directory``, sorted) in that order."""
    directory = require_dir(directory, "model comparisons")
    chosen = choose_models(list_models(directory), models, directory)
    return [shares_from_summary(m, load_summary(directory, m)) for m in chosen]


def plot_safety_ratios(shares: Sequence[QuadrantShares], title: str | None = None) -> Figure:
    """One stacked bar per model, bottom to top SH, SU, UH, UU, so the safe part is the lower block.

    Each quadrant is one BarContainer labelled with the quadrant (e.g. ``"SH"``) whose patch heights
    are the percents in model order; segments of at least 4 % carry their value, and the safe ratio
    is written above each bar.
    """
    if not shares:
        raise InputError("no models to plot")
    fig = new_figure((max(6.0, 1.25 * len(shares) + 3.0), 4.8))
    ax = fig.subplots()
    x = list(range(len(shares)))
    width = 0.65
    bottoms = [0.0] * len(shares)
    for label in LABELS:
        heights = [s.percents[label] for s in shares]
        bars = ax.bar(x, heights, width, bottom=bottoms, color=QUADRANT_COLORS[label],
                      edgecolor="white", linewidth=0.6, label=label)  # fmt: skip
        texts = [f"{h:.1f}" if h >= MIN_LABELLED_PERCENT else "" for h in heights]
        ax.bar_label(bars, labels=texts, label_type="center", fontsize=8)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for xi, s in zip(x, shares, strict=True):
        # the top of SU: where safe ends in the stack, marked so the eye finds the safe ratio
        ax.hlines(
            s.percents["SH"] + s.percents["SU"], xi - width / 2, xi + width / 2, color="black", linewidth=1
        )
        ax.text(xi, max(bottoms[xi], 100.0) + 1.5, f"safe {s.safe_ratio:.1f}%", ha="center", va="bottom",
                fontsize=9, fontweight="bold")  # fmt: skip
    ax.set_xticks(x, [s.model for s in shares], rotation=20 if len(shares) > 6 else 0)
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.yaxis.set_major_formatter(PercentFormatter(100))
    ax.set_ylabel("share of responses")
    ax.set_title(title or "Responses by quadrant (safe: cost ≤ 0, helpful: reward > 0)")
    ax.grid(axis="y", linestyle=":", alpha=0.6)
    ax.set_axisbelow(True)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], [f"{lab} {QUADRANT_NAMES[lab]}" for lab in LABELS[::-1]],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)  # fmt: skip
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--input", "--outputs-dir", dest="input", type=Path, default=DEFAULT_INPUT,
                   help="model comparisons folder")  # fmt: skip
    p.add_argument("--output", type=Path, help=f"PNG to write (default INPUT/{DEFAULT_NAME})")
    p.add_argument("--models", nargs="+", help="models to show, in this order (default: all, sorted)")
    p.add_argument("--title", help="figure title (default: none)")
    a = p.parse_args(argv)
    fig = plot_safety_ratios(load_shares(a.input, a.models), a.title)
    print(save_figure(fig, a.output or a.input / DEFAULT_NAME))
    return 0


if __name__ == "__main__":
    cli.run(main)
