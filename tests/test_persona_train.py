"""The persona trainer end to end on the toy task: SFT checkpoint layout and logs, GRPO and REINFORCE
from it, the reference model, retriever distillation, exact resume, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import ConfigError
from alignment.persona import checkpoint as ckpt
from alignment.persona.config import PersonaConfig, load_persona_config
from alignment.persona.hashing import weights_hash
from alignment.persona.reader import FiDReader
from alignment.persona.train import main, parse_args
from alignment.persona.trainer import train
from alignment.tracking import read_jsonl_metrics

REPO = Path(__file__).resolve().parents[1]


def toy_cfg(toy: Path, root: Path, name: str, **kw) -> PersonaConfig:
    base = {
        "reader_model_type": str(toy / "reader"), "retriever_model_path": str(toy / "retriever"),
        "train_data": str(toy / "data" / "train.jsonl"), "eval_data": str(toy / "data" / "valid.jsonl"),
        "passages": str(toy / "data" / "passages.jsonl"), "checkpoint_dir": str(root), "name": name,
        "retriever_from": "persona", "text_maxlength": 64, "target_maxlength": 16, "generation_max_length": 8,
        "per_gpu_batch_size": 4, "per_gpu_eval_batch_size": 8, "eval_max_examples": 8, "retriever_n_context": 2,
        "lr": 1e-3, "lr_retriever": 1e-3, "temperature_score": 0.1, "temperature_gold": 0.1, "scheduler": "linear",
        "total_steps": 2, "log_freq": 1, "eval_freq": 100, "save_freq": 100, "log_examples": 2,
    }  # fmt: skip
    return load_persona_config(None, {**base, **kw})


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{part}/{k}": v for part in ("reader", "retriever")
            for k, v in load_file(str(step_dir / part / "model.safetensors")).items()}  # fmt: skip


@pytest.fixture(scope="module")
def sft(persona_toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("persona-runs")
    cfg = toy_cfg(persona_toy, root, "sft", total_steps=4, save_freq=2)
    return cfg, train(cfg)


def _rl(persona_toy, sft, root, name, **kw) -> tuple[PersonaConfig, dict]:
    cfg = toy_cfg(persona_toy, root, name, model_path=str(sft[0].run_dir / "checkpoint" / "latest"),
                  reader_rl_learning=True, **kw)  # fmt: skip
    return cfg, train(cfg)


def test_sft_checkpoints_and_logs(sft):
    cfg, summary = sft
    root = cfg.run_dir / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4"]
    assert (root / "latest").readlink().as_posix() == "step-4" and summary["checkpoint"] == str(
        root / "step-4"
    )
    step = root / "step-4"
    assert {p.name for p in step.iterdir()} == {"reader", "retriever", "training_state.pt", "options.yaml"}
    state = ckpt.load_state(step)
    assert state["step"] == 4 and state["stage"] == "sft" and set(state["optimizers"]) == {"reader"}
    assert load_persona_config(step / "options.yaml") == cfg  # the options round-trip
    rows = read_jsonl_metrics(cfg.run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 4]
    for key in ("em", "f1", "rouge_l", "bleu", "distinct_1", "distinct_2", "reward", "sampled_reward"):
        assert all(0 <= r[f"eval/{key}"] <= (3 if "reward" in key else 1) for r in evals), key
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]  # teacher forcing learns
    assert list(cfg.run_dir.glob("events.out.tfevents.*"))
    log = (cfg.run_dir / "examples.log").read_text()
    assert log.count("=== step") == 2 and "gold:" in log and "response:" in log and "passages:" in log


def test_grpo_from_sft_applies_kl_and_ratio_and_logs_the_reference(persona_toy, sft, tmp_path):
    cfg, summary = _rl(persona_toy, sft, tmp_path, "grpo", use_grpo=True, per_gpu_batch_size=2, lr=3e-3)
    rows = read_jsonl_metrics(cfg.run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert r["train/ratio_mean_epoch1"] == 1.0  # first inner epoch: the sampling weights
        assert r["train/ratio_mean_epoch2"] != 1.0  # second: the ratio and its clip matter
        for key in ("reward", "reward_f1", "reward_rouge_l", "reward_bleu", "kl", "pg_loss", "logprob_gap"):
            assert f"train/{key}" in r, key
        assert r["train/logprob_gap"] < 1e-4  # loss log-probs = sampler's (float noise only)
    assert train_rows[1]["train/kl"] > 0  # the policy moved away from the reference, and KL sees it
    ref = json.loads((cfg.run_dir / "reference.json").read_text())
    sft_reader = sft[0].run_dir / "checkpoint" / "step-4" / "reader"
    assert ref["source"] == str(sft_reader)
    assert ref["sha256"] == weights_hash(FiDReader.from_pretrained(sft_reader))
    assert ref["sha256"] != weights_hash(FiDReader.from_pretrained(persona_toy / "reader"))  # not raw T5
    assert (
        summary["eval"][0]["eval/kl_to_reference"] == 0.0 and summary["eval"][-1]["eval/kl_to_reference"] > 0
    )
    assert ckpt.load_state(cfg.run_dir / "checkpoint" / "latest")["reference"] == ref


def test_reinforce_with_retriever_distillation_and_index_refresh(persona_toy, sft, tmp_path):
    cfg, _ = _rl(persona_toy, sft, tmp_path, "rf", train_retriever=True, refresh_index=1,
                 reinforce_baseline="none")  # fmt: skip
    rows = [r for r in read_jsonl_metrics(cfg.run_dir / "metrics.jsonl") if "train/loss" in r]
    for r in rows:
        assert r["train/baseline"] == 0.0 and "train/ratio_mean_epoch1" not in r
        assert r["train/retriever_loss"] >= 0 and "train/passage_reward_f1" in r
    before = _weights(sft[0].run_dir / "checkpoint" / "step-4")
    after = _weights(cfg.run_dir / "checkpoint" / "latest")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("retriever/") for k in changed) and any(k.startswith("reader/") for k in changed)
    state = ckpt.load_state(cfg.run_dir / "checkpoint" / "latest")
    assert set(state["optimizers"]) == {"reader", "retriever"}
    assert len(list(cfg.index_dir.iterdir())) == 3  # the start index and one per refresh
    assert (cfg.index_dir / state["index_fingerprint"][:32]).is_dir()


def test_reference_model_path_is_read(persona_toy, sft, tmp_path):
    raw = persona_toy / "reader"
    cfg, _ = _rl(persona_toy, sft, tmp_path, "ref", use_grpo=True, per_gpu_batch_size=2, total_steps=1,
                 reference_model_path=str(raw))  # fmt: skip
    ref = json.loads((cfg.run_dir / "reference.json").read_text())
    assert ref == {"source": str(raw), "sha256": weights_hash(FiDReader.from_pretrained(raw))}


def test_interrupted_and_resumed_run_equals_a_straight_run(persona_toy, sft, tmp_path):
    kw = {"use_grpo": True, "per_gpu_batch_size": 2, "train_retriever": True, "refresh_index": 2,
          "total_steps": 4, "save_freq": 2, "grpo_kl_estimator": "k3"}  # fmt: skip
    straight, _ = _rl(persona_toy, sft, tmp_path / "a", "run", **kw)
    cut = toy_cfg(persona_toy, tmp_path / "b", "run", model_path=str(sft[0].run_dir / "checkpoint" / "latest"),
                  reader_rl_learning=True, **kw)  # fmt: skip
    assert train(cut, stop_after=3)["step"] == 3  # "crashes" after step 3; step 2 is the last checkpoint
    resumed = train(cut, resume=True)
    assert resumed["step"] == 4
    a, b = (
        _weights(straight.run_dir / "checkpoint" / "step-4"),
        _weights(cut.run_dir / "checkpoint" / "step-4"),
    )
    assert a.keys() == b.keys()
    # same ops on the same shapes in the same thread: bit-equal by construction on one CPU
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa = ckpt.load_state(straight.run_dir / "checkpoint" / "step-4")
    sb = ckpt.load_state(cut.run_dir / "checkpoint" / "step-4")
    assert sa["index_fingerprint"] == sb["index_fingerprint"] and sa["offset"] == sb["offset"]
    steps = [r["step"] for r in read_jsonl_metrics(cut.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 3, 4]  # step 3 was redone after the interruption


def test_resume_guards(persona_toy, sft, tmp_path):
    cfg = sft[0]
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    changed = toy_cfg(persona_toy, cfg.checkpoint_dir, "sft", total_steps=4, save_freq=2, lr=0.5)
    with pytest.raises(ConfigError, match=r"lr \(0.001 -> 0.5\)"):
        train(changed, resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(toy_cfg(persona_toy, tmp_path, "none"), resume=True)


SEED_GRPO = ("--reader_rl_learning --use_grpo --grpo_group_size 4 --grpo_kl_coeff 0.1 --gold_score_mode "
             "f1rougebleudist --name grpo_experiment --checkpoint_dir ./ckpt/grpo/ --train_data t.jsonl "
             "--eval_data v.jsonl --per_gpu_batch_size 2")  # fmt: skip


def test_seed_command_line_and_recipe(tmp_path):
    cfg, _ = parse_args(SEED_GRPO.split())
    assert (cfg.stage, cfg.grpo_group_size, cfg.grpo_kl_coeff, cfg.per_gpu_batch_size) == ("grpo", 4, 0.1, 2)
    assert cfg.run_dir == Path("ckpt/grpo/grpo_experiment") and cfg.reference_model_path is None
    cfg, _ = parse_args(
        [*SEED_GRPO.split(), "--reference_model_path", "ckpt/pre/checkpoint", "--grpo_inner_epochs", "3"]
    )
    assert cfg.reference_model_path == "ckpt/pre/checkpoint" and cfg.grpo_inner_epochs == 3
    reinforce, _ = parse_args(
        SEED_GRPO.replace("--use_grpo --grpo_group_size 4 --grpo_kl_coeff 0.1 ", "").split()
    )
    assert reinforce.stage == "reinforce" and reinforce.reinforce_baseline == "leave_one_out"
    with pytest.raises(SystemExit):
        parse_args([*SEED_GRPO.split(), "--grpo_top_k_ratio", "0.5"])  # not offered: it would do nothing
    toy = load_persona_config(REPO / "alignment" / "persona" / "persona_toy.yaml", ["use_grpo=true",
                              "reader_rl_learning=true"])  # fmt: skip
    assert toy.stage == "grpo" and toy.retriever_from == "persona"
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo_group_sise: 4\n")
    with pytest.raises(ConfigError, match="grpo_group_sise.*bad.yaml.*grpo_group_size"):
        load_persona_config(bad)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_grpo"], "only apply with reader_rl_learning"),
        (["--reader_rl_learning", "--grpo_kl_coeff", "0.2"], "only apply with use_grpo"),
        (
            ["--reader_rl_learning", "--use_grpo", "--reinforce_baseline", "none"],
            "does not apply with use_grpo",
        ),
        (["--reader_rl_learning", "--use_grpo", "--grpo_group_size", "1"], "grpo_group_size must be >= 2"),
        (["--refresh_index", "5"], "only applies with train_retriever"),
        (["--reader_rl_learning", "--per_gpu_batch_size", "1"], "needs per_gpu_batch_size >= 2"),
        (["--n_context", "6"], "exceeds retriever_n_context"),
    ],
)
def test_flags_that_would_do_nothing_are_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_cli_trains_and_prints_its_summary(persona_toy, tmp_path, capsys):
    cfg = toy_cfg(persona_toy, tmp_path, "cli", total_steps=1)
    flags = [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)]
    main(flags)
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 1 and out["checkpoint"].endswith("cli/checkpoint/step-1")
    assert "eval/reward" in out["final_eval"] and (tmp_path / "cli" / "run.log").is_file()


@pytest.mark.parametrize(
    "recipe", ["persona_toy.yaml", "persona_convai2.yaml", "persona_convai2_offline.yaml"]
)
def test_recipe_comments_are_commands_the_cli_accepts(recipe, monkeypatch):
    """Every `python -m alignment.persona.train ...` in a recipe's comment parses (no `key=value`)."""
    monkeypatch.chdir(REPO)  # the commands name the recipe relative to the repository root
    lines = [line.lstrip("#").strip() for line in (REPO / "alignment" / "persona" / recipe).read_text().splitlines()
             if line.startswith("#")]  # fmt: skip
    commands, current = [], None
    for line in lines:
        if current is None and "-m alignment.persona.train" in line:
            current = line.split("-m alignment.persona.train", 1)[1]
        elif current is not None:
            current += " " + line
        if current is not None and not current.endswith("\\"):
            commands.append(current.replace("\\", " ").split())
            current = None
    assert commands
    for words in commands:
        assert not [w for w in words if "=" in w and not w.startswith("--")], words
        cfg, _ = parse_args(words)
        assert cfg.run_dir.parts[0] == "logs"  # runs land in the git-ignored logs/


def test_toy_recipe_points_where_make_demo_builds():
    from alignment.persona.demo import persona_demo  # noqa: F401  (the demo builds models/toy/persona)
    from alignment.persona.toy import DEFAULT_OUT

    cfg = load_persona_config(REPO / "alignment" / "persona" / "persona_toy.yaml")
    assert DEFAULT_OUT == "models/toy/persona"
    assert cfg.reader_model_type == f"{DEFAULT_OUT}/reader" and cfg.train_data.startswith(
        f"{DEFAULT_OUT}/data/"
    )
    assert PersonaConfig().checkpoint_dir == "logs/persona" and cfg.checkpoint_dir.startswith("logs/")
