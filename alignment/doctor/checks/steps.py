"""What a few training steps logged: their losses (finite?) and wall time per step, read back from
a run's ``metrics.jsonl`` (:class:`alignment.tracking.Tracker` stamps every record with its time).
Shared by the persona and character-diffusion checks, which run those systems' own trainers."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from alignment.doctor.report import Figure


def step_records(run_dir: Path) -> list[dict]:
    """Training records (those with a loss) of the ``metrics.jsonl`` files under ``run_dir``, by time."""
    from alignment.tracking import read_jsonl_metrics

    rows = [r for path in sorted(run_dir.rglob("metrics.jsonl")) for r in read_jsonl_metrics(path)]
    return sorted((r for r in rows if any("loss" in k for k in r)), key=lambda r: r["time"])


def step_figures(records: list[dict], on_gpu: bool, what: str) -> list[Figure]:
    """Loss finite on every logged step, and the median wall time between consecutive steps."""
    losses = {k: v for r in records for k, v in r.items() if "loss" in k}
    values = [v for r in records for k, v in r.items() if "loss" in k]
    finite = bool(values) and all(v is not None and math.isfinite(v) for v in values)
    gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:], strict=False)]
    dtype = "bf16 autocast" if on_gpu else "fp32"
    return [
        Figure(
            "loss finite on every step",
            "yes" if finite else "NO",
            target="finite",
            verdict="met" if finite else "missed",
            note=f"{len(records)} logged step(s) of {what}, {dtype}; "
            + ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if v is not None),
        ),  # fmt: skip
        Figure(
            "step time",
            statistics.median(gaps) * 1e3 if gaps else None,
            "ms",
            note="median time between consecutive logged steps",
        ),
    ]
