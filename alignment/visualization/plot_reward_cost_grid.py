"""One reward–cost scatter per model on a shared axis range, with quadrant lines and percentages.

    python alignment/visualization/plot_reward_cost_grid.py --input alignment/outputs/model_comparisons
    python alignment/visualization/plot_reward_cost_grid.py --models Alpaca-7B ES-500 --xlim -12 12

Reads ``{Model}_Rs.npy``/``_Cs.npy`` (or ``_points.jsonl``) from the model-comparisons folder and
writes ``reward_cost_scatter_grid.png`` there unless ``--output`` says otherwise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as `python alignment/visualization/plot_reward_cost_grid.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment import cli
from alignment.cli import InputError
from alignment.evaluation.comparisons import draw_scatter, list_models, load_scores
from alignment.visualization.style import choose_models, new_figure, require_dir, save_figure, series_color

DEFAULT_INPUT = Path("alignment/outputs/model_comparisons")
DEFAULT_NAME = "reward_cost_scatter_grid.png"
DEFAULT_XLIM = (-10.0, 10.0)  # cost axis, as in the study's figure
DEFAULT_YLIM = (-4.0, 4.0)  # reward axis


@dataclass(frozen=True)
class ModelScores:
    """One model's scores: ``rewards`` and ``costs`` are float32 arrays of shape (num_points,)."""

    model: str
    rewards: np.ndarray
    costs: np.ndarray

    def num_outside(self, xlim: tuple[float, float], ylim: tuple[float, float]) -> int:
        """Points the axis range hides: cost outside ``xlim`` or reward outside ``ylim`` (bounds inclusive)."""
        inside = (self.costs >= xlim[0]) & (self.costs <= xlim[1])
        inside &= (self.rewards >= ylim[0]) & (self.rewards <= ylim[1])
        return int(self.rewards.size - np.count_nonzero(inside))


def load_grid_scores(directory: str | Path, models: Sequence[str] | None = None) -> list[ModelScores]:
    """The scores of ``models`` (default: every model in ``directory``, sorted) in that order."""
    directory = require_dir(directory, "model comparisons")
    chosen = choose_models(list_models(directory), models, directory)
    return [ModelScores(m, *load_scores(directory, m)) for m in chosen]


def check_range(lim: Sequence[float], name: str) -> tuple[float, float]:
    """``lim`` as (low, high), or a ValueError naming ``name`` when it is not two finite increasing numbers."""
    if len(lim) != 2 or not all(math.isfinite(v) for v in lim) or lim[0] >= lim[1]:
        raise InputError(f"{name} must be two finite numbers LOW < HIGH, got {list(lim)}")
    return float(lim[0]), float(lim[1])


def plot_reward_cost_grid(
    scores: Sequence[ModelScores],
    xlim: Sequence[float] = DEFAULT_XLIM,
    ylim: Sequence[float] = DEFAULT_YLIM,
    ncols: int = 3,
) -> Figure:
    """A grid with one :func:`draw_scatter` panel per model (title = model name), all on ``xlim``×``ylim``.

    Each panel also notes at its bottom how many points there are and how many the range hides
    (those still count in the quadrant percentages). Unused grid cells are removed.
    """
    if not scores:
        raise InputError("no models to plot")
    if ncols < 1:
        raise InputError(f"ncols must be >= 1, got {ncols}")
    xlim, ylim = check_range(xlim, "xlim (cost)"), check_range(ylim, "ylim (reward)")
    ncols = min(ncols, len(scores))
    nrows = math.ceil(len(scores) / ncols)
    fig = new_figure((4.5 * ncols, 4.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for index, (ax, entry) in enumerate(zip(axes, scores, strict=False)):
        draw_scatter(
            ax, entry.rewards, entry.costs, entry.model, color=series_color(index), xlim=xlim, ylim=ylim
        )
        outside = entry.num_outside(xlim, ylim)
        ax.text(0.5, 0.02, f"n={entry.rewards.size}, {outside} outside view", transform=ax.transAxes,
                ha="center", va="bottom", fontsize=7, color="dimgray",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.7, "linewidth": 0})  # fmt: skip
    for ax in axes[len(scores) :]:
        ax.remove()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--input", "--outputs-dir", dest="input", type=Path, default=DEFAULT_INPUT,
                   help="model comparisons folder")  # fmt: skip
    p.add_argument("--output", type=Path, help=f"PNG to write (default INPUT/{DEFAULT_NAME})")
    p.add_argument("--models", nargs="+", help="models to show, in this order (default: all, sorted)")
    p.add_argument("--xlim", nargs=2, type=float, default=DEFAULT_XLIM, metavar=("LOW", "HIGH"),
                   help="cost axis range")  # fmt: skip
    p.add_argument("--ylim", nargs=2, type=float, default=DEFAULT_YLIM, metavar=("LOW", "HIGH"),
                   help="reward axis range")  # fmt: skip
    p.add_argument("--ncols", type=int, default=3, help="panels per row")
    a = p.parse_args(argv)
    fig = plot_reward_cost_grid(load_grid_scores(a.input, a.models), a.xlim, a.ylim, a.ncols)
    print(save_figure(fig, a.output or a.input / DEFAULT_NAME))
    return 0


if __name__ == "__main__":
    cli.run(main)
