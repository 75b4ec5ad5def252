"""The one metrics logger of the project: the ES and GRPO trainers log through :class:`Tracker`.

    with Tracker("logs/grpo-run1", config=cfg, wandb=args.wandb) as tracker:
        tracker.log({"train/reward_mean": 0.41, "train/cost_mean": -0.2}, step=10)
        tracker.log_text("samples/generation", text, step=10)

What goes where (all under ``log_dir``):

* TensorBoard event files (``events.out.tfevents.*``), always. ``log_dir`` is what users point
  ``tensorboard --logdir`` at; :func:`read_tensorboard_scalars` reads the curves back for plots.
* ``metrics.jsonl``, always: one JSON object per :meth:`Tracker.log` call,
  ``{"step": int, "time": unix float, **metrics}``, appended and flushed line by line, so a crash
  loses nothing and a resumed run appends to the same file. NaN/inf are written as ``null``.
  :func:`read_jsonl_metrics` reads it back.
* ``config.json``, when a config is given (also logged as TensorBoard text and W&B config).
* Weights & Biases, only with ``wandb=True`` (``pip install -e .[wandb]``). The run id is kept in
  ``wandb_run_id.txt`` so a resumed run continues the same W&B run; W&B files go to ``log_dir/wandb``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import numbers
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from alignment.data import iter_jsonl, repair_jsonl_tail

logger = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.txt"
_RESERVED_KEYS = ("step", "time")


def _check_step(step: Any) -> int:
    """Return ``step`` as an int, or raise if it is not an integer >= 0."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return int(step)


def _import_wandb() -> Any:
    """Import wandb lazily, with an actionable error when it is not installed."""
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError(
            "Tracker(wandb=True) needs the wandb package: `pip install wandb` "
            "(or `pip install -e .[wandb]`), or run without W&B logging."
        ) from exc
    return wandb


class Tracker:
    """Log scalars and texts to TensorBoard, a JSONL file and (optionally) Weights & Biases."""

    def __init__(
        self,
        log_dir: str | Path,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        wandb: bool = False,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        jsonl_name: str = "metrics.jsonl",
    ) -> None:
        """Open all sinks in ``log_dir`` (created if missing); raise at once if W&B is unusable."""
        wandb_module = _import_wandb() if wandb else None  # fail before creating any file
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.log_dir / jsonl_name
        self._closed = False
        self._nonfinite_warned: set[str] = set()
        self._wandb = wandb_module
        self._wandb_run: Any = None
        self._writer = SummaryWriter(str(self.log_dir))
        repair_jsonl_tail(self.jsonl_path)  # a crash may have cut the last line
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")

        config_dict = dict(config) if config is not None else None
        if config_dict is not None:
            text = json.dumps(config_dict, indent=2, default=str)
            (self.log_dir / "config.json").write_text(text + "\n", encoding="utf-8")
            self._writer.add_text("config", f"```json\n{text}\n```")
        if wandb_module is not None:
            id_file = self.log_dir / WANDB_ID_FILE
            if id_file.exists():
                run_id = id_file.read_text(encoding="utf-8").strip()
            else:
                run_id = wandb_module.util.generate_id()
                id_file.write_text(run_id + "\n", encoding="utf-8")
            self._wandb_run = wandb_module.init(
                project=wandb_project,
                entity=wandb_entity,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(self.log_dir),
                config=json.loads(json.dumps(config_dict, default=str)) if config_dict else None,
            )
        logger.info("Tracking to %s (view with: tensorboard --logdir %s)", self.log_dir, self.log_dir)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Tracker for {self.log_dir} is closed")

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        """Log scalar ``metrics`` at ``step`` to every sink; nothing is written if any value is bad."""
        self._check_open()
        step = _check_step(step)
        clean: dict[str, float | int] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or key in _RESERVED_KEYS:
                raise ValueError(f"metric key {key!r} must be a str other than {_RESERVED_KEYS}")
            if isinstance(value, bool | numbers.Integral):
                clean[key] = int(value)
            elif isinstance(value, numbers.Real):
                clean[key] = float(value)
            else:
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")

        record: dict[str, Any] = {"step": step, "time": time.time()}
        for key, value in clean.items():
            self._writer.add_scalar(key, value, step)
            if isinstance(value, float) and not math.isfinite(value):
                if key not in self._nonfinite_warned:
                    self._nonfinite_warned.add(key)
                    logger.warning("metric %r is %s at step %d; written as null to JSONL", key, value, step)
                record[key] = None
            else:
                record[key] = value
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(clean, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Log a text (e.g. sample generations) to TensorBoard and W&B."""
        self._check_open()
        step = _check_step(step)
        self._writer.add_text(tag, text, step)
        if self._wandb_run is not None:
            page = self._wandb.Html(f"<pre>{html.escape(text)}</pre>")
            self._wandb_run.log({tag: page}, step=step)

    def flush(self) -> None:
        """Push buffered TensorBoard events and JSONL lines to disk."""
        self._check_open()
        self._writer.flush()
        self._jsonl.flush()

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every sink; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def read_jsonl_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics JSONL file; a truncated last line (crash mid-write) is skipped with a warning."""
    return [row for _, row in iter_jsonl(path, drop_torn_tail=True)]


def read_tensorboard_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in the event files under ``log_dir``: tag -> [(step, value)] sorted by step.

    Values come back as float32 (TensorBoard's storage). When several event files hold the same
    tag and step (a resumed run that re-did some steps), the most recently written value wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            by_step = latest.setdefault(tag, {})
            for event in acc.Scalars(tag):
                old = by_step.get(event.step)
                if old is None or event.wall_time >= old[0]:
                    by_step[event.step] = (event.wall_time, event.value)
    return {
        tag: [(step, value) for step, (_, value) in sorted(steps.items())] for tag, steps in latest.items()
    }
