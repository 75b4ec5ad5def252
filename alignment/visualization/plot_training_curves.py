"""Reward, cost and λ over training steps for ES and GRPO runs, read from their TensorBoard logs.

    python alignment/visualization/plot_training_curves.py logs/es/alignment_20251104_160009 \\
        logs/grpo/run_20251120_101500 --labels ES GRPO --smooth 0.6 --output curves.png

A run folder is an ES run (``<run>/logs/events.out.tfevents.*`` with ``train/reward_mean``,
``train/cost_mean``, ``lambda/value``, ``eval/R_mean``, ``eval/C_mean``; step = iteration) or a GRPO
run (``<run>/runs/events.out.tfevents.*`` with ``train/scorer/reward_mean``,
``train/scorer/cost_mean``, ``train/lambda/value``, ``train/eval/reward_mean``,
``train/eval/cost_mean``; step = optimiser step); the kind is told from the tags. Greedy evaluations
are drawn as markers. When a run's saved configuration gives ``cost_threshold_d`` (ES:
``config.yaml``; GRPO: the λ state in the newest ``checkpoint-*/trainer_state.json``), its
constraint E[C] ≤ −d is a dashed line in the cost panel.

Without ``--labels``, the legend names each run by what sets it apart from the other runs of its
kind: its ``run_name`` and the (at most three) ``config.yaml`` keys whose values differ, e.g.
``ES noise=full`` and ``ES noise=lowrank``; a run alone of its kind is just ``ES`` or ``GRPO``;
the folder name is the last resort (no saved config, or identical configs).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

if __package__ in (None, ""):  # run as `python alignment/visualization/plot_training_curves.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alignment import cli
from alignment.cli import InputError
from alignment.config import finite_number
from alignment.tracking import read_tensorboard_scalars
from alignment.visualization.style import new_figure, save_figure, series_color

logger = logging.getLogger(__name__)

Series = list[tuple[int, float]]  # (step, value), sorted by step
EVENT_GLOB = "events.out.tfevents.*"
# kind -> the tags of (reward, cost, λ, eval reward, eval cost)
TAGS = {
    "ES": ("train/reward_mean", "train/cost_mean", "lambda/value", "eval/R_mean", "eval/C_mean"),
    "GRPO": ("train/scorer/reward_mean", "train/scorer/cost_mean", "train/lambda/value",
             "train/eval/reward_mean", "train/eval/cost_mean"),
}  # fmt: skip
PANELS = ("reward", "cost", "lambda")


@dataclass
class RunCurves:
    """One run's curves: each a list of (step, value); ``cost_threshold_d`` None when not found."""

    label: str | None  # None: named by what differs from the other runs (legend_labels)
    kind: str  # "ES" or "GRPO"
    reward: Series
    cost: Series
    lam: Series
    eval_reward: Series = field(default_factory=list)
    eval_cost: Series = field(default_factory=list)
    cost_threshold_d: float | None = None
    folder: str = ""  # the run folder's name
    config: dict[str, Any] = field(default_factory=dict)  # its config.yaml, GRPOConfig extras flattened


def event_dir(run_dir: Path) -> Path:
    """The one folder under ``run_dir`` (itself included) that holds TensorBoard event files.

    Several folders with event files mean several runs (e.g. an experiment folder was given), which
    must not be merged silently: that is an error listing them.
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run folder: {run_dir}")
    folders = sorted({p.parent for p in run_dir.rglob(EVENT_GLOB) if p.is_file()})
    if not folders:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files ({EVENT_GLOB}) in it or below")
    if len(folders) > 1:
        raise InputError(
            f"{run_dir}: event files in {len(folders)} folders {[str(f) for f in folders]}; pass one run folder"
        )
    return folders[0]


def detect_kind(tags: Sequence[str], where: Path) -> str:
    """Tell "ES" from "GRPO" by which reward tag exists; a ValueError listing some found tags otherwise."""
    kinds = [kind for kind, tag_set in TAGS.items() if tag_set[0] in tags]
    if len(kinds) != 1:
        found = sorted(tags)
        raise InputError(
            f"{where}: cannot tell ES from GRPO: expected exactly one of the tags "
            f"{[t[0] for t in TAGS.values()]}, found {len(found)} tags {found[:12]}"
        )
    return kinds[0]


def _threshold_from_grpo(run_root: Path) -> float | None:
    """From the λ controller's state that the newest checkpoint's trainer_state.json keeps."""
    numbered = [p for p in run_root.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    states = [p / "trainer_state.json" for p in numbered if (p / "trainer_state.json").is_file()]
    if not states:
        return None
    newest = max(states, key=lambda p: int(p.parent.name.split("-")[1]))
    try:
        state = json.loads(newest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{newest}: not JSON: {exc}") from exc
    for callback in (state.get("stateful_callbacks") or {}).values():
        attributes = callback.get("attributes") if isinstance(callback, dict) else None
        lagrange = attributes.get("lagrange_state") if isinstance(attributes, dict) else None
        config = lagrange.get("config") if isinstance(lagrange, dict) else None
        if isinstance(config, dict) and "cost_threshold_d" in config:
            return config["cost_threshold_d"]
    return None


def run_config(run_root: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` (written by both trainers) as one flat mapping; empty when absent."""
    path = run_root / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not YAML: {exc}") from exc
    if not isinstance(config, dict):
        return {}
    extra = config.pop("extra", None)  # GRPO: the GRPOConfig fields given in the recipe
    return {**config, **(extra if isinstance(extra, dict) else {})}


