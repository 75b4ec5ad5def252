"""The three judge heads: what each predicts (exact small cases), how each is trained, and GRPO
scoring fills with each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment.char_diffusion.checkpoint import load_model
from alignment.char_diffusion.config import GRPOConfig, JudgeConfig
from alignment.char_diffusion.data import CharData, Vocab
from alignment.char_diffusion.judge import judge_rewards
from alignment.char_diffusion.model import Judge, ModelArgs
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.char_diffusion.train_judge import build_judge, load_frozen_generator, train_judge
from alignment.config import load_config
from tests.conftest import REPO

VOCAB = Vocab.from_text("abc\n")  # 4 characters + [MASK] [PAD] [CLS]


def _judge(head: str) -> Judge:
    torch.manual_seed(0)
    return Judge(ModelArgs("judge", VOCAB.size, 6, n_layer=1, n_head=2, n_embd=8, judge_head=head)).eval()


def test_cls_and_tokens_fractions_are_the_sigmoids_of_their_logits():
    filled = torch.randint(0, 4, (2, 3, 6))  # 2 blocks, 3 fills each
    cls, tokens = _judge("cls"), _judge("tokens")
    assert torch.equal(cls.corrupted_fraction(filled), torch.sigmoid(cls(filled.view(6, 6))).view(2, 3))
    per_char = torch.sigmoid(tokens(filled.view(6, 6)))
    assert per_char.shape == (6, 6)
    assert torch.equal(tokens.corrupted_fraction(filled), per_char.mean(-1).view(2, 3))


def test_denoise_fraction_counts_each_masked_character_wrong_with_its_complement_probability():
    judge = _judge("denoise")
    inp = torch.tensor([[0, 4, 2, 4, 1, 3]])  # [MASK] (id 4) at positions 1 and 3
    mask = inp == VOCAB.mask_id
    filled = torch.tensor([[[0, 1, 2, 3, 1, 3], [0, 0, 2, 0, 1, 3]]])  # two fills
    with torch.no_grad():
        p = torch.softmax(judge(inp).float(), -1)[0]  # [T, V]
    want = torch.tensor([[(1 - p[1, 1]) + (1 - p[3, 3]), (1 - p[1, 0]) + (1 - p[3, 0])]]) / 6
    assert torch.allclose(judge.corrupted_fraction(filled, inp, mask), want, rtol=1e-6, atol=0)
    assert torch.allclose(judge_rewards(judge, filled, inp, mask), 1 - want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="pass inp and mask"):
        judge.corrupted_fraction(filled)


def test_denoise_judge_started_from_the_generator_is_the_generator(char_diffusion_models):
    data = CharData(char_diffusion_models["data"])
    gen = load_frozen_generator(char_diffusion_models["generator"], data)
    cfg = JudgeConfig(generator_checkpoint=char_diffusion_models["generator"], judge_head="denoise")
    judge = build_judge(cfg, gen, data).eval()
    x = data.blocks("val", 3, torch.Generator().manual_seed(0))
    assert judge.head.weight is judge.body.tok.weight  # tied like the generator's
    assert torch.equal(judge(x), gen(x))  # the same weights and operations: equal by construction


@pytest.mark.parametrize("head", ["cls", "tokens", "denoise"])
def test_each_head_trains_reloads_and_scores_grpo_fills(char_diffusion_models, tmp_path, head):
    m = char_diffusion_models
    cfg = load_config(JudgeConfig, REPO / "alignment/char_diffusion/judge.yaml", {
        "dataset": m["data"], "generator_checkpoint": m["generator"], "out_dir": str(tmp_path / "judge"),
        "judge_head": head, "batch_size": 4, "fills_per_block": 2, "max_iters": 3, "warmup_iters": 1,
        "eval_interval": 3, "eval_iters": 1, "save_interval": 3, "log_interval": 1})  # fmt: skip
    out = train_judge(cfg)
    assert {"loss", "mae", "corr", "pair_agreement"} <= set(out["eval"])
    judge, _, ckpt = load_model(Path(out["checkpoint"]), "judge", "judge_checkpoint")
    assert judge.args.judge_head == head and ckpt["iteration"] == 3
    grpo = load_config(GRPOConfig, REPO / "alignment/char_diffusion/grpo.yaml", {
        "dataset": m["data"], "generator_checkpoint": m["generator"], "judge_checkpoint": out["checkpoint"],
        "out_dir": str(tmp_path / "grpo"), "batch_size": 2, "gradient_accumulation_steps": 1, "group_size": 4,
        "max_iters": 1, "warmup_iters": 0, "eval_iters": 1, "eval_batch_size": 2, "sample_interval": 0})  # fmt: skip
    ev = train_grpo(grpo)["evals"][0][1]
    assert 0.0 <= ev["mean_reward"] <= 1.0


def test_old_judge_checkpoints_without_a_head_load_as_cls():
    args = ModelArgs("judge", VOCAB.size, 6, 1, 2, 8).to_dict()
    del args["judge_head"]  # written before the field existed
    assert ModelArgs(**args).judge_head == "cls"
