"""One CLI behaviour everywhere (alignment/cli.py): a user error is one line on stderr naming the
problem, exit code 2, no traceback (``--debug`` shows it); ``--help`` shows every default; default
outputs land in git-ignored folders; CPU threads follow the job's allotment.

To put a CLI under these tests, add a row to ``USER_ERRORS`` (its module, a command line that must
fail as a user error, and a fragment of the one line it must print): its ``--help`` and its
default output folders are then checked too.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from alignment import cli
from tests.conftest import REPO

# Placeholders in the command lines: {tmp} this test's folder, {toy} the tiny models, {closed} a URL
# where nothing listens, {bad_jsonl} a file whose line 1 is not JSON, {typo_yaml} a recipe with the
# unknown key lamda_lr, {file} a plain file.
USER_ERRORS: list[tuple[str, list[str], str]] = [
    # ES
    ("alignment.es.train_es_alignment", ["--population_size", "3", "--bogus", "1"], "unrecognized arguments"),
    ("alignment.es.train_es_alignment", ["--config", "{tmp}/missing.yaml"], "config file not found"),
    ("alignment.es.train_es_alignment", ["--config", "{typo_yaml}"], "did you mean 'lambda_lr'"),
    ("alignment.es.train_es_alignment", ["--policy_model_path", "no-org/no-model"],
     "'no-org/no-model' (--policy_model_path) is not a local folder"),
    ("alignment.es.train_es_alignment", ["--policy_model_path", "{toy}/policy", "--train_jsonl", "{bad_jsonl}"],
     "bad.jsonl:1: not JSON"),
    ("alignment.es.train_es_alignment", ["--policy_model_path", "{toy}/policy", "--scorer_url", "{closed}",
     "--scorer_retries", "0", "--eval_max_prompts", "2", "--experiment_dir", "{tmp}/es"], "scorer"),
    ("alignment.es.train_es_alignment", ["--resume", "{tmp}/no-run"], "no such run directory"),
    # GRPO (--key value and key=value)
    ("alignment.grpo.train_grpo_alignment", ["--max_stepz", "3"], "unknown key 'max_stepz'"),
    ("alignment.grpo.train_grpo_alignment", ["lamda_lr=0.1"], "did you mean 'lambda_lr'"),
    ("alignment.grpo.train_grpo_alignment", ["--max_steps", "many"], "'max_steps' in command-line overrides"),
    ("alignment.grpo.train_grpo_alignment", ["--model_name", "no-org/no-model"],
     "'no-org/no-model' (--model_name) is not a local folder"),
    ("alignment.grpo.train_grpo_alignment", ["--model_name", "{toy}/policy", "--scorer_url", "{closed}",
     "--scorer_retries", "0", "--eval_max_prompts", "2", "--output_dir", "{tmp}/grpo"], "scorer"),
    # evaluation
    ("alignment.evaluation.classify_reward_cost_unified", ["--config", "{typo_yaml}"], "unknown key 'lamda_lr'"),
    ("alignment.evaluation.classify_reward_cost_unified", ["--from-points", "{tmp}"], "no *_points.jsonl files"),
    ("alignment.evaluation.classify_reward_cost_unified", ["--prompts", "{bad_jsonl}", "--output_dir", "{tmp}/o"],
     "lists no models"),
    ("alignment.evaluation.gpt_elo_eval", ["--ratings-only", "--judgments", "{tmp}/none.jsonl"],
     "no judgments file"),
    ("alignment.evaluation.gpt_elo_eval", ["--points-dir", "{tmp}", "--api-key-env", "CLI_TEST_NO_KEY"],
     "environment variable CLI_TEST_NO_KEY is unset"),
    ("alignment.evaluation.select_pku_balanced", ["--source", "{bad_jsonl}"], "bad.jsonl:1: not JSON"),
    ("alignment.evaluation.select_pku_balanced", ["--source", "no-org/no-dataset", "--out-dir", "{tmp}"],
     "'no-org/no-dataset' (--source) is not a local file or folder"),
    # figures
    ("alignment.visualization.plot_reward_cost_grid", ["--input", "{tmp}/none"], "no such model comparisons"),
    ("alignment.visualization.plot_safety_ratios", ["--input", "{tmp}"], "no models in"),
    ("alignment.visualization.plot_gpt_elo_figure", ["--input", "{tmp}/none"], "no such GPT Elo folder"),
    ("alignment.visualization.plot_training_curves", ["{tmp}/none"], "no such run folder"),
    ("alignment.visualization.plot_training_curves", ["{tmp}", "--smooth", "x"], "invalid float value"),
    # the rest
    ("alignment.alpaca.recover", ["--base", "{tmp}/none/llama"], "no such model folder"),
    ("alignment.alpaca.recover", ["--base", "b", "--dtype", "int8"], "unknown dtype 'int8'"),
    ("alignment.toy.build", ["--out", "{file}"], "exists"),
    ("alignment.demo", ["--models-dir"], "expected one argument"),
    # persona
    ("alignment.persona.train", ["--bogus"], "unrecognized arguments"),
    ("alignment.persona.train", ["--train_data", "{bad_jsonl}", "--eval_data", "{bad_jsonl}", "--passages",
     "{bad_jsonl}", "--checkpoint_dir", "{tmp}/p"], "bad.jsonl:1: not JSON"),
    ("alignment.persona.train", ["--retriever_model_path", "minilm", "--reader_rl_learning", "--grpo_clip_eps", "0.1"],
     "only apply with use_grpo"),
    ("alignment.persona.prepare", ["--data", "{tmp}/none.jsonl"], "no such data file"),
    ("alignment.persona.prepare", ["--data", "{bad_jsonl}", "--out", "{tmp}/o"], "bad.jsonl:1: not JSON"),
    ("alignment.persona.recipe", ["--prepared", "{tmp}/none", "--data", "{tmp}/none.jsonl"], "no such data file"),
    ("alignment.persona.toy", ["--seed", "x"], "invalid int value"),
    ("alignment.persona.demo", ["--models-dir"], "expected one argument"),
    # character diffusion
    ("alignment.char_diffusion.prepare", ["--input", "{tmp}/none.txt", "--out", "{tmp}/d"], "input text not found"),
    ("alignment.char_diffusion.prepare", ["--input", "{file}", "--out", "{tmp}/d"], "fewer than block_size"),
    ("alignment.char_diffusion.train", ["--config", "{typo_yaml}"], "unknown key 'lamda_lr'"),
    ("alignment.char_diffusion.train", ["--dataset", "{tmp}/none"], "prepare the data first"),
    ("alignment.char_diffusion.train_judge", ["--judge_head", "mlp"], "is not one of"),
    ("alignment.char_diffusion.train_grpo", ["--group_size", "1"], "group_size must be >= 2"),
    ("alignment.char_diffusion.train_grpo", ["--dataset", "{tmp}"], "prepare the data first"),
    ("alignment.char_diffusion.evaluate", ["--config", "{typo_yaml}", "--policy", "p.pt"], "unknown key 'lamda_lr'"),
    ("alignment.char_diffusion.recipe", ["--text", "{tmp}/none.txt", "--out", "{tmp}/r"], "text not found"),
    ("alignment.char_diffusion.recipe", ["--set", "gpro.kl_beta=0.1"], "the stages are train, judge, grpo"),
    ("alignment.char_diffusion.build", ["--out"], "expected one argument"),
    # doctor
    ("alignment.doctor", ["--device", "cpu", "--policy-shape", "7b"], "the 7b shape is built on a GPU only"),
    ("alignment.doctor", ["--limit", "es=soon"], "expected CHECK=SECONDS"),
]  # fmt: skip
CLIS = sorted({module for module, _, _ in USER_ERRORS})


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch):
    """In-process runs of CLIs: keep the thread count and the root logger as they were."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads()))
    threads, handlers = torch.get_num_threads(), list(logging_root().handlers)
    filters = {h: list(h.filters) for h in handlers}  # pytest's capture handlers live across tests
    yield
    torch.set_num_threads(threads)
    logging_root().handlers[:] = handlers
    for handler, kept in filters.items():
        handler.filters[:] = kept


