"""Data-parallel persona training under real torchrun: two CPU processes on gloo, the reader and the
retriever wrapped in DistributedDataParallel, and both ranks ending with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.distributed import DistInfo, wrap
from alignment.persona import checkpoint as ckpt
from alignment.persona.trainer import train
from tests.test_persona_train import toy_cfg

REPO = Path(__file__).resolve().parents[1]


def _torchrun(cfg, *switches: str) -> subprocess.CompletedProcess:
    flags = [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "alignment.persona.train", *flags, *switches]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "data parallel over 2 processes: reader in DistributedDataParallel" in proc.stderr
    return proc


def test_two_gloo_processes_train_identical_replicas(persona_toy, tmp_path):
    # batch-scaled advantages: every step gathers both ranks' rewards (tests/test_pg_ddp.py checks the numbers)
    cfg = toy_cfg(persona_toy, tmp_path, "ddp", reader_rl_learning=True, use_grpo=True, per_gpu_batch_size=2,
                  train_retriever=True, total_steps=2, save_freq=1, grpo_scale_rewards="batch")  # fmt: skip
    _torchrun(cfg, "--reader_rl_learning", "--use_grpo", "--train_retriever")
    for step in (1, 2):
        state = ckpt.load_state(cfg.run_dir / "checkpoint" / f"step-{step}")
        assert state["world_size"] == 2 and len(state["rank_hashes"]) == 2
        assert state["rank_hashes"][0] == state["rank_hashes"][1]  # checked by the trainer too
        assert not torch.equal(state["rng"][0]["sampler"], state["rng"][1]["sampler"])  # own samples
    start = load_file(str(persona_toy / "reader" / "model.safetensors"))
    end = load_file(str(cfg.run_dir / "checkpoint" / "latest" / "reader" / "model.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)
    with pytest.raises(ValueError, match="written by 2 processes, not 1"):
        train(cfg, resume=True)


def test_a_frozen_module_is_not_wrapped():
    """DDP refuses a module without trainable parameters: the SFT stage's frozen retriever (this
    crashed every torchrun run without --train_retriever before)."""
    frozen, trained = torch.nn.Linear(2, 2).requires_grad_(False), torch.nn.Linear(2, 2)
    two = DistInfo(rank=0, world_size=2)
    assert wrap(frozen, two) is frozen
    assert wrap(trained, DistInfo()) is trained  # one process: nothing to wrap
    with pytest.raises((RuntimeError, ValueError)):  # would wrap, but there is no process group here
        wrap(trained, two)
