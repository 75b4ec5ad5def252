"""The real scorer service with faults injected through its real code paths, for tests.

    SCORER_TEST_FAULT=poison,loop python -m tests.faulty_scorer --reward-model ... (service flags)

- ``poison``: a forward pass whose rows contain the tokens of ``" POISON"`` raises (as a GPU kernel
  failing on one input would), so any batch that merged such a text with others fails;
- ``loop``: the metrics hook of the scheduling loop raises once the file named by
  ``$SCORER_TEST_TRIGGER`` exists: an error outside the per-batch error handling;
- ``$SCORER_TEST_NOFILE=N`` lowers the file-descriptor limit (soft and hard) to N before the
  service starts.

Everything else is the unmodified service (``alignment.scoring.scorer_service.main``).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from alignment.scoring import metrics, score_model
from alignment.scoring.scorer_service import main

POISON = " POISON"


def _inject_poison() -> None:
    original = score_model.ScoreModel.end_scores

    def end_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        marker = self.tokenizer(POISON, add_special_tokens=False)["input_ids"]
        for row in input_ids.tolist():
            if any(row[i : i + len(marker)] == marker for i in range(len(row) - len(marker) + 1)):
                raise RuntimeError("injected fault: this batch holds a poisoned text")
        return original(self, input_ids, attention_mask)

    score_model.ScoreModel.end_scores = end_scores


def _inject_loop_fault() -> None:
    trigger = Path(os.environ["SCORER_TEST_TRIGGER"])
    original = metrics.ScorerMetrics.observe_batch

    def observe_batch(self, *args, **kwargs):
        if trigger.exists():
            raise RuntimeError("injected fault in the metrics hook")
        return original(self, *args, **kwargs)

    metrics.ScorerMetrics.observe_batch = observe_batch


if __name__ == "__main__":
    faults = set(filter(None, os.environ.get("SCORER_TEST_FAULT", "").split(",")))
    if "poison" in faults:
        _inject_poison()
    if "loop" in faults:
        _inject_loop_fault()
    if os.environ.get("SCORER_TEST_NOFILE"):
        limit = int(os.environ["SCORER_TEST_NOFILE"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # the hard limit too: no raising it
    main()
