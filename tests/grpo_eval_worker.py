"""One GRPO run that records its step-0 evaluation; the DDP eval test runs it under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/grpo_eval_worker.py OVERRIDES_JSON OUT_DIR

Each rank writes ``OUT_DIR/rank{r}.json``: the world size, the eval batches that rank generated,
the gathered answers and the summary of the evaluation at step 0 (before any update, so a run on
any number of ranks evaluates the same weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback  # noqa: E402

from alignment.grpo.config import load_grpo_config  # noqa: E402
from alignment.grpo.train_grpo_alignment import build_trainer  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "alignment" / "grpo" / "grpo_toy.yaml"


def run(overrides: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train ``max_steps`` steps; returns (and writes) this rank's record of the step-0 evaluation."""
    built = build_trainer(load_grpo_config(RECIPE, overrides))
    evaluation, acc = built.evaluation, built.trainer.accelerator
    record: dict[str, Any] = {}

    class StepZero(TrainerCallback):  # runs right after the evaluation callback's on_train_begin
        def on_train_begin(self, args, state, control, **kwargs):
            record.update(rank=acc.process_index, world=acc.num_processes, batches=evaluation.last_batches,
                          answers=evaluation.last_answers, summary=evaluation.history[0],
                          wrapped=type(built.trainer.model_wrapped).__name__)  # fmt: skip
            return control

    built.trainer.add_callback(StepZero())
    built.trainer.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{record['rank']}.json").write_text(json.dumps(record), encoding="utf-8")
    return record


if __name__ == "__main__":
    run(json.loads(sys.argv[1]), Path(sys.argv[2]))
