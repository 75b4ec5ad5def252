"""Alpaca recovery on a tiny LLaMA: a base without a pad token (fp16 safetensors), a "true" Alpaca
(base + mean [PAD] row + random deltas) and the diff between them in sharded .bin files with the
zero rotary buffers the 2023 checkpoints carried, so the recovered weights and sum are known."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from alignment.alpaca.checkpoint_io import resolve_model_dir
from alignment.alpaca.recover import (
    CheckpointMismatchError,
    IntegrityError,
    RecoverConfig,
    load_output_tokenizer,
    parse_args,
    plan_recovery,
    recover,
)
from alignment.cli import UserError

REPO = Path(__file__).resolve().parents[1]
LAYERS, HEAD_DIM = 2, 8
CORPUS = ["List three technologies that make life easier.", "The quick brown fox jumps over the dog."]


def _tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with LLaMA's special ids and, like LLaMA's, no pad token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """``state`` as ``pytorch_model-0000i-of-0000N.bin`` + index, the published diff's layout."""
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _write_diff(folder: Path, diff: dict[str, torch.Tensor], config: LlamaConfig, tokenizer) -> Path:
    folder.mkdir(parents=True)
    _write_bin_shards(diff, folder)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("alpaca")
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(config).half()  # LLaMA-7B conversions are usually fp16
    base_model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = {k: v.float() for k, v in load_file(root / "base" / "model.safetensors").items()}

    padded = dict(base)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        padded[key] = torch.cat([base[key], base[key].mean(dim=0, keepdim=True)])
    alpaca = {k: v + 0.01 * torch.randn_like(v) for k, v in padded.items()}
    diff = {k: alpaca[k] - padded[k] for k in alpaca}
    for layer in range(LAYERS):  # stored as zeros by 2023 checkpoints; absent from current bases
        diff[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.zeros(HEAD_DIM // 2)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM))
    true_sum = sum(float(v.double().sum()) for v in alpaca.values()) + LAYERS * float(inv_freq.sum())

    alpaca_tokenizer = _tokenizer()
    alpaca_tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    diff_config = LlamaConfig.from_dict({**config.to_dict(), "vocab_size": vocab + 1})
    _write_diff(root / "diff", diff, diff_config, alpaca_tokenizer)
    return {
        "root": root,
        "base": root / "base",
        "diff": root / "diff",
        "diff_state": diff,
        "diff_config": diff_config,
        "tokenizer": alpaca_tokenizer,
        "alpaca": alpaca,
        "vocab": vocab,
        "true_sum": true_sum,
    }


def _cfg(tiny: dict, output: Path, **kw) -> RecoverConfig:
    defaults = dict(expected_sum=tiny["true_sum"], test_generation=False, max_shard_mb=0.01)
    return RecoverConfig(
        base=str(tiny["base"]), diff=str(tiny["diff"]), output=str(output), **{**defaults, **kw}
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def recovered(tiny: dict) -> tuple[Path, object]:
    output = tiny["root"] / "out" / "alpaca"
    result = recover(_cfg(tiny, output, test_generation=True, max_new_tokens=4))
    return output, result


def test_recovered_tensors_equal_true_alpaca(tiny: dict, recovered) -> None:
    output, result = recovered
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the small shard limit split the output
    assert sorted(index["weight_map"]) == sorted(tiny["alpaca"])  # rotary buffers are not written
    state = {}
    for shard in result.shards:
        state.update(load_file(output / shard))
    for key, expected in tiny["alpaca"].items():
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6, msg=key)
    assert result.param_sum == pytest.approx(tiny["true_sum"], abs=1e-4)
    assert result.num_tensors == len(tiny["diff_state"])
    assert _leftovers(output.parent) == []


def test_output_loads_and_generates(tiny: dict, recovered) -> None:
    output, result = recovered
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == tiny["vocab"] + 1 and config["pad_token_id"] == tiny["vocab"]
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == tiny["vocab"]
    model = AutoModelForCausalLM.from_pretrained(output)
    torch.testing.assert_close(
        model.get_input_embeddings().weight.detach(),
        tiny["alpaca"]["model.embed_tokens.weight"],
        atol=1e-6,
        rtol=0,
    )
    assert isinstance(result.test_answer, str)
    ids = tokenizer(["Hello"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


def test_wrong_sum_fails_and_leaves_nothing(tiny: dict, tmp_path: Path) -> None:
    wrong = tiny["true_sum"] + 0.5
    with pytest.raises(IntegrityError) as err:
        recover(_cfg(tiny, tmp_path / "alpaca", expected_sum=wrong))
    assert f"{tiny['true_sum']:.4f}" in str(err.value) and f"{wrong:.4f}" in str(err.value)
    assert "--skip-integrity-check" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_skip_integrity_check_warns_and_saves_bf16(tiny: dict, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="alignment.alpaca.recover")
    cfg = _cfg(
        tiny,
        tmp_path / "alpaca",
        expected_sum=1.0,
        check_integrity=False,
        dtype="bfloat16",
        tokenizer_source="base",
    )
    result = recover(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("integrity check skipped" in m and f"{tiny['true_sum']:.4f}" in m for m in warnings), warnings
    state = load_file(tmp_path / "alpaca" / result.shards[0])
    key = next(iter(state))
    assert state[key].dtype == torch.bfloat16
    torch.testing.assert_close(state[key], tiny["alpaca"][key].to(torch.bfloat16), atol=0, rtol=0)
    # the base tokenizer gained [PAD] at the new row
    assert AutoTokenizer.from_pretrained(tmp_path / "alpaca").pad_token_id == tiny["vocab"]


@pytest.mark.parametrize("problem", ["key", "shape"])
def test_mismatched_diff_fails_naming_it(tiny: dict, tmp_path: Path, problem: str) -> None:
    diff = dict(tiny["diff_state"])
    if problem == "key":
        diff["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
        del diff["model.norm.weight"]
        expected = ["model.layers.0.mlp.extra.weight", "model.norm.weight"]
    else:
        diff["model.layers.1.mlp.up_proj.weight"] = torch.zeros(33, 16)
        expected = ["model.layers.1.mlp.up_proj.weight", "(32, 16)", "(33, 16)"]
    folder = _write_diff(tmp_path / "diff", diff, tiny["diff_config"], tiny["tokenizer"])
    cfg = RecoverConfig(base=str(tiny["base"]), diff=str(folder), output=str(tmp_path / "out" / "alpaca"))
    with pytest.raises(CheckpointMismatchError) as err:
        recover(cfg)
    assert all(text in str(err.value) for text in expected), str(err.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_plan_checks_embedding_rows_against_tokenizer() -> None:
    base = {"model.embed_tokens.weight": (10, 4), "lm_head.weight": (10, 4), "model.norm.weight": (4,)}
    diff = {"model.embed_tokens.weight": (11, 4), "lm_head.weight": (11, 4), "model.norm.weight": (4,)}
    plan = plan_recovery(base, diff, vocab_rows=11)
    assert dict(plan.grow) == {"model.embed_tokens.weight": 1, "lm_head.weight": 1}
    assert plan.add == ("model.norm.weight",)
    with pytest.raises(CheckpointMismatchError, match=r"lm_head.weight: base \(10, 4\), diff \(11, 4\)"):
        plan_recovery(base, diff, vocab_rows=12)


def test_existing_output_needs_force(tiny: dict, tmp_path: Path) -> None:
    output = tmp_path / "alpaca"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        recover(_cfg(tiny, output))
    assert (output / "keep.txt").read_text() == "old"
    recover(_cfg(tiny, output, force=True))
    assert not (output / "keep.txt").exists() and (output / "model.safetensors.index.json").is_file()
    assert _leftovers(tmp_path) == []


def test_inputs_resolve_or_fail_clearly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match=r"no such model folder: .*missing \(--base\)"):
        resolve_model_dir(str(tmp_path / "missing"), "--base")
    # offline and not cached: one line naming the model, the flag and the switch that is off
    with pytest.raises(UserError, match=r"'not-a-cached-model/alpaca-none' \(--diff\).*HF_HUB_OFFLINE=1"):
        resolve_model_dir("not-a-cached-model/alpaca-none", "--diff")
    with pytest.raises(SystemExit):
        parse_args(["--base", "b", "--dtype", "int8"])


def test_unreadable_tokenizer_fails_with_a_hint(tiny: dict, tmp_path: Path) -> None:
    # a 2023-style folder: tokenizer.model only, which needs the sentencepiece package (or is corrupt)
    tiny["diff_config"].save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05not a sentencepiece model")
    with pytest.raises(RuntimeError, match=r"tokenizer from .*sentencepiece.*--tokenizer"):
        load_output_tokenizer("diff", tiny["base"], tmp_path)


def test_script_recovers_under_plain_bash(tiny: dict, tmp_path: Path) -> None:
    output = tmp_path / "alpaca"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": sys.executable,
        "BASE_MODEL_PATH": str(tiny["base"]),
        "WDIFF_PATH": str(tiny["diff"]),
        "OUTPUT_DIR": str(output),
        "EXPECTED_SUM": repr(tiny["true_sum"]),
        "EXTRA_ARGS": "--max-new-tokens 2",
    }
    env.pop("SLURM_SUBMIT_DIR", None)
    proc = subprocess.run(
        [shutil.which("bash") or "bash", "alignment/alpaca/recover_alpaca_full.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "integrity check passed" in proc.stderr and "test answer:" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["output_dir"] == str(output) and summary["vocab_size"] == tiny["vocab"] + 1
    assert (output / "model.safetensors.index.json").is_file()
