"""The scorer's command lines behave as every CLI of the project (alignment.cli): a user error is one
line on stderr and exit code 2 (the traceback only with --debug), --help shows the defaults. And
replicas: ``--replicas`` and slurm/run_scorer_service.sh start them, stop them, give each its port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.scoring.client import ScorerClient
from alignment.scoring.settings import parse_args
from alignment.scoring.wait import wait_for_scorer
from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
       "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
ENV.pop("SLURM_JOB_ID", None)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The user-error line: the last of stderr (INFO logs may come before it), and no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ")
    return last


def test_service_help_shows_defaults_and_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--replicas REPLICAS" in text and "(default: 1)" in text and "--address-dir" in text
    for argv, fragment in [
        (["--reward-model", "r", "--cost-model", "c", "--replicas", "2", "--address-file", "a.json"],
         "--replicas 2 needs --address-dir"),
        (["--reward-model", "r", "--cost-model", "c", "--replicas", "0"], "must be positive"),
        (["--reward-model", "r"], "--cost-model"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as done:
            parse_args(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and fragment in err


def test_service_with_a_missing_model_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    args = ["alignment.scoring.scorer_service", "--reward-model", str(missing), "--cost-model", str(missing),
            "--host", "127.0.0.1", "--port", "0", "--address-dir", str(tmp_path)]  # fmt: skip
    line = _error_line(_cli(*args), "scorer_service")
    assert str(missing) in line
    # --debug (alignment.cli shows the traceback with it; tests/test_cli.py) is a flag of the service too
    assert parse_args(args[1:] + ["--debug"]).reward_model == str(missing)


def test_fixed_prompt_check_against_no_scorer_names_the_host_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli("alignment.scoring.test_score_fixed_prompt", "--url", f"http://127.0.0.1:{port}",
                "--retry-budget", "0.5")  # fmt: skip
    line = _error_line(proc, "python -m alignment.scoring.test_score_fixed_prompt")
    assert f"http://127.0.0.1:{port}" in line and "retry budget" in line


def test_script_starts_replicas_that_stop_with_it(toy_models: Path, tmp_path: Path):
    """``SCORER_REPLICAS=2 bash slurm/run_scorer_service.sh`` (no SLURM): the service's --replicas
    runs two, each with its own port and address file; SIGTERM to the script's process (the
    service, after exec) stops both."""
    directory = tmp_path / "scorers"
    env = {**ENV, "REWARD_MODEL": str(toy_models / "reward"), "COST_MODEL": str(toy_models / "cost"),
           "SCORER_REPLICAS": "2", "SCORER_HOST": "127.0.0.1", "SCORER_PORT": "0",
           "SCORER_ADDRESS_DIR": str(directory), "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    env.pop("SCORER_ADDRESS_FILE", None)
    proc = subprocess.Popen(["bash", "slurm/run_scorer_service.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        urls = wait_for_scorer(address_dir=directory, replicas=2, timeout=240, poll=0.5).split(",")
        assert len(set(urls)) == 2
        with ScorerClient("auto", address_dir=directory, batch_size=1) as client:
            client.score(["a", "b", "c", "d"], ["e", "f", "g", "h"])
            assert all(client.spread()[url]["requests"] >= 1 for url in urls)
    finally:
        proc.send_signal(signal.SIGTERM)  # the supervisor only: it must stop its replicas itself
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    pids = [int(p) for p in re.findall(r"replica \d \(pid (\d+)\)", text)]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_script_as_an_srun_task_takes_the_port_of_its_local_rank(toy_models: Path, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tmp_path / "scorers"
    env = {**ENV, "REWARD_MODEL": str(toy_models / "reward"), "COST_MODEL": str(toy_models / "cost"),
           "SCORER_REPLICA_TASK": "1", "SLURM_LOCALID": "1", "SLURM_PROCID": "3", "SCORER_HOST": "127.0.0.1",
           "SCORER_PORT": str(port - 1), "SCORER_ADDRESS_DIR": str(directory)}  # fmt: skip
    proc = subprocess.Popen(["bash", "slurm/run_scorer_service.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert wait_for_scorer(address_dir=directory, timeout=240, poll=0.5) == f"http://127.0.0.1:{port}"
        assert (directory / f"scorer-127.0.0.1-{port}.json").is_file()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "replica 3 on" in out.decode(errors="replace")


def test_script_refuses_nodeaddr_outside_slurm(tmp_path: Path):
    """SCORER_HOST=nodeaddr means the node's SLURM NodeAddr (tests/test_multinode.py runs it in a
    job); outside a job there is none, and the script says so before loading anything."""
    env = {**ENV, "SCORER_HOST": "nodeaddr", "LOG_DIR": str(tmp_path)}
    env.pop("SLURMD_NODENAME", None)
    proc = subprocess.run(["bash", "slurm/run_scorer_service.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "SCORER_HOST=nodeaddr needs a SLURM job" in proc.stderr, proc.stderr


def test_script_refuses_one_address_file_for_several_replicas(tmp_path: Path):
    env = {**ENV, "SCORER_REPLICAS": "3", "SCORER_ADDRESS_FILE": str(tmp_path / "a.json"),
           "LOG_DIR": str(tmp_path)}  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(["bash", "slurm/run_scorer_service.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "SCORER_ADDRESS_DIR" in proc.stderr
    assert time.monotonic() - started < 30  # before any model is loaded
