"""GRPO evaluation with two real gloo processes (torchrun): every rank generates, results equal one process's.

This is the path ZeRO-3 needs (all ranks inside the gathered-model context); DeepSpeed itself is
not installed here, so ZeRO-3 is not run: with DDP the gather is a no-op and the test checks the
sharding, the gathering of answers and the broadcast of the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alignment.grpo.eval_callback import deal_batches
from tests.conftest import REPO
from tests.grpo_eval_worker import run


def test_deal_batches_gives_every_rank_the_same_number_of_calls():
    assert [deal_batches(3, r, 2) for r in (0, 1)] == [[0, 2], [1, 1]]
    assert [deal_batches(1, r, 3) for r in (0, 1, 2)] == [[0], [0], [0]]  # idle ranks repeat a batch
    assert deal_batches(0, 0, 2) == [] and deal_batches(5, 0, 1) == [0, 1, 2, 3, 4]


def test_every_rank_evaluates_and_the_result_equals_a_single_process(toy_models, scorer, tmp_path):
    overrides = {"model_name": str(toy_models / "policy"), "scorer_url": scorer.url, "max_steps": 1,
                 "save_steps": 100, "eval_every": 0, "eval_max_prompts": 6, "eval_batch_size": 2,
                 "eval_max_new_tokens": 12, "per_device_train_batch_size": 8, "max_completion_length": 8,
                 "scorer_retries": 1}  # fmt: skip
    single = run({**overrides, "output_dir": str(tmp_path / "one")}, tmp_path / "one-record")
    assert single["world"] == 1 and single["batches"] == [0, 1, 2]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "grpo_eval_worker.py"),
           json.dumps({**overrides, "output_dir": str(tmp_path / "two")}), str(tmp_path / "two-record")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two-record" / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert [(r["world"], r["wrapped"]) for r in ranks] == [(2, "DistributedDataParallel")] * 2
    assert [r["batches"] for r in ranks] == [[0, 2], [1, 1]]  # both ranks generated; rank 1 repeats one
    for r in ranks:
        # same batches on the same weights, greedy: the very answers of one process
        assert r["answers"] == single["answers"] and len(r["answers"]) == 6
        # one identical scoring request from rank 0, broadcast to every rank
        assert r["summary"] == single["summary"]
    lines = (tmp_path / "two" / "eval_results.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]  # written once per evaluation, by rank 0
