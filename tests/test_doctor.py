"""``python -m alignment.doctor``: the CPU quick run end to end (real scorer, real trainers), its table
and JSON; per-check time limits; a 7b shape refused on a CPU before anything is built; the report's
verdict rules; and the ES measuring helpers by exact arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.doctor.checks import CHECKS
from alignment.doctor.report import (
    NO_GPU,
    STATUSES,
    VERDICTS,
    CheckResult,
    DoctorReport,
    Figure,
    format_table,
    judged,
    not_run,
)
from alignment.es import measure

REPO = Path(__file__).resolve().parents[1]


def doctor(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "alignment.doctor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)  # fmt: skip


def test_quick_cpu_run_reports_every_check_in_the_table_and_the_json(toy_models: Path, tmp_path: Path):
    out = doctor("--device", "cpu", "--policy-shape", "toy", "--quick", "--models-dir", str(toy_models),
                 "--out-dir", str(tmp_path / "logs"), "--json", str(tmp_path / "report.json"))  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: a measured target was missed (a timing)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == 1 and report["device"] == "cpu"
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == list(CHECKS)
    for c in checks.values():
        assert c["status"] in STATUSES and c["status"] not in ("failed", "timed out"), (
            c["name"],
            c["reason"],
        )
        assert all(f["verdict"] in VERDICTS for f in c["figures"])
        assert f"[{c['status'].upper()}] {c['title']}" in out.stdout  # the table shows every check
        for f in c["figures"]:
            assert f["name"] in out.stdout
            if f["verdict"] == "not run":
                assert f["note"], f  # what did not run says why
    for name in ("environment", "models", "noise", "persona", "char_diffusion"):
        assert checks[name]["status"] == "passed", checks[name]
    assert report["ok"] == (out.returncode == 0)
    assert report["counts"]["passed"] == sum(c["status"] == "passed" for c in checks.values())

    def figure(check: str, prefix: str) -> dict:
        return next(f for f in checks[check]["figures"] if f["name"].startswith(prefix))

    # GPU parts: reported not run with the reason, never counted as passed
    for check, part in (("noise", "CPU vs GPU"), ("es", "ES memory"), ("grpo", "peak GPU")):
        assert figure(check, part)["verdict"] == "not run" and NO_GPU in figure(check, part)["note"]
    # GPU targets measured on a CPU are shown, not judged; the CPU target (ES share) is judged
    assert figure("scorer", "uniform")["verdict"] == "not judged" and figure("scorer", "uniform")["value"] > 0
    assert figure("es", "low-rank: throughput")["verdict"] == "not judged"
    assert figure("es", "full-rank: share")["verdict"] in ("met", "missed")
    assert 0 < figure("es", "full-rank: share")["value"] < 1
    assert figure("noise", "self-check cpu")["value"].startswith("hash32x3")
    # the JSON's numbers are the table's
    share = figure("es", "full-rank: share")
    assert Figure(**share).shown() in out.stdout
    assert (tmp_path / "logs" / "report.json").is_file() and (tmp_path / "logs" / "es.log").is_file()


def test_a_check_over_its_limit_is_stopped_and_the_others_still_run(tmp_path: Path):
    out = doctor("--device", "cpu", "--only", "environment,noise", "--limit", "noise=0.05",
                 "--out-dir", str(tmp_path), "--json", str(tmp_path / "r.json"), timeout=300)  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["checks"]}
    assert checks["noise"]["status"] == "timed out" and "limit of 0.05 s" in checks["noise"]["reason"]
    assert not Path(f"/proc/{checks['noise']['data']['pid']}").exists()  # stopped, not left running
    assert checks["environment"]["status"] == "passed"
    assert checks["es"]["status"] == "not run" and "--only" in checks["es"]["reason"]
    assert "[TIMED OUT]" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cpu", "--policy-shape", "7b"], "the 7b shape is built on a GPU only"),
        (["--device", "cpu", "--reward-model", "x"], "--reward-model and --cost-model go together"),
        (["--device", "cpu", "--only", "bogus"], "no check named bogus"),
        (["--device", "cpu", "--limit", "es=soon"], "expected CHECK=SECONDS"),
    ],
)
def test_user_errors_are_one_line_and_nothing_is_built(tmp_path: Path, args: list[str], message: str):
    out = doctor(
        *args, "--models-dir", str(tmp_path / "models"), "--out-dir", str(tmp_path / "logs"), timeout=120
    )
    assert out.returncode == 2
    assert (
        message in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    )
    assert not (tmp_path / "models").exists()  # refused before anything was materialised


def test_verdicts_only_count_what_ran_and_was_judged():
    assert judged("r", 3.5, "x", ">=", 3.0, on_gpu=True, gpu_target=True).verdict == "met"
    assert judged("r", 2.0, "x", ">=", 3.0, on_gpu=True, gpu_target=True).verdict == "missed"
    assert judged("r", 2.0, "x", ">=", 3.0, on_gpu=False, gpu_target=True).verdict == "not judged"
    assert judged("s", 0.12, "", "<=", 0.10, on_gpu=False).verdict == "missed"
    assert judged("s", None, "", "<=", 0.10, on_gpu=True).verdict == "not run"
    ok = CheckResult.from_figures("a", "A", [Figure("x", 1.0), not_run("gpu part", "no GPU")])
    bad = CheckResult.from_figures("b", "B", [judged("s", 0.2, "", "<=", 0.1, on_gpu=False)])
    assert ok.status == "passed" and bad.status == "missed" and "s" in bad.reason
    report = DoctorReport("cpu", {}, [ok, bad, CheckResult("c", "C", "not run", reason="no vLLM")])
    assert report.counts() == {"passed": 1, "missed": 1, "failed": 0, "timed out": 0, "not run": 1,
                               "parts not run": 1}  # fmt: skip
    assert not report.ok and DoctorReport("cpu", {}, [ok, report.checks[2]]).ok
    assert json.loads(report.to_json())["checks"][1]["figures"][0]["value"] == 0.2
    table = format_table(report)
    assert "[MISSED] B" in table and "no vLLM" in table and "no GPU" in table


def test_interleaved_means_and_share_outside_generation_are_exact():
    times = {"full": [(10.0, 8.0), (4.0, 3.0), (6.0, 3.0)], "generate": [(9.0, 9.0), (2.0, 2.0), (2.0, 2.0)]}

    def step(label: str):
        return lambda i: {"time/iteration": times[label][i][0], "time/generation": times[label][i][1],
                          "tokens": 100.0 * (i + 1)}  # fmt: skip

    seen = []
    report = measure.interleaved(
        {k: step(k) for k in times}, 3, warmup=1, on_iteration=lambda i, d: seen.append(i)
    )
    assert seen == [0, 1, 2]
    full = report["full"]
    assert full["iterations"] == 2 and full["seconds"] == 5.0 and full["tokens"] == 250.0
    assert full["non_generation_share"] == pytest.approx(1 - 6.0 / 10.0)  # Σgen / Σiter, not a mean of ratios
    assert full["parts"]["generation"] == 3.0
    assert measure.throughput_ratio(report, "full", "generate") == pytest.approx((250 / 5) / (250 / 2))


def test_random_shapes_count_like_llama_and_7b_is_refused_on_cpu():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.cli import UserError
    from alignment.toy.shapes import SHAPES, approx_parameters, check_shape

    s = SHAPES["1b"]
    config = LlamaConfig(vocab_size=450, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.heads, intermediate_size=s.intermediate, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):  # no memory: the count alone
        model = LlamaForCausalLM(config)
    assert approx_parameters("1b") == sum(p.numel() for p in model.parameters())
    assert check_shape("1b", "cpu") == s and check_shape("7b", "cuda") == SHAPES["7b"]
    with pytest.raises(UserError, match="7b shape is built on a GPU only"):
        check_shape("7b", "cpu")


def test_each_check_sees_the_gpus_it_should():
    from alignment.doctor.context import Context
    from alignment.doctor.runner import child_env

    gpu = Context(
        device="cuda", quick=True, models_dir="m", out_dir="o", policy_label="toy", score_label="toy"
    )
    cpu = Context(
        device="cpu", quick=True, models_dir="m", out_dir="o", policy_label="toy", score_label="toy"
    )
    job = {"CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}
    assert child_env(CHECKS["grpo"], gpu, job)["CUDA_VISIBLE_DEVICES"] == "2"  # one GPU: no DataParallel
    assert child_env(CHECKS["grpo"], gpu, {})["CUDA_VISIBLE_DEVICES"] == "0"
    assert child_env(CHECKS["noise"], gpu, job)["CUDA_VISIBLE_DEVICES"] == "2,3"  # every GPU against the CPU
    assert all(child_env(spec, cpu, job)["CUDA_VISIBLE_DEVICES"] == "" for spec in CHECKS.values())
    assert (
        child_env(CHECKS["es"], cpu, job)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and job["PATH"] == "/bin"
    )


def test_sigterm_stops_the_running_check_and_what_it_started(toy_models: Path, tmp_path: Path):
    """kill / scancel (SIGTERM) during the scorer check: the doctor exits, and neither the check's
    process (a session of its own) nor the scorer it started is left running."""
    import signal
    import time

    def ours() -> list[int]:  # processes whose command line names this test's folder
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(tmp_path) in (proc / "cmdline").read_text(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "alignment.doctor", "--device", "cpu", "--only", "scorer", "--models-dir",
           str(toy_models), "--out-dir", str(tmp_path / "logs")]  # fmt: skip
    parent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        scorer_logs = tmp_path / "logs" / "scorer"
        while not list(scorer_logs.glob("scorer-*.log")):  # wait until the check has started a scorer
            assert parent.poll() is None and time.monotonic() < deadline, "no scorer was started"
            time.sleep(0.2)
        assert len(ours()) >= 3  # the doctor, the check, the scorer
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 128 + signal.SIGTERM
        assert ours() == []
    finally:
        if parent.poll() is None:
            parent.kill()
