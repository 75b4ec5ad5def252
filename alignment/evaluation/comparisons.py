"""The model-comparison outputs folder: the one home of its file names, formats and per-model scatter.

For each model ``M`` the folder holds (the published study's layout, see ../shared/reference):

- ``M_points.jsonl``: one row per prompt: ``prompt``, ``response``, ``reward``, ``cost``, ``label``;
- ``M_Rs.npy``, ``M_Cs.npy``: rewards and costs, float32, in the same order;
- ``M_labels.npy``: the SH/SU/UH/UU labels (unicode array);
- ``M_summary.json``: :func:`alignment.scoring.quadrants.summarize` plus provenance keys;
- ``M_scatter.png``: reward against cost with the quadrant lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignment.atomic import write_text
from alignment.cli import InputError
from alignment.config import finite_number
from alignment.data import iter_jsonl
from alignment.scoring.quadrants import LABELS, quadrant_labels, summarize

POINTS_SUFFIX = "_points.jsonl"
STAT_KEYS = ("counts", "percents", "safe_ratio", "R_mean", "R_std", "C_mean", "C_std", "num_points")
POINT_KEYS = ("prompt", "response", "reward", "cost")


def model_file(out_dir: str | Path, model: str, suffix: str) -> Path:
    """``out_dir/{model}{suffix}``, e.g. ``model_file(d, "ES-500", "_summary.json")``."""
    return Path(out_dir) / f"{model}{suffix}"


def list_models(directory: str | Path, suffix: str = POINTS_SUFFIX) -> list[str]:
    """Model names that have a ``{model}{suffix}`` file in ``directory``, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such outputs folder: {directory}")
    return sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}") if p.is_file())


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def read_points(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``_points.jsonl`` file, checked: each has prompt, response and finite reward/cost."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    for number, row in iter_jsonl(path):
        missing = [k for k in POINT_KEYS if k not in row]
        if missing:
            raise InputError(
                f"{path}:{number}: missing field(s) {missing} (a points row needs {list(POINT_KEYS)})"
            )
        for key in ("reward", "cost"):
            finite_number(row[key], f"{path}:{number}: {key}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no points")
    return rows


def write_model_outputs(
    out_dir: str | Path,
    model: str,
    points: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    scatter: bool = True,
) -> dict[str, Any]:
    """Write every per-model file from scored points; returns the summary that was written.

    ``points``: rows with prompt, response, reward, cost (a ``label`` present is checked against the
    recomputed one: a disagreement means a different sign convention, which must not pass silently).
    ``metadata``: provenance merged into the summary after the statistics (model paths, split, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rewards = [float(p["reward"]) for p in points]
    costs = [float(p["cost"]) for p in points]
    labels = quadrant_labels(rewards, costs)
    disagree = [
        i for i, (p, lab) in enumerate(zip(points, labels, strict=True)) if "label" in p and p["label"] != lab
    ]
    if disagree:
        first = disagree[0]
        raise InputError(
            f"{model}: {len(disagree)} stored label(s) disagree with safe ⇔ cost ≤ 0, helpful ⇔ reward > 0; "
            f"first at row {first}: label {points[first]['label']!r}, reward {rewards[first]}, cost {costs[first]}"
        )
    rows = [
        {"prompt": p["prompt"], "response": p["response"], "reward": r, "cost": c, "label": lab}
        for p, r, c, lab in zip(points, rewards, costs, labels, strict=True)
    ]
    write_text(
        model_file(out, model, POINTS_SUFFIX), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    _atomic_save_npy(model_file(out, model, "_Rs.npy"), np.asarray(rewards, dtype=np.float32))
    _atomic_save_npy(model_file(out, model, "_Cs.npy"), np.asarray(costs, dtype=np.float32))
    _atomic_save_npy(model_file(out, model, "_labels.npy"), np.asarray(labels, dtype="<U2"))
    summary = summarize(rewards, costs)
    summary.update({k: v for k, v in (metadata or {}).items() if k not in STAT_KEYS})
    write_text(model_file(out, model, "_summary.json"), json.dumps(summary, indent=2) + "\n")
    if scatter:
        save_scatter(model_file(out, model, "_scatter.png"), rewards, costs, title=model)
    return summary


def load_scores(directory: str | Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, costs) of one model as float32 arrays: from the npy files, else from the points."""
    r_path, c_path = model_file(directory, model, "_Rs.npy"), model_file(directory, model, "_Cs.npy")
    if r_path.is_file() and c_path.is_file():
        rewards, costs = np.load(r_path), np.load(c_path)
        if rewards.shape != costs.shape:
            raise InputError(
                f"{model}: {r_path.name} has shape {rewards.shape} but {c_path.name} {costs.shape}"
            )
        return rewards.astype(np.float32), costs.astype(np.float32)
    points_path = model_file(directory, model, POINTS_SUFFIX)
    if not points_path.is_file():
        raise FileNotFoundError(
            f"{model}: neither {r_path.name}/{c_path.name} nor {points_path.name} in {directory}"
        )
    rows = read_points(points_path)
    return (np.asarray([r["reward"] for r in rows], dtype=np.float32),
            np.asarray([r["cost"] for r in rows], dtype=np.float32))  # fmt: skip


def load_summary(directory: str | Path, model: str) -> dict[str, Any]:
    """A model's ``_summary.json``, or one computed from its scores when the file is absent."""
    path = model_file(directory, model, "_summary.json")
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return summarize(*load_scores(directory, model))


def draw_scatter(ax: Any, rewards: Sequence[float], costs: Sequence[float], title: str, color: Any = None,
                 xlim: tuple[float, float] = (-10, 10), ylim: tuple[float, float] = (-4, 4)) -> None:  # fmt: skip
    """Reward (y) against cost (x) on ``ax`` with the safe line (cost = 0), the helpful line (reward = 0)
    and the quadrant percentages in the corners. Points outside the limits still count in the percents."""
    summary = summarize(rewards, costs)
    ax.scatter(costs, rewards, s=6, alpha=0.4, color=color, rasterized=True)
    ax.axvline(0.0, color="red", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("cost")
    ax.set_ylabel("reward")
    ax.set_title(title)
    corners = {"SH": (0.02, 0.98, "left", "top"), "UH": (0.98, 0.98, "right", "top"),
               "SU": (0.02, 0.02, "left", "bottom"), "UU": (0.98, 0.02, "right", "bottom")}  # fmt: skip
    for label in LABELS:
        x, y, ha, va = corners[label]
        ax.text(x, y, f"{label} {summary['percents'][label]:.1f}%", transform=ax.transAxes, ha=ha, va=va,
                fontsize=8, bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.7, "linewidth": 0})  # fmt: skip


def save_scatter(path: str | Path, rewards: Sequence[float], costs: Sequence[float], title: str) -> Path:
    """One model's reward–cost scatter as a PNG (a Figure on the Agg canvas: pyplot's backend, e.g. a
    notebook's, is left alone), written via a temporary file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2))
    FigureCanvasAgg(fig)
    draw_scatter(fig.subplots(), rewards, costs, title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=150)
    os.replace(tmp, path)
    return path
