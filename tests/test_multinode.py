"""Every system on a real 2-node SLURM cluster (tests/slurm_cluster.py): `sbatch --nodes=2` of the
job scripts on the toy models, each run to completion and its outputs checked.

- ES: a Ray cluster of the job (head on n1, a worker joining from n2 through srun), one engine per
  node, both of which generated members; torn down at the end, on a node that never joins, and on
  scancel (no Ray process of the job is left, no finished iteration is lost).
- The scorer as 3 replicas on the 2 nodes (one srun task each), an ES job finding them through their
  address directory, one replica SIGKILLed mid-run: the run equals the 2-node run against a single
  scorer bit for bit, the dead replica is named, `scancel` leaves nothing behind.
- GRPO: one `accelerate launch` per node (2 machines, gloo); λ equal on both ranks at every step.
- Persona and character diffusion: one torchrun per node; the weights equal those of the 1-node,
  2-process run bit for bit. By construction: the same 2 ranks (node rank x processes + local
  rank), seeds and data shards, gloo on CPU, and a 2-rank all-reduce is one IEEE addition, a + b,
  which is commutative, so its order cannot change a bit.

The cluster's nodes are 127.0.0.11 and 127.0.0.12 on this machine; all traffic stays on loopback.
Each node has 2 CPU slots, so jobs that compare two layouts run them side by side.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import torch
from safetensors.torch import load_file

from alignment.scoring.address import read_addresses
from alignment.scoring.wait import healthy_scorers
from tests.conftest import REPO
from tests.slurm_cluster import (
    FINISHED,
    NODE_ADDRS,
    SlurmCluster,
    assert_nothing_left,
    free_port,
    job_processes,
    missing_reason,
)

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


@dataclass
class Job:
    """A submitted job: what run_jobs needs to wait for it and check it."""

    id: int
    out: Path
    nodes: int
    env: dict[str, str]


def submit(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str, nodes: int = 2,
           env: dict[str, str]) -> Job:  # fmt: skip
    out = tmp_path / f"job-{nodes}n-{Path(script).stem}-{time.monotonic_ns()}.out"
    return Job(cluster.sbatch(script, *args, nodes=nodes, env=env, cwd=REPO, output=out), out, nodes, env)


def run_jobs(cluster: SlurmCluster, *jobs: Job) -> list[str]:
    """Wait until every job completes (they may run side by side); returns their outputs."""
    texts = []
    for job in jobs:
        state = cluster.wait(job.id, JOB_TIMEOUT)
        text = job.out.read_text() if job.out.exists() else ""
        info = cluster.job(job.id)
        assert state == "COMPLETED", f"job {job.id}: {state} {info.get('ExitCode')}\n{text[-6000:]}"
        assert info["NodeList"] in (("n[1-2]",) if job.nodes == 2 else ("n1", "n2"))
        assert_nothing_left(job.env)
        texts.append(text)
    return texts


def run_job(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str, nodes: int = 2,
            env: dict[str, str]) -> str:  # fmt: skip
    """sbatch ``script`` on ``nodes`` nodes, wait until it completes; returns its output."""
    return run_jobs(cluster, submit(cluster, tmp_path, script, *args, nodes=nodes, env=env))[0]


# -- ES across nodes (Ray) -------------------------------------------------------------------------
ES_TINY = ["--population_size", "4", "--batch_size", "4", "--max_new_tokens", "8", "--eval_max_prompts", "4",
           "--device", "cpu", "--dtype", "fp32", "--checksum_every", "1"]  # fmt: skip


def es_env(tmp_path: Path, ray_tmp: Path, toy_models: Path, scorer, **extra: str) -> dict[str, str]:
    return job_env(
        tmp_path, POLICY_MODEL_PATH=str(toy_models / "policy"), SCORER_ADDRESS_FILE=str(scorer.address_file),
        SCORER_WAIT_S="60", EXPERIMENT_DIR=str(tmp_path / "es"), RAY_TEMP_DIR=str(ray_tmp),
        RAY_LOG_DIR=str(tmp_path / "ray-logs"), RAY_START_ARGS="--object-store-memory 100000000", **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def es_two_nodes(cluster, toy_models, exact_scorer, tmp_path_factory) -> tuple[str, Path]:
    """ES on 2 nodes (2 iterations) against one one-row-per-forward scorer, run once: its job output
    and run folder. The 2-node test checks it; the replicas test compares its own run with it."""
    tmp = tmp_path_factory.mktemp("es-two-nodes")
    ray_tmp = Path(tempfile.mkdtemp(prefix="slurm-ray-", dir="/tmp"))
    try:
        env = es_env(tmp, ray_tmp, toy_models, exact_scorer)
        out = run_job(cluster, tmp, "slurm/train_accl_alignment_api.sh", "--num_iterations", "2", *ES_TINY,
                      env=env)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    [run] = (tmp / "es").glob("alignment_*")
    return out, run


def test_es_on_a_two_node_ray_cluster(es_two_nodes, toy_models) -> None:
    out, run = es_two_nodes
    assert f"Ray node joined: n1 {NODE_ADDRS[0]}" in out and f"Ray node joined: n2 {NODE_ADDRS[1]}" in out
    assert "engines=2 " in out and "executor=ray" in out and f"policy={toy_models / 'policy'}" in out
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
    assert "stopping the Ray cluster" in out  # and run_job saw nothing of the job left


def test_es_node_that_never_joins_is_named_and_nothing_is_left(cluster, toy_models, scorer, tmp_path,
                                                                short_tmp) -> None:  # fmt: skip
    # n2's `ray start` looks for its head at an address where none listens (the last --address
    # wins): it keeps trying and never joins, so the join timeout ends the job
    env = es_env(tmp_path, short_tmp, toy_models, scorer, RAY_WORKER_START_ARGS=f"--address 127.0.0.1:{free_port()}",
                 RAY_JOIN_TIMEOUT_S="2")  # fmt: skip
    out_file = tmp_path / "never.out"
    job = cluster.sbatch("slurm/train_accl_alignment_api.sh", "--num_iterations", "1", *ES_TINY, nodes=2,
                         env=env, cwd=REPO, output=out_file)  # fmt: skip
    assert cluster.wait(job, JOB_TIMEOUT) == "FAILED"
    out = out_file.read_text()
    assert f"node(s) n2 ({NODE_ADDRS[1]}) did not join within 2 s" in out, out[-3000:]
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


# -- the scorer as replicas across nodes -----------------------------------------------------------
def _replay(run: Path) -> list[dict]:
    """The run's committed iterations (whole lines only: the trainer may be writing the next one)."""
    text = (run / "replay.jsonl").read_text() if (run / "replay.jsonl").exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def _until(cluster: SlurmCluster, job: int, out: Path, ready) -> None:
    """Poll ``ready()`` while the job runs; its output is the message if it ends or times out first."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ready():
        if cluster.state(job) not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"job {job} is {cluster.state(job)}:\n{out.read_text()[-6000:]}")
        time.sleep(0.05)


def test_es_against_three_scorer_replicas_on_two_nodes_one_killed(cluster, toy_models, es_two_nodes,
                                                                   tmp_path) -> None:  # fmt: skip
    """`sbatch --nodes=2 --ntasks=3 slurm/run_scorer_service.sh`: 3 replicas (2 on n1, 1 on n2); an ES
    job given their address directory (`--scorer_url auto`, as the job script passes it); one
    replica SIGKILLed after the first iteration. The run finishes with the results of the 2-node
    run against a single scorer, bit for bit. By construction: every scorer here forwards one row
    at a time on one thread (`--max-batch-size 1 --num-threads 1`, like the `exact_scorer` fixture),
    so a text's score does not depend on which replica scored it nor with which other texts; and ES
    results do not depend on the executor (local here, Ray there: seeds-only updates, each member
    generated whole by one engine, one thread each; see test_es_trainer.py's
    test_ray_executor_matches_local_for_the_same_seeds)."""
    reference_out, reference = es_two_nodes
    addresses = tmp_path / "scorers"
    scorer_env = job_env(tmp_path, REWARD_MODEL=str(toy_models / "reward"), COST_MODEL=str(toy_models / "cost"),
                         SCORER_HOST="nodeaddr", SCORER_PORT="0", SCORER_ADDRESS_DIR=str(addresses),
                         SCORER_MAX_BATCH_SIZE="1")  # fmt: skip
    scorer_out = tmp_path / "scorer.out"
    scorer_job = cluster.sbatch("slurm/run_scorer_service.sh", "--num-threads", "1", nodes=2, ntasks=3,
                                env=scorer_env, cwd=REPO, output=scorer_out)  # fmt: skip
    try:
        _until(cluster, scorer_job, scorer_out, lambda: len(healthy_scorers([addresses])[0]) == 3)
        found, _ = read_addresses([addresses])
        # each replica listens on its own node's NodeAddr (SCORER_HOST=nodeaddr)
        assert sorted(urlsplit(a.url).hostname for a in found) == [NODE_ADDRS[0]] * 2 + [NODE_ADDRS[1]]
        victim = next(a for a in found if urlsplit(a.url).hostname == NODE_ADDRS[0])  # n1 and n2 keep one
        survivors = [a.url for a in found if a is not victim]
        assert any(p.startswith(f"{victim.pid} ") for p in job_processes(scorer_env["ALIGNMENT_TEST_JOB"]))

        env = job_env(tmp_path, POLICY_MODEL_PATH=str(toy_models / "policy"), SCORER_ADDRESS_FILE=f"{addresses}/",
                      SCORER_WAIT_S="60", EXPERIMENT_DIR=str(tmp_path / "es"))  # fmt: skip
        es_out = tmp_path / "es.out"
        # one pair per request: each iteration's requests go to every replica in turn
        es_job = cluster.sbatch("slurm/train_accl_alignment_api.sh", "--num_iterations", "2", *ES_TINY,
                                "--scorer_batch_size", "1", nodes=1, env=env, cwd=REPO, output=es_out)  # fmt: skip
        _until(
            cluster, es_job, es_out, lambda: any(_replay(r) for r in (tmp_path / "es").glob("alignment_*"))
        )
        [run] = (tmp_path / "es").glob("alignment_*")  # its iteration 0 is committed
        # The trainer is paused while the replica dies, so the kill lands mid-run however loaded the
        # machine is: after iteration 0, before the final evaluation, whose 4 requests at once reach
        # every replica (the dead one too) if no earlier request did.
        [trainer] = [
            int(p.split()[0]) for p in job_processes(env["ALIGNMENT_TEST_JOB"]) if "train_es_alignment" in p
        ]
        os.kill(trainer, signal.SIGSTOP)
        try:
            assert not (run / "logs" / "final_eval_results.json").exists()
            os.kill(victim.pid, signal.SIGKILL)
            psutil.Process(victim.pid).wait(30)
        finally:
            os.kill(trainer, signal.SIGCONT)
        assert cluster.wait(es_job, JOB_TIMEOUT) == "COMPLETED", es_out.read_text()[-6000:]
        assert_nothing_left(env)
        out = es_out.read_text()
        # the trainer names the dead replica once, and its spread line shows who served what
        assert f"scorer {victim.url} failed (" in out and "its requests go to the other 2" in out, out[-6000:]
        served = re.findall(r"(http://[\d.:]+) (\d+) requests \(\d+ items\), (\d+) failed", out)
        spread = {url: (int(requests), int(failed)) for url, requests, failed in served}
        assert sorted(spread) == sorted([victim.url, *survivors]), out[-3000:]
        assert spread[victim.url][1] >= 1 and all(spread[url][0] >= 1 for url in survivors), spread
    finally:
        cluster.scancel(scorer_job)
    assert cluster.wait(scorer_job, 120) == "CANCELLED"
    assert_nothing_left(scorer_env)
    text = scorer_out.read_text()
    assert all(f"replica {k} on {node}:" in text for k, node in enumerate(("n1", "n1", "n2"))), text[-3000:]
    assert re.search(r"srun: error: n1: task [01]: Killed", text), text[-3000:]  # SLURM's word on it
    # the survivors removed their address files on scancel; a SIGKILLed replica cannot (clients skip it)
    assert [p.name for p in addresses.iterdir()] == [victim.source.name]

    # the same updates and λ, evaluations and weights as the run against a single scorer
    assert "executor=local" in out and "executor=ray" in reference_out  # (what the comparison spans)
    assert len(_replay(run)) == 2 and _replay(run) == _replay(reference)
    ours, theirs = (
        json.loads((r / "logs" / "final_eval_results.json").read_text()) for r in (run, reference)
    )
    assert (ours["before"], ours["after"]) == (theirs["before"], theirs["after"])
    a, b = (
        torch.load(r / "model_saves" / "final_model_iteration_2" / "pytorch_model.pth")
        for r in (run, reference)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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

    jobs, run_dirs = [], []
    for nodes, per_node in ((2, "1"), (1, "2")):  # side by side: 1 CPU of each node, 1 CPU of one node
        cfg = toy_cfg(persona_toy, tmp_path / f"ckpt{nodes}", "run", reader_rl_learning=True, use_grpo=True,
                      per_gpu_batch_size=2, total_steps=2, save_freq=2)  # fmt: skip
        flags = [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)]
        jobs.append(submit(cluster, tmp_path, "slurm/train_persona.sh", *flags, "--reader_rl_learning",
                           "--use_grpo", nodes=nodes, env=job_env(tmp_path, NUM_PROCESSES=per_node)))  # fmt: skip
        run_dirs.append(cfg.run_dir)
    results = {}
    for job, out, run_dir in zip(jobs, run_jobs(cluster, *jobs), run_dirs, strict=True):
        assert "data parallel over 2 processes" in out
        assert ("--node_rank={node_rank}" in out) == (
            job.nodes == 2
        )  # one torchrun per node, or --standalone
        results[job.nodes] = load_file(
            str(run_dir / "checkpoint" / "latest" / "reader" / "model.safetensors")
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
    jobs = [submit(cluster, tmp_path, "slurm/train_char_diffusion.sh", *flags, "--out_dir", str(tmp_path / f"grpo{n}"),
                   nodes=n, env=job_env(tmp_path, STAGE="grpo", NPROC=per_node))
            for n, per_node in ((2, "1"), (1, "2"))]  # fmt: skip
    weights = {}
    for job, out in zip(jobs, run_jobs(cluster, *jobs), strict=True):  # the two ran side by side
        assert f"nodes={job.nodes}" in out
        ckpt = read_checkpoint(tmp_path / f"grpo{job.nodes}" / "ckpt.pt")
        assert ckpt["iteration"] == 2
        weights[job.nodes] = ckpt["model"]
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
