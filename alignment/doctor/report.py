"""What a doctor check found: its status, its figures with their targets, and what could not run.

Statuses of a check:

- ``passed``: it ran and every target it could judge here was met;
- ``missed``: it ran, and a figure missed its target (the figure says which);
- ``failed``: it raised (the reason holds the error);
- ``timed out``: it overran its own time limit and was stopped (the others still ran);
- ``not run``: it could not run here (no GPU, a package missing, ``--only``); the reason says why.

A figure (:class:`Figure`) has a verdict: ``met``/``missed`` against its target, ``info`` (no
target), ``not judged`` (a GPU target measured on a CPU: the figure is shown, never counted), or
``not run`` (a GPU-only part of a check on a machine without one; the note says why). Only
``passed`` counts as passed; nothing that did not run is ever counted as passing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "missed", "failed", "timed out", "not run"]
Verdict = Literal["met", "missed", "info", "not judged", "not run"]
STATUSES: tuple[str, ...] = ("passed", "missed", "failed", "timed out", "not run")
VERDICTS: tuple[str, ...] = ("met", "missed", "info", "not judged", "not run")
SCHEMA_VERSION = 1
NO_GPU = "no GPU used (--device cpu, or none visible)"  # why a GPU-only part did not run


@dataclass
class Figure:
    """One measured value. ``target``: e.g. ``">= 3"`` or ``"<= 0.10"`` (None: informational);
    ``gpu_target``: the target is a GPU's, so on a CPU the value is shown but not judged."""

    name: str
    value: float | str | None
    unit: str = ""
    target: str | None = None
    verdict: Verdict = "info"
    note: str = ""

    def shown(self) -> str:
        if self.value is None:
            return "-"
        if isinstance(self.value, float):
            v = self.value
            text = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        else:
            text = str(self.value)
        return f"{text} {self.unit}".strip()


def judged(
    name: str, value: float | None, unit: str, op: str, bound: float, on_gpu: bool, gpu_target: bool = False,
    note: str = "",
) -> Figure:  # fmt: skip
    """A figure with target ``op bound`` (``>=`` or ``<=``); not judged on a CPU when ``gpu_target``."""
    target = f"{op} {bound:g}" + (" (GPU)" if gpu_target else "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Figure(name, None, unit, target, "not run", note or "no value")
    if gpu_target and not on_gpu:
        return Figure(name, value, unit, target, "not judged", note or "a GPU target; measured on a CPU")
    ok = value >= bound if op == ">=" else value <= bound
    return Figure(name, value, unit, target, "met" if ok else "missed", note)


def not_run(name: str, why: str) -> Figure:
    """A part of a check that could not run here; ``why`` says so (e.g. ``"no GPU"``)."""
    return Figure(name, None, "", None, "not run", why)


@dataclass
class CheckResult:
    name: str
    title: str
    status: Status
    seconds: float = 0.0
    limit_s: float | None = None
    reason: str = ""
    figures: list[Figure] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable extras (paths, raw numbers)

    @classmethod
    def from_figures(
        cls, name: str, title: str, figures: list[Figure], data: dict[str, Any] | None = None
    ) -> CheckResult:
        """``passed``, or ``missed`` naming the figures that missed their targets."""
        missed = [f.name for f in figures if f.verdict == "missed"]
        status: Status = "missed" if missed else "passed"
        reason = f"missed: {', '.join(missed)}" if missed else ""
        return cls(name, title, status, figures=figures, reason=reason, data=data or {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckResult:
        figures = [Figure(**f) for f in data.get("figures", [])]
        return cls(**{**data, "figures": figures})


@dataclass
class DoctorReport:
    """The whole run: what ran where, every check, and the counts."""

    device: str
    setup: dict[str, Any]
    checks: list[CheckResult]
    seconds: float = 0.0
    schema: int = SCHEMA_VERSION

    def counts(self) -> dict[str, int]:
        out = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        out["parts not run"] = sum(f.verdict == "not run" for c in self.checks for f in c.figures)
        return out

    @property
    def ok(self) -> bool:
        """No check failed, missed a target or timed out (``not run`` is reported, not an error)."""
        return not any(c.status in ("missed", "failed", "timed out") for c in self.checks)

    def to_json(self) -> str:
        data = asdict(self)
        data["counts"] = self.counts()
        data["ok"] = self.ok
        return json.dumps(data, indent=2, default=str) + "\n"

    def write_json(self, path: str | Path) -> None:
        from alignment.atomic import write_text

        write_text(Path(path), self.to_json())


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return [*lines, line] if line else lines


def format_table(report: DoctorReport, width: int = 110) -> str:
    """The terminal table: one block per check (status, time, reason), one row per figure (verdict,
    name, value, target) with its note wrapped underneath."""
    rule = "-" * width
    lines = [
        f"alignment doctor: device {report.device}",
        *(f"  {k}: {v}" for k, v in report.setup.items()),
        rule,
    ]
    for c in report.checks:
        limit = f" (limit {c.limit_s:.0f} s)" if c.limit_s else ""
        lines.append(f"[{c.status.upper()}] {c.title}  {c.seconds:.1f} s{limit}")
        lines.extend(f"    {part}" for part in _wrap(c.reason, width - 4))
        for f in c.figures:
            lines.append(f"  {f.verdict:<10} {f.name:<48} {f.shown():>20}  {f.target or ''}".rstrip())
            lines.extend(f"{'':13}{part}" for part in _wrap(f.note, width - 13))
    counts = report.counts()
    lines.append(rule)
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {report.seconds:.0f} s in all")
    lines.append("doctor: " + ("OK" if report.ok else "PROBLEMS FOUND (see above)"))
    return "\n".join(lines)