# Keys that say where a run wrote or how it reached its services, not what was trained: they
# differ between any two runs and would crowd the legend.
NOT_DISTINCTIVE = frozenset({
    "experiment_dir", "output_dir", "run_name", "scorer_url", "scorer_address_file", "scorer_batch_size",
    "scorer_timeout", "scorer_retries", "wandb", "wandb_project", "save_every", "save_steps", "logging_dir",
})  # fmt: skip
# Shown first when they differ: the choices runs are usually compared by.
FIRST_KEYS = (
    "noise", "noise_rank", "policy_model_path", "model_name", "population_size", "sigma", "alpha", "beta",
    "learning_rate", "num_generations", "loss_type", "lambda_adapt", "lambda_rule", "lambda_cost",
    "cost_threshold_d", "lambda_lr", "seed",
)  # fmt: skip
MAX_LEGEND_KEYS = 3


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose values are not all equal across ``configs`` (absent counts as a value), the
    telling ones first (:data:`FIRST_KEYS`), then alphabetically; placement keys are left out."""
    keys = {k for c in configs for k in c} - NOT_DISTINCTIVE
    missing = object()
    differ = [k for k in keys if len({repr(c.get(k, missing)) for c in configs}) > 1]
    return sorted(differ, key=lambda k: (FIRST_KEYS.index(k) if k in FIRST_KEYS else len(FIRST_KEYS), k))


def legend_labels(runs: Sequence[RunCurves]) -> list[str]:
    """Each run's given label, or one naming what sets it apart from the runs of its kind (module doc)."""
    labels: list[str] = []
    for run in runs:
        if run.label is not None:
            labels.append(run.label)
            continue
        peers = [r for r in runs if r.kind == run.kind]
        name = run.config.get("run_name")
        base = f"{run.kind} {name}" if name else run.kind
        if len(peers) == 1:
            labels.append(base)
            continue
        keys = differing_keys([r.config for r in peers]) if all(r.config for r in peers) else []
        parts = [f"{k}={_value_text(run.config.get(k))}" for k in keys[:MAX_LEGEND_KEYS]]
        if len(keys) > MAX_LEGEND_KEYS:
            parts.append(f"+{len(keys) - MAX_LEGEND_KEYS} more")
        labels.append(f"{base} {', '.join(parts)}" if parts else f"{base} {run.folder}")
    for i, label in enumerate(labels):  # runs that still read the same are told apart by folder
        if labels.count(label) > 1 and runs[i].label is None:
            labels[i] = f"{label} ({runs[i].folder})"
    return labels


def cost_threshold(run_root: Path, kind: str) -> float | None:
    """``cost_threshold_d`` from the run's saved configuration, or None when it saved none."""
    value = run_config(run_root).get("cost_threshold_d") if kind == "ES" else _threshold_from_grpo(run_root)
    if value is None:
        return None
    return finite_number(value, f"{run_root}: cost_threshold_d")


