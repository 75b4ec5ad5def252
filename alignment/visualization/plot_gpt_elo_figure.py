"""Helpfulness against harmlessness Elo of each model from the GPT judge, with CIs when present.

    python alignment/visualization/plot_gpt_elo_figure.py --input alignment/outputs/gpt_elo

Reads ``gpt_elo_ratings.json`` = ``{"helpfulness": {model: elo}, "harmlessness": {model: elo}}``
(the study's sequential Elo) and, when present, ``gpt_elo_bradley_terry.json`` =
``{"method": "bradley-terry", "n_bootstrap": B, "ci": 0.95, ..., "ratings": {dimension: {model:
{"rating", "ci_low", "ci_high"}}}}``, drawn as a second panel with CI error bars in both directions.
Writes ``gpt_elo_scatter.png`` in the input folder unless ``--output`` says otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

if __package__ in (None, ""):  # run as `python alignment/visualization/plot_gpt_elo_figure.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment import cli
from alignment.cli import InputError
from alignment.config import finite_number
from alignment.visualization.style import new_figure, require_dir, save_figure

DEFAULT_INPUT = Path("alignment/outputs/gpt_elo")
RATINGS_NAME = "gpt_elo_ratings.json"
BT_NAME = "gpt_elo_bradley_terry.json"
DEFAULT_NAME = "gpt_elo_scatter.png"
DIMENSIONS = ("helpfulness", "harmlessness")


@dataclass(frozen=True)
class Rating:
    """A model's rating on one dimension; ``ci`` = (low, high) when the source gives an interval."""

    value: float
    ci: tuple[float, float] | None = None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no such ratings file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON: {exc}") from exc


def _check_models(table: Mapping[str, Mapping[str, Rating]], path: Path) -> None:
    """Both dimensions must rate the same models: a point needs both coordinates."""
    help_models, harm_models = set(table["helpfulness"]), set(table["harmlessness"])
    if help_models != harm_models:
        raise InputError(
            f"{path}: helpfulness and harmlessness rate different models: only in helpfulness "
            f"{sorted(help_models - harm_models)}, only in harmlessness {sorted(harm_models - help_models)}"
        )
    if not help_models:
        raise InputError(f"{path}: no models rated")


def read_elo_ratings(path: str | Path) -> dict[str, dict[str, Rating]]:
    """``gpt_elo_ratings.json`` as {dimension: {model: Rating}} (no CIs), both dimensions checked."""
    path = Path(path)
    data = _read_json(path)
    table: dict[str, dict[str, Rating]] = {}
    for dim in DIMENSIONS:
        ratings = data.get(dim) if isinstance(data, dict) else None
        if not isinstance(ratings, dict):
            raise InputError(f"{path}: missing the {dim!r} object of model -> Elo")
        table[dim] = {m: Rating(finite_number(v, f"{path}: {dim}[{m!r}]")) for m, v in ratings.items()}
    _check_models(table, path)
    return table


def read_bt_ratings(path: str | Path) -> tuple[dict[str, dict[str, Rating]], dict[str, Any]]:
    """``gpt_elo_bradley_terry.json`` as ({dimension: {model: Rating with CI}}, the file's other keys).

    Each entry needs ``rating``, and ``ci_low <= ci_high`` or both null (no bootstrap). A percentile
    interval may exclude the estimate on little data; it is drawn as it is.
    """
    path = Path(path)
    data = _read_json(path)
    ratings = data.get("ratings") if isinstance(data, dict) else None
    if not isinstance(ratings, dict):
        raise InputError(f"{path}: missing the 'ratings' object of dimension -> model -> rating")
    table: dict[str, dict[str, Rating]] = {}
    for dim in DIMENSIONS:
        if not isinstance(ratings.get(dim), dict):
            raise InputError(f"{path}: ratings has no {dim!r} object")
        table[dim] = {}
        for model, entry in ratings[dim].items():
            where = f"{path}: ratings[{dim!r}][{model!r}]"
            if not isinstance(entry, dict):
                raise InputError(f"{where} must be an object with rating, ci_low, ci_high")
            value = finite_number(entry.get("rating"), f"{where}.rating")
            if entry.get("ci_low") is None and entry.get("ci_high") is None:  # no bootstrap was run
                table[dim][model] = Rating(value)
                continue
            low, high = (finite_number(entry.get(k), f"{where}.{k}") for k in ("ci_low", "ci_high"))
            if not low <= high:
                raise InputError(f"{where}: need ci_low <= ci_high, got {low}, {high}")
            table[dim][model] = Rating(value, (low, high))
    _check_models(table, path)
    return table, {k: v for k, v in data.items() if k != "ratings"}


