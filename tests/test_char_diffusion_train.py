"""Character diffusion training runs on the tiny synthetic pipeline: bit-identical resume (pretraining
and GRPO), the GRPO command line with the seed's flags, its metrics, samples and checkpoint, and
bad input errors that name the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment import cli
from alignment.char_diffusion.checkpoint import read_checkpoint, save_checkpoint
from alignment.char_diffusion.config import GRPOConfig, PretrainConfig
from alignment.char_diffusion.data import CharData, Vocab
from alignment.char_diffusion.judge import corrupt_with_fills
from alignment.char_diffusion.model import Judge, ModelArgs
from alignment.char_diffusion.prepare import prepare
from alignment.char_diffusion.train import main as train_main
from alignment.char_diffusion.train import pretrain
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.cli import UserError
from alignment.config import load_config
from alignment.tracking import read_jsonl_metrics, read_tensorboard_scalars
from tests.conftest import REPO

METRICS = ("loss", "pg_loss", "kl_penalty", "mean_reward", "std_reward", "mean_advantage", "mean_kl",
           "mean_log_prob", "lr", "zero_spread_fraction", "fill_accuracy")  # fmt: skip
RECIPE = REPO / "alignment" / "char_diffusion" / "grpo.yaml"


def _grpo_cfg(models: dict[str, str], out: Path, **extra) -> GRPOConfig:
    return load_config(GRPOConfig, RECIPE, {
        "dataset": models["data"], "generator_checkpoint": models["generator"], "judge_checkpoint": models["judge"],
        "out_dir": str(out), "batch_size": 2, "gradient_accumulation_steps": 2, "group_size": 4, "max_iters": 4,
        "lr_decay_iters": 4, "warmup_iters": 1, "learning_rate": 1e-3, "eval_interval": 100, "eval_iters": 1,
        "eval_batch_size": 2, "save_interval": 2, "sample_interval": 0, **extra})  # fmt: skip


def _weights(path: str | Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def _same_state(a: dict, b: dict) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_grpo_resume_is_bit_identical(char_diffusion_models, tmp_path):
    # same shapes, same thread count, same seeded draws: exact by construction, so torch.equal
    straight = train_grpo(_grpo_cfg(char_diffusion_models, tmp_path / "a"))
    train_grpo(_grpo_cfg(char_diffusion_models, tmp_path / "b", max_iters=2))
    assert read_checkpoint(tmp_path / "b" / "ckpt.pt")["iteration"] == 2
    resumed = train_grpo(_grpo_cfg(char_diffusion_models, tmp_path / "b"), resume=True)
    a, b = read_checkpoint(straight["checkpoint"]), read_checkpoint(resumed["checkpoint"])
    assert a["iteration"] == b["iteration"] == 4
    assert _same_state(a["model"], b["model"]) and _same_state(a["optimizer"], b["optimizer"])
    assert a["scheduler"] == b["scheduler"]
    assert not _same_state(a["model"], _weights(char_diffusion_models["generator"]))  # it did train
    rows_a = {r["step"]: r for r in read_jsonl_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r}
    rows_b = {r["step"]: r for r in read_jsonl_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r}
    assert [rows_a[s][k] for s in (3, 4) for k in METRICS] == [rows_b[s][k] for s in (3, 4) for k in METRICS]


def test_pretrain_resume_is_bit_identical_with_dropout(char_diffusion_models, tmp_path):
    def cfg(out: str, iters: int) -> PretrainConfig:
        return PretrainConfig(dataset=char_diffusion_models["data"], out_dir=str(tmp_path / out), n_layer=1, n_head=2,
                              n_embd=16, dropout=0.2, batch_size=4, max_iters=iters, lr_decay_iters=4, warmup_iters=1,
                              eval_interval=100, eval_iters=1, save_interval=2)  # fmt: skip

    pretrain(cfg("a", 4))
    pretrain(cfg("b", 2))
    pretrain(cfg("b", 4), resume=True)  # dropout draws come from the restored RNG state
    a, b = read_checkpoint(tmp_path / "a" / "ckpt.pt"), read_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert _same_state(a["model"], b["model"]) and _same_state(a["optimizer"], b["optimizer"])


def test_grpo_command_line_metrics_samples_and_checkpoint(char_diffusion_models, tmp_path):
    m, out = char_diffusion_models, tmp_path / "run"
    cmd = [sys.executable, "-m", "alignment.char_diffusion.train_grpo", "--config", str(RECIPE),
           "--group_size=4", "--kl_beta=0.2", "--learning_rate=5e-6",  # the seed's example flags
           "--dataset", m["data"], "--generator_checkpoint", m["generator"], "--judge_checkpoint", m["judge"],
           "--out_dir", str(out), "--max_iters", "3", "--batch_size", "2", "--gradient_accumulation_steps", "1",
           "--warmup_iters", "1", "--eval_interval", "3", "--eval_iters", "1", "--eval_batch_size", "2",
           "--sample_interval", "2", "--save_interval", "2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    assert table[0].split() == ["held-out", "iteration", "judge", "reward", "fill", "accuracy"]
    assert table[1].split()[:2] == ["start", "0"] and table[2].split()[:2] == ["last", "3"]
    assert f"best held-out fill accuracy: {out / 'best' / 'ckpt.pt'}" in proc.stdout
    assert read_checkpoint(out / "best" / "ckpt.pt", "generator")["iteration"] in (0, 3)
    config = json.loads((out / "config.json").read_text())
    assert (config["group_size"], config["kl_beta"], config["learning_rate"]) == (4, 0.2, 5e-6)
    assert (config["temperature"], config["top_p"], config["kl_estimator"]) == (0.8, 0.95, "exact")
    rows = [r for r in read_jsonl_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(set(METRICS) <= set(r) for r in rows)
    assert rows[0]["lr"] == pytest.approx(5e-6 * 0.5)  # warmup: (0 + 1) / (1 + 1)
    evals = [r for r in read_jsonl_metrics(out / "metrics.jsonl") if "eval/mean_reward" in r]
    assert [r["step"] for r in evals] == [0, 3] and all(0 <= r["eval/fill_accuracy"] <= 1 for r in evals)
    assert set(METRICS) <= set(read_tensorboard_scalars(out))
    samples = (out / "samples.log").read_text(encoding="utf-8")
    assert samples.count("iteration ") == 2 and samples.count("\nr=") == 2 * 4 and "masked    " in samples
    assert "\u25af" in samples  # [MASK] shown as a box
    ckpt = read_checkpoint(out / "ckpt.pt", "generator", "policy")
    assert ckpt["iteration"] == 3 and ckpt["config"]["group_size"] == 4
    assert ckpt["optimizer"]["state"] and ckpt["scheduler"]["last_epoch"] == 3 and "torch" in ckpt["rng"]
    assert ckpt["model_args"] == read_checkpoint(m["generator"])["model_args"]


def test_judge_targets_are_the_fraction_the_fills_changed(char_diffusion_models):
    from alignment.char_diffusion.checkpoint import load_model

    gen = load_model(char_diffusion_models["generator"], "generator", "g")[0].eval()
    data = CharData(char_diffusion_models["data"])
    tokens = data.blocks("val", 3, torch.Generator().manual_seed(0))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, ::3] = True
    filled, target = corrupt_with_fills(gen, tokens, tokens.masked_fill(mask, data.vocab.mask_id), mask, 1.0, 1.0,
                                        data.vocab.special_ids, fills=2, rng=torch.Generator().manual_seed(0))  # fmt: skip
    assert filled.shape == (6, tokens.shape[1])
    assert torch.equal(filled[:, ~mask[0]], tokens.repeat_interleave(2, 0)[:, ~mask[0]])
    assert torch.equal(target, (filled != tokens.repeat_interleave(2, 0)).float().mean(1))


def test_bad_inputs_are_errors_naming_the_file(char_diffusion_models, tmp_path, capsys):
    m = char_diffusion_models
    with pytest.raises(UserError, match=f"{m['judge']} is a judge checkpoint, but generator_checkpoint"):
        train_grpo(_grpo_cfg(m, tmp_path / "x", generator_checkpoint=m["judge"]))
    text = Path(m["text"]).read_text(encoding="utf-8")
    other = tmp_path / "other.txt"
    other.write_text(text + "Zebra\n", encoding="utf-8")
    prepare(other, tmp_path / "other", block_size=32)
    with pytest.raises(
        UserError, match=rf"vocabulary mismatch between {m['generator']} .* and .*other/meta\.json"
    ):
        train_grpo(_grpo_cfg(m, tmp_path / "x", dataset=str(tmp_path / "other")))
    prepare(m["text"], tmp_path / "short", block_size=16)
    with pytest.raises(UserError, match=rf"{m['generator']} has block_size 32 but .*short/meta\.json has 16"):
        train_grpo(_grpo_cfg(m, tmp_path / "x", dataset=str(tmp_path / "short")))
    foreign = Vocab.from_text(text + "Q")
    judge = Judge(ModelArgs("judge", foreign.size, 32, 1, 2, 8))
    bad_judge = save_checkpoint(tmp_path / "judge.pt", model=judge, vocab=foreign, iteration=0, config={})
    with pytest.raises(UserError, match=rf"vocabulary mismatch between {bad_judge}"):
        train_grpo(_grpo_cfg(m, tmp_path / "x", judge_checkpoint=str(bad_judge)))
    with pytest.raises(SystemExit) as exit_:
        cli.run(train_main, ["--config", str(tmp_path / "missing.yaml")], prog="train")
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and err.startswith("train: error: config file not found")
        and "Traceback" not in err
    )


def test_resume_refuses_a_checkpoint_with_unexpected_keys(char_diffusion_models, tmp_path):
    cfg = _grpo_cfg(char_diffusion_models, tmp_path / "r", max_iters=1, gradient_accumulation_steps=1)
    train_grpo(cfg)
    path = tmp_path / "r" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["body.extra"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(
        UserError, match=rf"{path}: state dict does not match the model: .*unexpected keys \['body\.extra'\]"
    ):
        train_grpo(_grpo_cfg(char_diffusion_models, tmp_path / "r", max_iters=2), resume=True)


def test_grpo_with_bfloat16_autocast_and_inner_epochs(char_diffusion_models, tmp_path):
    # the GPU recipe's code path (autocast to bfloat16), run here on CPU
    out = train_grpo(_grpo_cfg(char_diffusion_models, tmp_path / "bf16", max_iters=1, dtype="bfloat16",
                               num_inner_epochs=2))  # fmt: skip
    rows = [r for r in read_jsonl_metrics(tmp_path / "bf16" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 1 and all(isinstance(rows[0][k], float) for k in METRICS)
    assert rows[0]["ratio_mean"] != 1.0  # the second update saw the weights the first one changed
    assert out["wrapper"] == "Generator"  # one process: no DDP wrapper


def test_resume_refuses_another_judge(char_diffusion_models, tmp_path):
    m = char_diffusion_models
    train_grpo(_grpo_cfg(m, tmp_path / "r", max_iters=1, gradient_accumulation_steps=1))
    ckpt = read_checkpoint(m["judge"])
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + 1.0
    other = tmp_path / "other-judge.pt"
    torch.save(ckpt, other)
    with pytest.raises(UserError, match=rf"the judge model differs .*judge_checkpoint {other} changed"):
        train_grpo(_grpo_cfg(m, tmp_path / "r", max_iters=2, judge_checkpoint=str(other)), resume=True)