def load_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """The curves of one ES or GRPO run folder (or its ``logs``/``runs`` folder itself).

    Reward and cost must be logged; a missing λ tag only warns (a fixed-λ run may not log it).
    """
    run_dir = Path(run_dir)
    events = event_dir(run_dir)
    scalars = read_tensorboard_scalars(events)
    kind = detect_kind(list(scalars), events)
    reward_tag, cost_tag, lambda_tag, eval_reward_tag, eval_cost_tag = TAGS[kind]
    if cost_tag not in scalars:
        raise InputError(f"{events}: {kind} run without the {cost_tag!r} tag")
    if lambda_tag not in scalars:
        logger.warning("%s: no %r tag; the λ panel has no line for this run", events, lambda_tag)
    run_root = run_dir.parent if run_dir.name in ("logs", "runs") else run_dir
    return RunCurves(
        label=label,
        kind=kind,
        reward=scalars[reward_tag],
        cost=scalars[cost_tag],
        lam=scalars.get(lambda_tag, []),
        eval_reward=scalars.get(eval_reward_tag, []),
        eval_cost=scalars.get(eval_cost_tag, []),
        cost_threshold_d=cost_threshold(run_root, kind),
        folder=run_root.name,
        config=run_config(run_root),
    )


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style smoothing: s_t = w·s_{t−1} + (1 − w)·v_t, debiased so s_0 = v_0."""
    if not 0.0 <= weight < 1.0:
        raise InputError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc = [], 0.0
    for t, value in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * value
        out.append(acc / (1.0 - weight**t))
    return out


def _draw_series(ax: Any, series: Series, color: Any, panel: str, smooth: float) -> None:
    """The raw curve (gid ``"<panel>/raw"``) and, with ``smooth`` > 0, a smoothed one (``"<panel>/smooth"``)
    over a faint raw curve."""
    if not series:
        return
    steps = [s for s, _ in series]
    values = [v for _, v in series]
    if smooth > 0:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=1, gid=f"{panel}/raw")
        ax.plot(steps, ema(values, smooth), color=color, linewidth=1.6, gid=f"{panel}/smooth")
    else:
        ax.plot(steps, values, color=color, linewidth=1.4, gid=f"{panel}/raw")


def _legend_entries(runs: Sequence[RunCurves]) -> tuple[list[Line2D], list[str]]:
    """One entry per run (its colour; its constraint when known), then what the markings mean."""
    handles: list[Line2D] = []
    labels: list[str] = []
    for index, (run, name) in enumerate(zip(runs, legend_labels(runs), strict=True)):
        handles.append(Line2D([], [], color=series_color(index), linewidth=2))
        bound = 0.0 - run.cost_threshold_d if run.cost_threshold_d is not None else None  # 0.0 - 0.0 is +0
        labels.append(name if bound is None else f"{name} (constraint E[C] ≤ {bound:g})")
    if any(run.eval_reward or run.eval_cost for run in runs):
        handles.append(Line2D([], [], linestyle="none", marker="D", color="gray", markeredgecolor="black"))
        labels.append("greedy evaluation")
    if any(run.cost_threshold_d is not None for run in runs):
        handles.append(Line2D([], [], color="gray", linestyle="--"))
        labels.append("cost constraint −d (run's colour)")
    handles.append(Line2D([], [], color="red", alpha=0.6))
    labels.append("cost = 0 (safe ⇔ cost ≤ 0)")
    return handles, labels


def plot_training_curves(runs: Sequence[RunCurves], smooth: float = 0.0) -> Figure:
    """Three panels side by side (reward, cost, λ), one colour per run, one legend below them.

    Lines carry gids ``"<panel>/raw"``, ``"<panel>/smooth"``, ``"<panel>/eval"`` (greedy evaluation
    markers) and ``"cost/threshold"`` (the dashed constraint E[C] ≤ −d), ``panel`` one of
    reward, cost, lambda; the cost panel also has the cost = 0 line (gid ``"cost/zero"``).
    """
    if not runs:
        raise InputError("no runs to plot")
    ema([], smooth)  # reject a bad weight before drawing anything
    fig = new_figure((15.0, 4.3))
    ax_r, ax_c, ax_l = fig.subplots(1, 3)
    ax_c.axhline(0.0, color="red", linewidth=1, alpha=0.6, gid="cost/zero")
    for index, run in enumerate(runs):
        color = series_color(index)
        _draw_series(ax_r, run.reward, color, "reward", smooth)
        _draw_series(ax_c, run.cost, color, "cost", smooth)
        _draw_series(ax_l, run.lam, color, "lambda", smooth)
        for ax, ev, panel in ((ax_r, run.eval_reward, "reward"), (ax_c, run.eval_cost, "cost")):
            if ev:
                ax.plot([s for s, _ in ev], [v for _, v in ev], linestyle="none", marker="D", markersize=5,
                        markeredgecolor="black", color=color, gid=f"{panel}/eval")  # fmt: skip
        if run.cost_threshold_d is not None:
            ax_c.axhline(
                -run.cost_threshold_d, color=color, linestyle="--", linewidth=1.2, gid="cost/threshold"
            )
    kinds = sorted({run.kind for run in runs})
    unit = {"ES": "ES: iteration", "GRPO": "GRPO: optimiser step"}
    for ax, name in zip((ax_r, ax_c, ax_l), ("mean reward", "mean cost", "λ"), strict=True):
        ax.set_title(name)
        ax.set_xlabel(f"step ({'; '.join(unit[k] for k in kinds)})")
        ax.grid(linestyle=":", alpha=0.6)
    fig.tight_layout()
    handles, labels = _legend_entries(runs)
    # below the panels; save_figure's tight bounding box grows to include it
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
               fontsize=8, frameon=False)  # fmt: skip
    return fig


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="ES or GRPO run folder(s)")
    p.add_argument("--labels", nargs="+", help="legend label per run (default: what sets each run apart)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="TensorBoard-style EMA weight in [0, 1) for the curves (0: raw)")  # fmt: skip
    p.add_argument("--output", type=Path, help="PNG to write (default FIRST_RUN_DIR/training_curves.png)")
    a = p.parse_args(argv)
    if a.labels is not None and len(a.labels) != len(a.run_dirs):
        p.error(f"--labels gives {len(a.labels)} label(s) for {len(a.run_dirs)} run folder(s)")
    labels = a.labels or [None] * len(a.run_dirs)
    runs = [load_run(d, lab) for d, lab in zip(a.run_dirs, labels, strict=True)]
    print(
        save_figure(plot_training_curves(runs, a.smooth), a.output or a.run_dirs[0] / "training_curves.png")
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