def logging_root():
    import logging

    return logging.getLogger()


def run_module(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``python -m module argv`` in this process (its ``__main__`` block included); the exit code."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    # pytest's assertion rewriter claims modules named test_* (alignment.scoring.test_score_fixed_prompt)
    # and its loader cannot hand runpy their code: find modules the plain way
    monkeypatch.setattr(
        sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (it is imported)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    return exit_info.value.code


@pytest.mark.parametrize(
    ("module", "argv", "says"),
    USER_ERRORS,
    ids=[f"{m.split('.')[-1]}-{i}" for i, (m, _, _) in enumerate(USER_ERRORS)],
)
def test_user_error_is_one_line_exit_2_without_traceback(
    module, argv, says, tmp_path, toy_models, closed_url, quiet_cli, monkeypatch, capfd
):
    (tmp_path / "bad.jsonl").write_text('{"prompt": \n')
    (tmp_path / "typo.yaml").write_text("lamda_lr: 0.1\n")
    (tmp_path / "file.txt").write_text("x\n")
    monkeypatch.delenv("CLI_TEST_NO_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # whatever a CLI writes by default lands here
    fill = {"tmp": str(tmp_path), "toy": str(toy_models), "closed": closed_url,
            "bad_jsonl": str(tmp_path / "bad.jsonl"), "typo_yaml": str(tmp_path / "typo.yaml"),
            "file": str(tmp_path / "file.txt")}  # fmt: skip
    capfd.readouterr()
    code = run_module(module, [a.format(**fill) for a in argv], monkeypatch)
    err = capfd.readouterr().err
    assert code == cli.EXIT_USER_ERROR, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.rstrip("\n").splitlines()[-1]
    assert re.match(r"^\S+: error: ", last), err[-3000:]  # "<prog>: error: <what was wrong>"
    assert says in last, last
    # nothing else the CLI printed is an error line: the one line is the whole report
    assert sum(": error: " in line for line in err.splitlines()) == 1, err[-3000:]


def help_text(module: str, monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    capsys.readouterr()
    assert run_module(module, ["--help"], monkeypatch) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", CLIS)
def test_help_shows_every_default(module, quiet_cli, monkeypatch, capsys):
    text = help_text(module, monkeypatch, capsys)
    assert "--debug" in text, "the CLI does not build its parser with alignment.cli.parser"
    # one block per option: its line and the indented help lines under it
    blocks = re.split(r"\n(?=  -)", text.split("\noptions:\n", 1)[1])
    missing = [b.split()[0] for b in blocks if b.strip() and not b.lstrip().startswith(("-h,", "--no_"))
               and "default" not in b]  # fmt: skip
    assert not missing, f"{module}: options whose --help names no default: {missing}"


def _git_ignored(path: str) -> bool:
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, capture_output=True)
    return proc.returncode == 0


# Output folders whose own path is tracked but whose outputs are ignored by file pattern.
OUTPUT_PATTERNS = {"alignment/data": "alignment/data/custom_train_250.jsonl"}
OUTPUT_DEST = re.compile(
    r"(^|_)(out|output|outputs|experiment|logs|models|checkpoint|save|run)(_dir)?$|_dir$"
)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("module", CLIS)
def test_default_outputs_are_git_ignored(module, quiet_cli, monkeypatch):
    """Issue 19: default output folders must not land in the working tree as untracked files."""
    parsers: list[cli.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", capture)
    run_module(module, [], monkeypatch)
    assert parsers, f"{module} builds no alignment.cli parser"
    checked = []
    for action in parsers[0]._actions:
        default = getattr(action, "config_default", action.default)
        if not OUTPUT_DEST.search(action.dest) or not isinstance(default, (str, Path)) or not str(default):
            continue
        path = Path(default)
        if path.is_absolute():
            if not path.is_relative_to(REPO):
                continue  # outside the working tree
            path = path.relative_to(REPO)
        probe = OUTPUT_PATTERNS.get(path.as_posix(), (path / "some-output").as_posix())
        checked.append((action.dest, probe))
        assert _git_ignored(probe), (
            f"{module}: --{action.dest} defaults to {default}, which git does not ignore"
        )
    assert checked or module in NO_OUTPUT_FOLDER, f"{module}: no output folder flag found"


# CLIs whose outputs are named by a file flag or go next to their input (figures, recovery output).
NO_OUTPUT_FOLDER = {
    "alignment.visualization.plot_reward_cost_grid",
    "alignment.visualization.plot_safety_ratios",
    "alignment.visualization.plot_gpt_elo_figure",
    "alignment.visualization.plot_training_curves",
    "alignment.alpaca.recover",
    "alignment.char_diffusion.evaluate",  # prints its figures
}


# ------------------------------------------------------------------ alignment/cli.py itself


def test_usage_error_is_one_line_and_defaults_show(capsys):
    p = cli.parser("Does things.\n\n    example --steps 3")
    p.add_argument("--steps", type=int, default=3, help="how many")
    p.add_argument("--name", default="x")  # no help text: the default alone
    p.add_argument("--to", default=None, help="where (default: next to the input)")  # said by hand: kept
    p.add_argument("--flag", action="store_true", help="a switch")
    text = p.format_help()
    assert "how many (default: 3)" in text and "(default: x)" in text and "(default: False)" in text
    assert "where (default: next to the input)" in text and "(default: None)" not in text
    assert "    example --steps 3" in text  # the docstring's layout is kept
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--steps", "three"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'three'" in err and "usage" not in err


def test_abbreviations_are_not_flags():
    p = cli.parser()
    p.add_argument("--lr_scheduler", default="cosine")
    with pytest.raises(SystemExit):
        p.parse_args(["--lr", "0.1"])  # argparse's default would take it for --lr_scheduler


def _exit(main, argv, capsys, **kwargs) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv, prog="prog", **kwargs)
    return exit_info.value.code, capsys.readouterr().err


def test_run_turns_user_errors_into_one_line(tmp_path, quiet_cli, monkeypatch, capsys):
    monkeypatch.delenv("ALIGNMENT_DEBUG", raising=False)

    def bad_input(argv):
        raise cli.InputError("rows.jsonl:3: not JSON\n  (a second line)")

    assert _exit(bad_input, [], capsys) == (2, "prog: error: rows.jsonl:3: not JSON (a second line)\n")
    code, err = _exit(bad_input, ["--debug"], capsys)
    assert (
        code == 2
        and "Traceback" in err
        and err.endswith("prog: error: rows.jsonl:3: not JSON (a second line)\n")
    )
    monkeypatch.setenv("ALIGNMENT_DEBUG", "1")
    assert "Traceback" in _exit(bad_input, [], capsys)[1]
    monkeypatch.delenv("ALIGNMENT_DEBUG")

    def missing(argv):
        open(tmp_path / "nope.yaml")  # noqa: SIM115 - raises

    assert _exit(missing, [], capsys) == (
        2,
        f"prog: error: No such file or directory: {tmp_path / 'nope.yaml'}\n",
    )

    class ServiceDown(RuntimeError):
        pass

    def down(argv):
        raise ServiceDown("scorer unreachable after 3 tries")

    assert _exit(down, [], capsys, user_errors=(ServiceDown,)) == (
        2, "prog: error: ServiceDown: scorer unreachable after 3 tries\n")  # fmt: skip
    with pytest.raises(ServiceDown):  # a bug keeps its traceback: not in user_errors
        cli.run(down, [], prog="prog")
    assert _exit(lambda argv: 3, [], capsys) == (3, "")
    assert _exit(lambda argv: None, [], capsys) == (0, "")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert _exit(interrupted, [], capsys) == (130, "interrupted\n")


def test_threads_follow_the_allotment_unless_set(quiet_cli, monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cli.allotted_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cli.allotted_cpus() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "x")  # not a count: the affinity mask decides
    assert cli.allotted_cpus() == len(os.sched_getaffinity(0))

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert (
        cli.configure_threads() == 3 and torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    )
    # its own choice is not mistaken for the user's: a later call may split the allotment
    assert (
        cli.user_threads() is None
        and cli.configure_threads(per_process=1) == 1
        and torch.get_num_threads() == 1
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # set by the user or the job: kept
    assert (
        cli.user_threads() == 2 and cli.configure_threads(per_process=1) == 2 and torch.get_num_threads() == 2
    )


def test_threads_from_the_affinity_mask_in_a_fresh_process():
    """A CLI started on one core of the machine (a container's share, taskset) uses one thread."""
    code = "from alignment import cli; import torch; cli.configure_threads(); print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    core = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}}); {code}"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"


def test_real_process_prints_exactly_one_line(tmp_path):
    """The whole contract, in a process of its own: stderr is the one line, exit code 2; --debug adds
    the traceback."""
    argv = [sys.executable, "-m", "alignment.visualization.plot_training_curves", str(tmp_path / "none")]
    env = {**os.environ, "ALIGNMENT_DEBUG": ""}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr == f"plot_training_curves.py: error: no such run folder: {tmp_path / 'none'}\n"
    proc = subprocess.run([*argv, "--debug"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("Traceback") and "FileNotFoundError" in proc.stderr