def _draw_ratings(ax: Any, table: Mapping[str, Mapping[str, Rating]], color: Any) -> None:
    """Harmlessness (x) against helpfulness (y), one labelled point per model, error bars when CIs exist."""
    models = sorted(table["helpfulness"])
    xs = [table["harmlessness"][m].value for m in models]
    ys = [table["helpfulness"][m].value for m in models]
    ax.scatter(xs, ys, s=40, color=color, zorder=3)
    # intervals as plain segments, not error bars: a percentile interval need not contain the estimate
    segments = []
    for m, x, y in zip(models, xs, ys, strict=True):
        if (ci := table["harmlessness"][m].ci) is not None:
            segments.append([(ci[0], y), (ci[1], y)])
        if (ci := table["helpfulness"][m].ci) is not None:
            segments.append([(x, ci[0]), (x, ci[1])])
    if segments:
        ax.add_collection(LineCollection(segments, colors=[color], linewidths=1.2, alpha=0.8, zorder=2))
    for model, x, y in zip(models, xs, ys, strict=True):
        ax.annotate(model, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9)
    ax.set_xlabel("Harmlessness (Elo)")
    ax.set_ylabel("Helpfulness (Elo)")
    ax.grid(linestyle=":", alpha=0.6)
    ax.margins(x=0.08, y=0.08)
    low, high = ax.get_xlim()
    ax.set_xlim(low, high + 0.12 * (high - low))  # room for the label of the rightmost point


def plot_gpt_elo(
    elo: Mapping[str, Mapping[str, Rating]],
    bt: Mapping[str, Mapping[str, Rating]] | None = None,
    bt_meta: Mapping[str, Any] | None = None,
) -> Figure:
    """The study's Elo scatter (a PathCollection whose offsets are (harmlessness, helpfulness) per model,
    models sorted); with ``bt``, a second panel of Bradley–Terry ratings with CI error bars both ways."""
    fig = new_figure((10.5, 4.6) if bt is not None else (5.5, 4.6))
    axes = fig.subplots(1, 2 if bt is not None else 1, squeeze=False).ravel()
    _draw_ratings(axes[0], elo, "tab:blue")
    axes[0].set_title("Sequential Elo (GPT judge)")
    if bt is not None:
        meta = bt_meta or {}
        _draw_ratings(axes[1], bt, "tab:purple")
        ci = meta.get("ci")
        ci_text = f"{100 * ci:.0f}% CI" if isinstance(ci, (int, float)) else "CI"
        boot = f", {meta['n_bootstrap']} bootstraps" if "n_bootstrap" in meta else ""
        axes[1].set_title(f"Bradley–Terry ({ci_text}{boot})")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--input", "--outputs-dir", dest="input", type=Path, default=DEFAULT_INPUT,
                   help=f"GPT Elo folder holding {RATINGS_NAME}")  # fmt: skip
    p.add_argument("--bt", type=Path, help=f"Bradley–Terry ratings (default INPUT/{BT_NAME} when it exists)")
    p.add_argument("--no-bt", action="store_true", help="draw the Elo panel only")
    p.add_argument("--output", type=Path, help=f"PNG to write (default INPUT/{DEFAULT_NAME})")
    a = p.parse_args(argv)
    folder = require_dir(a.input, "GPT Elo")
    elo = read_elo_ratings(folder / RATINGS_NAME)
    bt_path = None if a.no_bt else a.bt or (folder / BT_NAME if (folder / BT_NAME).is_file() else None)
    bt, meta = read_bt_ratings(bt_path) if bt_path is not None else (None, None)
    print(save_figure(plot_gpt_elo(elo, bt, meta), a.output or a.input / DEFAULT_NAME))
    return 0


if __name__ == "__main__":
    cli.run(main)
