"""GRPO fill-in under real torchrun: 2 CPU processes on gloo, the policy wrapped in DDP, gradients
averaged across ranks (equal to one process accumulating the same two micro-batches), identical
weights on both ranks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from alignment.char_diffusion.checkpoint import read_checkpoint
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import config_to_dict, load_config
from tests.conftest import REPO


def _config(models: dict[str, str], out: Path, accumulation: int) -> GRPOConfig:
    return load_config(GRPOConfig, REPO / "alignment" / "char_diffusion" / "grpo.yaml", {
        "dataset": models["data"], "generator_checkpoint": models["generator"], "judge_checkpoint": models["judge"],
        "out_dir": str(out), "batch_size": 2, "gradient_accumulation_steps": accumulation, "group_size": 4,
        "max_iters": 2, "warmup_iters": 0, "learning_rate": 1e-3, "eval_interval": 100, "eval_iters": 1,
        "eval_batch_size": 2, "save_interval": 100, "device": "cpu", "backend": "gloo"})  # fmt: skip


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout torchrun and every process below it are
    killed, so no rank outlives the test (torchrun starts its workers in sessions of their own: killing
    its process group alone leaves them behind, stuck in a collective)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        below = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"torchrun did not finish in {timeout} s\n{out[-2000:]}\n{err[-2000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_gloo_ranks_average_gradients_and_agree(char_diffusion_models, tmp_path):
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(_config(char_diffusion_models, tmp_path / "ddp", 1))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    # python -m torch.distributed.run is torchrun, for the interpreter running the tests
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
           str(REPO / "tests" / "char_diffusion_ddp_worker.py"), str(cfg_file), str(tmp_path)]  # fmt: skip
    proc = _run_group(cmd, env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * 2 and ranks[0]["world"] == 2
    w0, w1 = ranks[0]["model"], ranks[1]["model"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP keeps the ranks bit-identical
    start = read_checkpoint(char_diffusion_models["generator"])["model"]
    assert any(not torch.equal(w0[k], start[k]) for k in w0)
    assert read_checkpoint(tmp_path / "ddp" / "ckpt.pt")["iteration"] == 2  # rank 0 saved

    # One process accumulating the same two micro-batches (slots 0 and 1) sees the same data and
    # draws. Its gradient is g0/2 + g1/2 (each loss divided by 2 before backward); DDP's is the sum of
    # each rank's g_r/2. Scaling by a power of two is exact in floating point and a two-term sum is
    # commutative, so with the same shapes and threads the weights agree bit for bit.
    single = train_grpo(_config(char_diffusion_models, tmp_path / "single", 2))["policy"].state_dict()
    assert all(torch.equal(w0[k], single[k]) for k in w0)
