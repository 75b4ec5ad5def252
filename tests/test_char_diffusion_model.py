"""The generator and judge (bidirectional RoPE transformer, [CLS] kept at full length) and strict,
atomic, self-describing checkpoints."""

from __future__ import annotations

import pytest
import torch

from alignment.char_diffusion.checkpoint import (
    load_model,
    load_strict,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,  # fmt: skip
)
from alignment.char_diffusion.data import Vocab
from alignment.char_diffusion.model import Generator, Judge, ModelArgs, apply_rope, rope_tables
from alignment.cli import UserError

VOCAB = Vocab.from_text("abc\n")  # 4 characters + [MASK] [PAD] [CLS]


def tiny(kind: str = "generator", block_size: int = 8) -> Generator | Judge:
    torch.manual_seed(0)
    args = ModelArgs(kind, VOCAB.size, block_size, n_layer=2, n_head=2, n_embd=16)
    return Generator(args) if kind == "generator" else Judge(args)


def test_generator_gives_logits_at_every_position_and_sees_both_sides():
    gen = tiny().eval()
    x = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    logits = gen(x)
    assert logits.shape == (1, 8, VOCAB.size)
    y = x.clone()
    y[0, 7] = 0  # change the LAST character: the FIRST position's prediction must change (not causal)
    assert not torch.allclose(gen(y)[0, 0], logits[0, 0])
    with pytest.raises(ValueError, match="block_size 8"):
        gen(torch.zeros(1, 9, dtype=torch.long))


def test_rope_rotation_makes_attention_scores_depend_on_relative_position_only():
    cos, sin = rope_tables(8, 16, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rope(q.expand(1, 1, 16, 8), cos, sin)[0, 0, i]
        kj = apply_rope(k.expand(1, 1, 16, 8), cos, sin)[0, 0, j]
        return qi @ kj

    assert torch.allclose(score(3, 1), score(12, 10), atol=1e-5)  # same offset, same score
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_judge_keeps_cls_at_full_block_length():
    judge = tiny("judge").eval()
    seen = []
    judge.body.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0].clone()))
    x = torch.randint(0, 4, (3, 8))  # a full block: block_size characters
    out = judge(x)
    assert out.shape == (3,)
    (body_input,) = seen
    assert body_input.shape == (3, 9)  # [CLS] + 8 characters: nothing was cut
    assert (body_input[:, 0] == VOCAB.cls_id).all() and torch.equal(body_input[:, 1:], x)
    assert torch.equal(judge.layout(x), body_input)
    with pytest.raises(ValueError, match="block_size 8"):
        judge(torch.zeros(1, 9, dtype=torch.long))


def test_judge_score_is_read_at_cls():
    judge = tiny("judge").eval()
    x = torch.randint(0, 4, (2, 8))
    hidden = judge.body(judge.layout(x))
    assert torch.allclose(judge(x), judge.head(hidden[:, 0]).squeeze(-1))


def test_checkpoint_roundtrip_is_exact_and_atomic(tmp_path):
    gen = tiny()
    path = save_checkpoint(tmp_path / "ckpt.pt", model=gen, vocab=VOCAB, iteration=7, config={"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind
    loaded, vocab, ckpt = load_model(path, "generator", "generator_checkpoint")
    assert vocab == VOCAB and ckpt["iteration"] == 7 and ckpt["kind"] == "generator"
    assert all(
        torch.equal(a, b)
        for a, b in zip(gen.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert loaded.lm_head.weight is loaded.body.tok.weight  # still tied after loading


def test_missing_or_unexpected_keys_are_errors_naming_the_file(tmp_path):
    gen = tiny()
    path = save_checkpoint(tmp_path / "ckpt.pt", model=gen, vocab=VOCAB, iteration=0, config={})
    ckpt = read_checkpoint(path)
    state = dict(ckpt["model"])
    del state["body.norm.weight"]
    with pytest.raises(UserError, match=r"ckpt\.pt.*missing keys \['body\.norm\.weight'\]"):
        model_from_checkpoint({**ckpt, "model": state}, path)
    state = {**ckpt["model"], "extra.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"unexpected keys \['extra\.weight'\]"):
        load_strict(tiny(), state, path)
    state = {**ckpt["model"], "body.norm.weight": torch.zeros(3)}
    with pytest.raises(UserError, match="shape mismatches"):
        load_strict(tiny(), state, path)


def test_judge_checkpoint_given_as_generator_is_an_error(tmp_path):
    path = save_checkpoint(tmp_path / "judge.pt", model=tiny("judge"), vocab=VOCAB, iteration=0, config={})
    with pytest.raises(
        UserError, match=rf"{path} is a judge checkpoint, but generator_checkpoint must be a generator"
    ):
        load_model(path, "generator", "generator_checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt.*not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="judge_checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt", "judge", "judge_checkpoint")
