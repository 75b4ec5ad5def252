"""Engine agreement: every few iterations the engines' checksums (of the exact weights) are compared.

Seeds-only updates keep the engines identical by construction; a disagreement means a fault (bad
memory, a device computing other noise, a bug). With a strict majority the others are repaired
from it, loudly. Without one (always possible with 2 engines) nobody knows which is right: every
engine's weights are saved for inspection and the run stops with :class:`EnginesDivergedError`;
``--resume`` rebuilds all engines from the last checkpoint and the committed replay log.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from alignment.atomic import replace_dir

logger = logging.getLogger(__name__)


class EnginesDivergedError(RuntimeError):
    """Engines hold different weights and no strict majority says which are right."""


def strict_majority(values: list[str]) -> str | None:
    """The value held by more than half of ``values``, or None."""
    if not values:
        return None
    value, count = Counter(values).most_common(1)[0]
    return value if 2 * count > len(values) else None


def save_diverged(run_dir: Path, iteration: int, executor: Any, sums: list[str]) -> Path:
    """``model_saves/diverged_iteration_N/``: each engine's exact weights and the checksums, atomically."""
    out = run_dir / "model_saves" / f"diverged_iteration_{iteration}"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k in range(len(sums)):
        state = executor.state_dict(k)
        save_file({n: t.contiguous() for n, t in state.items()}, str(tmp / f"engine_{k}.safetensors"))
    (tmp / "checksums.json").write_text(
        json.dumps({"iteration": iteration, "checksums": sums}, indent=2) + "\n"
    )
    replace_dir(tmp, out)
    return out


def check_engines(executor: Any, run_dir: Path, iteration: int) -> int:
    """Compare checksums; repair a minority from a strict majority, else save and raise.

    Returns the weight bytes sent to repair engines (0 when all agree).
    """
    sums = executor.checksums()
    if len(set(sums)) == 1:
        return 0
    majority = strict_majority(sums)
    if majority is None:
        saved = save_diverged(run_dir, iteration, executor, sums)
        raise EnginesDivergedError(
            f"iteration {iteration}: the {len(sums)} engines disagree and no strict majority exists "
            f"(checksums {sums}); not guessing which is right. Each engine's weights are in {saved}. "
            f"The replay log up to iteration {iteration} is committed: resume with --resume {run_dir} "
            "to rebuild every engine from the last checkpoint"
        )
    bad = [k for k, s in enumerate(sums) if s != majority]
    logger.error(
        "iteration %d: engines %s disagree with the majority checksum %s (%d of %d); repairing",
        iteration, bad, majority, len(sums) - len(bad), len(sums),
    )  # fmt: skip
    state = executor.state_dict(sums.index(majority))
    executor.load_state_dict(state, engines=bad)
    return len(bad) * sum(t.numel() * t.element_size() for t in state.values())
