"""What TRL trains on: the completion mask of the real GRPOTrainer's generation step on the toy setup."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, StopStringCriteria

from alignment.conversation import STOP_MARKERS
from alignment.grpo.config import load_grpo_config
from alignment.grpo.stopping import cut_at_stop
from alignment.grpo.train_grpo_alignment import build_trainer, grpo_args
from tests.conftest import REPO

TOY_RECIPE = REPO / "alignment" / "grpo" / "grpo_toy.yaml"


def _has_marker(text: str) -> bool:
    return any(m in text for m in STOP_MARKERS)


def test_completion_mask_covers_exactly_the_answer_up_to_the_stop(toy_models, scorer, tmp_path):
    tok = AutoTokenizer.from_pretrained(toy_models / "policy")
    user, colon = (tok(s, add_special_tokens=False).input_ids for s in (" USER", ":"))
    # The toy policy rarely writes the next turn itself (Alpaca does so in most answers): a generation
    # bias (a real `generate` option) makes some rows stop at " USER:" while others end with EOS.
    bias = [[user, 9.0], [user + colon, 20.0]]  # about half the rows stop early
    cfg = load_grpo_config(TOY_RECIPE, {
        "model_name": str(toy_models / "policy"), "scorer_url": scorer.url, "output_dir": str(tmp_path),
        "per_device_train_batch_size": 32, "eval_every": 0, "scorer_retries": 1,
        "generation_kwargs": {"sequence_bias": bias},
    })  # fmt: skip
    trainer = build_trainer(cfg).trainer
    torch.manual_seed(0)
    batch = next(iter(trainer.get_train_dataloader()))
    out = trainer._generate_and_score_completions(batch)  # TRL's own generation, scoring and masking
    ids, mask = out["completion_ids"].tolist(), out["completion_mask"].tolist()

    kinds: Counter[str] = Counter()
    for row, m in zip(ids, mask, strict=True):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)  # one run of answer tokens from the start
        kept = row[:n]
        assert tok.pad_token_id not in kept, tok.decode(row)
        text = tok.decode(kept)
        if kept[-1] == tok.eos_token_id:
            kinds["eos"] += 1
            assert not _has_marker(text)  # a marker would have ended the row earlier
        elif n == cfg.max_completion_length:
            kinds["length"] += 1
        else:  # ended by a turn marker: its last token is the last one trained on
            kinds["stop"] += 1
            assert _has_marker(text) and not _has_marker(tok.decode(kept[:-1])), text
    assert kinds["stop"] >= 2 and kinds["eos"] >= 2, kinds  # both endings were exercised
    # DAPO's normaliser counts exactly the masked tokens
    assert int(out["num_items_in_batch"]) == sum(map(sum, mask))


def test_recipe_generation_kwargs_keep_the_turn_marker_stop(toy_models, tmp_path):
    cfg = load_grpo_config(TOY_RECIPE, {"model_name": str(toy_models / "policy"), "output_dir": str(tmp_path),
                                        "generation_kwargs": {"repetition_penalty": 1.1}})  # fmt: skip
    assert grpo_args(cfg).generation_kwargs == {"stop_strings": list(STOP_MARKERS), "repetition_penalty": 1.1}
    with pytest.raises(ValueError, match="mask_truncated_completions"):
        grpo_args(load_grpo_config(TOY_RECIPE, {"mask_truncated_completions": True}))


@pytest.mark.parametrize("fill", ["pad", "eos"])  # eos: a tokenizer without <pad> (TRL then pads with EOS)
def test_cut_at_stop_keeps_the_sampled_tokens_only(toy_models, fill):
    tok = AutoTokenizer.from_pretrained(toy_models / "policy")
    fill_id = tok.pad_token_id if fill == "pad" else tok.eos_token_id
    criteria = StopStringCriteria(tok, list(STOP_MARKERS))
    prompt = tok("BEGINNING OF CONVERSATION: USER: hi ASSISTANT:", add_special_tokens=False).input_ids
    answer = tok(" sure, first check USER:", add_special_tokens=False).input_ids
    plain = tok(" sure.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    rows = [answer + [fill_id] * 3, plain, answer]
    assert cut_at_stop([prompt] * 3, rows, criteria, fill_id) == [answer, plain, answer]
    with pytest.raises(RuntimeError, match="continues after a stop string"):
        cut_at_stop([prompt], [answer + plain], criteria, fill_id)
