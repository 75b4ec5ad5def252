"""Every system on a real 2-node SLURM cluster (tests/slurm_cluster.py): `sbatch --nodes=2` of the
job scripts on the toy models, each run to completion and its outputs checked.

- ES: a Ray cluster of the job (head on n1, a worker joining from n2 through srun), one engine per
  node, both of which generated members; torn down at the end, on a node that never joins, and on
  scancel (no Ray process of the job is left, no finished iteration is lost).
- GRPO: one `accelerate launch` per node (2 machines, gloo); λ equal on both ranks at every step.
- Persona and character diffusion: one torchrun per node; the weights equal those of the 1-node,
  2-process run bit for bit. By construction: the same 2 ranks (node rank x processes + local
  rank), seeds and data shards, gloo on CPU, and a 2-rank all-reduce is one IEEE addition, a + b,
  which is commutative, so its order cannot change a bit.

The cluster's nodes are 127.0.0.11 and 127.0.0.12 on this machine; all traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.slurm_cluster import FINISHED, NODE_ADDRS, SlurmCluster, free_port, missing_reason

JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster.start(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder for Ray's session files: its unix sockets must fit in 107 characters."""
    path = Path(tempfile.mkdtemp(prefix="slurm-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a job is submitted with: the test's interpreter, CPU only, loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo",
               LOG_DIR=str(tmp_path / "logs"), RDZV_PORT=str(free_port()), ALIGNMENT_TEST_JOB=uuid.uuid4().hex,
               **extra)  # fmt: skip
    return env


def run_job(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str, nodes: int = 2,
            env: dict[str, str]) -> str:  # fmt: skip
    """sbatch ``script`` on ``nodes`` nodes, wait until it completes; returns its output."""
    out = tmp_path / f"job-{nodes}n-{Path(script).stem}-{time.monotonic_ns()}.out"
    job = cluster.sbatch(script, *args, nodes=nodes, env=env, cwd=REPO, output=out)
    state = cluster.wait(job, JOB_TIMEOUT)
    text = out.read_text() if out.exists() else ""
    info = cluster.job(job)
    assert state == "COMPLETED", f"job {job}: {state} {info.get('ExitCode')}\n{text[-6000:]}"
    assert info["NodeList"] == ("n[1-2]" if nodes == 2 else "n1")
    assert_nothing_left(env)
    return text


def job_processes(marker: str) -> list[str]:
    """Live processes started by a job submitted with ``ALIGNMENT_TEST_JOB=marker`` in its environment,
    which every process of the job inherits: the script, srun tasks, `ray start`, raylets, GCS, the
    actors (whose command line Ray rewrites to ``ray::EngineActor``), trainers, torchrun ranks."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if (
                proc.info["status"] != psutil.STATUS_ZOMBIE
                and proc.environ().get("ALIGNMENT_TEST_JOB") == marker
            ):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:160]}")
        except psutil.Error:
            continue
    return found


def assert_nothing_left(env: dict[str, str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := job_processes(env["ALIGNMENT_TEST_JOB"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes outlived the job:\n" + "\n".join(left)


# -- ES across nodes (Ray) -------------------------------------------------------------------------
ES_TINY = ["--population_size", "4", "--batch_size", "4", "--max_new_tokens", "8", "--eval_max_prompts", "4",
           "--device", "cpu", "--dtype", "fp32", "--checksum_every", "1"]  # fmt: skip


def es_env(tmp_path: Path, ray_tmp: Path, toy_models: Path, scorer, **extra: str) -> dict[str, str]:
    return job_env(
        tmp_path, POLICY_MODEL_PATH=str(toy_models / "policy"), SCORER_ADDRESS_FILE=str(scorer.address_file),
        SCORER_WAIT_S="60", EXPERIMENT_DIR=str(tmp_path / "es"), RAY_TEMP_DIR=str(ray_tmp),
        RAY_LOG_DIR=str(tmp_path / "ray-logs"), RAY_START_ARGS="--object-store-memory 100000000", **extra,
    )  # fmt: skip


def test_es_on_a_two_node_ray_cluster(cluster, toy_models, scorer, tmp_path, short_tmp) -> None:
    env = es_env(tmp_path, short_tmp, toy_models, scorer)
    out = run_job(cluster, tmp_path, "slurm/train_accl_alignment_api.sh", "--num_iterations", "2", *ES_TINY,
                  env=env)  # fmt: skip
    assert f"Ray node joined: n1 {NODE_ADDRS[0]}" in out and f"Ray node joined: n2 {NODE_ADDRS[1]}" in out
    assert "engines=2 " in out and "executor=ray" in out and f"policy={toy_models / 'policy'}" in out
    [run] = (tmp_path / "es").glob("alignment_*")
    placement = json.loads((run / "logs" / "engines.json").read_text())
    assert placement["nodes"] == list(NODE_ADDRS)  # one engine on each node
    assert sorted(e["node_ip"] for e in placement["engines"]) == list(NODE_ADDRS)
    metrics = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    per_iteration = [m for m in metrics if "engines/members_min" in m]
    assert len(per_iteration) == 2 and all(
        m["engines/members_min"] >= 1 for m in per_iteration
    )  # both worked
    assert len((run / "replay.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "logs" / "final_eval_results.json").read_text())["iterations"] == 2
    assert "stopping the Ray cluster" in out
    assert_nothing_left(env)


def test_es_node_that_never_joins_is_named_and_nothing_is_left(cluster, toy_models, scorer, tmp_path,
                                                                short_tmp) -> None:  # fmt: skip
    # n2's `ray start` looks for its head at an address where none listens (the last --address
    # wins): it keeps trying and never joins, so the join timeout ends the job
    env = es_env(tmp_path, short_tmp, toy_models, scorer, RAY_WORKER_START_ARGS=f"--address 127.0.0.1:{free_port()}",
                 RAY_JOIN_TIMEOUT_S="5")  # fmt: skip
    out_file = tmp_path / "never.out"
    job = cluster.sbatch("slurm/train_accl_alignment_api.sh", "--num_iterations", "1", *ES_TINY, nodes=2,
                         env=env, cwd=REPO, output=out_file)  # fmt: skip
    assert cluster.wait(job, JOB_TIMEOUT) == "FAILED"
    out = out_file.read_text()
    assert f"node(s) n2 ({NODE_ADDRS[1]}) did not join within 5 s" in out, out[-3000:]
    assert "the Ray cluster did not come up" in out and not list((tmp_path / "es").glob("alignment_*"))
    assert_nothing_left(env)


def test_es_cancelled_mid_run_leaves_no_ray_process_and_loses_no_iteration(cluster, toy_models, scorer, tmp_path,
                                                                           short_tmp) -> None:  # fmt: skip
    env = es_env(tmp_path, short_tmp, toy_models, scorer)
    job = cluster.sbatch("slurm/train_accl_alignment_api.sh", "--num_iterations", "500", *ES_TINY, nodes=2,
                         env=env, cwd=REPO, output=tmp_path / "cancel.out")  # fmt: skip
    assert cluster.wait(job, 120, until={"RUNNING", *FINISHED}) == "RUNNING"
    deadline = time.monotonic() + JOB_TIMEOUT
    replay: list[str] = []
    while len(replay) < 1:  # until an iteration is committed
        assert cluster.state(job) == "RUNNING" and time.monotonic() < deadline, (
            tmp_path / "cancel.out"
        ).read_text()
        runs = list((tmp_path / "es").glob("alignment_*/replay.jsonl"))
        replay = runs[0].read_text().splitlines() if runs else []
        time.sleep(0.5)
    running = job_processes(env["ALIGNMENT_TEST_JOB"])
    assert sum("EngineActor" in p for p in running) == 2 and any("raylet" in p for p in running)  # seen
    cluster.scancel(job)
    assert cluster.wait(job, 120) == "CANCELLED"
    assert_nothing_left(env)
    [run] = (tmp_path / "es").glob("alignment_*")
    entries = [json.loads(x) for x in (run / "replay.jsonl").read_text().splitlines() if x.strip()]
    assert len(entries) >= len(replay) and [e["iteration"] for e in entries] == list(range(len(entries)))


# -- GRPO across nodes (accelerate) ----------------------------------------------------------------
def test_grpo_two_accelerate_machines_keep_lambda_in_step(cluster, toy_models, scorer, tmp_path) -> None:
    env = job_env(tmp_path, CONFIG="alignment/grpo/grpo_toy.yaml", SCORER_ADDRESS_FILE=str(scorer.address_file),
                  SCORER_WAIT_S="60", OUTPUT_ROOT=str(tmp_path / "grpo"), BETAS="0.0", NUM_PROCESSES="1",
                  ACCELERATE_CONFIG="alignment/grpo/accelerate_ddp.yaml",
                  ACCELERATE_ARGS="--mixed_precision no")  # fmt: skip
    overrides = [f"model_name={toy_models / 'policy'}", "max_steps=2", "eval_every=0", "save_steps=100",
                 "per_device_train_batch_size=8", "max_completion_length=8", "lambda_lr=0.5"]  # fmt: skip
    out = run_job(cluster, tmp_path, "alignment/grpo/run_grpo_alignment.sh", *overrides, env=env)
    assert (
        "--num_machines 2 --machine_rank {node_rank}" in out and f"--main_process_ip {NODE_ADDRS[0]}" in out
    )
    lam = {(int(s), int(r)): v for s, v, r in re.findall(r"step (\d+): λ=(\S+) \(rank (\d) of 2\)", out)}
    assert sorted(lam) == [(1, 0), (1, 1), (2, 0), (2, 1)], out[-4000:]
    for step in (1, 2):
        assert lam[step, 0] == lam[step, 1]  # the same λ on both nodes
    assert lam[1, 0] != lam[2, 0]  # and it moved: the check compares something
    assert (tmp_path / "grpo" / "beta0.0" / "final" / "config.json").is_file()


# -- persona and character diffusion across nodes (torchrun) ---------------------------------------
def test_persona_two_nodes_equal_one_node_two_processes(cluster, persona_toy, tmp_path) -> None:
    from tests.test_persona_train import toy_cfg

    results = {}
    for nodes, per_node in ((2, "1"), (1, "2")):
        cfg = toy_cfg(persona_toy, tmp_path / f"ckpt{nodes}", "run", reader_rl_learning=True, use_grpo=True,
                      per_gpu_batch_size=2, total_steps=2, save_freq=2)  # fmt: skip
        flags = [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)]
        out = run_job(cluster, tmp_path, "slurm/train_persona.sh", *flags, "--reader_rl_learning", "--use_grpo",
                      nodes=nodes, env=job_env(tmp_path, NUM_PROCESSES=per_node))  # fmt: skip
        assert "data parallel over 2 processes" in out
        assert ("--node_rank={node_rank}" in out) == (nodes == 2)  # one torchrun per node, or --standalone
        results[nodes] = load_file(
            str(cfg.run_dir / "checkpoint" / "latest" / "reader" / "model.safetensors")
        )
    start = load_file(str(persona_toy / "reader" / "model.safetensors"))
    assert any(not torch.equal(start[k], results[2][k]) for k in start)  # it trained
    assert results[2].keys() == results[1].keys()
    assert all(torch.equal(results[2][k], results[1][k]) for k in results[1])


def test_char_diffusion_two_nodes_equal_one_node_two_processes(
    cluster, char_diffusion_models, tmp_path
) -> None:
    from alignment.char_diffusion.checkpoint import read_checkpoint

    m = char_diffusion_models
    flags = ["--dataset", m["data"], "--generator_checkpoint", m["generator"], "--judge_checkpoint", m["judge"],
             "--batch_size", "2", "--gradient_accumulation_steps", "1", "--group_size=4", "--max_iters", "2",
             "--eval_interval", "100", "--eval_iters", "1", "--eval_batch_size", "2", "--device", "cpu"]  # fmt: skip
    weights = {}
    for nodes, per_node in ((2, "1"), (1, "2")):
        out_dir = tmp_path / f"grpo{nodes}"
        out = run_job(cluster, tmp_path, "slurm/train_char_diffusion.sh", *flags, "--out_dir", str(out_dir),
                      nodes=nodes, env=job_env(tmp_path, STAGE="grpo", NPROC=per_node))  # fmt: skip
        assert f"nodes={nodes}" in out
        ckpt = read_checkpoint(out_dir / "ckpt.pt")
        assert ckpt["iteration"] == 2
        weights[nodes] = ckpt["model"]
    start = read_checkpoint(m["generator"])["model"]
    assert any(not torch.equal(start[k], weights[2][k]) for k in start)
    assert all(torch.equal(weights[2][k], weights[1][k]) for k in weights[1])


# -- pieces that need no SLURM ---------------------------------------------------------------------
def test_engines_that_cannot_all_be_placed_are_refused() -> None:
    from alignment.es.ray_executor import require_capacity

    require_capacity({"CPU": 2.0, "GPU": 2.0}, engines=2, gpus_each=1, address="h:1")
    with pytest.raises(ValueError, match="3 engines need 3 CPU slots, the Ray cluster at h:1 offers 2"):
        require_capacity({"CPU": 2.0}, engines=3, gpus_each=0, address="h:1")
    with pytest.raises(ValueError, match="4 engines need 4 GPUs, the local Ray instance offers 2"):
        require_capacity({"CPU": 8.0, "GPU": 2.0}, engines=4, gpus_each=1, address=None)
