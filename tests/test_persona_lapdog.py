"""LAPDOG compatibility: its reward F1 and ROUGE-L against the reference library, its checkpoints as
--model_path, and the <extra_id_0> target prefix its models were trained with."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from alignment.cli import UserError
from alignment.persona import checkpoint as ckpt
from alignment.persona import models
from alignment.persona import reward as reward_mod
from alignment.persona.reader import FiDReader, banned_ids, response_mask, tokenize_fid
from alignment.persona.reward import RewardWeights, lapdog_f1, lapdog_rouge_l, score_response
from alignment.persona.sampler import response_logprobs, sample_responses, sampled_logits
from tests.test_persona_reader import ENCODER_FORMAT, PASSAGES, QUERIES
from tests.test_persona_train import toy_cfg

ROWS = [  # (response, gold answers)
    ("I like Teal.", ["i like teal ."]),
    ("i have two dogs . they are great", ["i have a dog .", "dogs are great . i have two"]),
    ("my favorite color is blue", ["blue is my favorite color"]),
    ("no overlap at all", ["something else entirely ."]),
]


def test_ours_normalises_and_lapdogs_does_not_by_hand():
    ours = score_response("I like Teal.", ["i like teal ."], RewardWeights())
    lapdog = score_response("I like Teal.", ["i like teal ."], RewardWeights(compat="lapdog"))
    assert (ours.f1, ours.rouge_l) == (1.0, 1.0)
    # whitespace tokens as they are: {I, like, Teal.} vs {i, like, teal, .}: only "like" is shared
    assert lapdog.f1 == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))  # 0.286
    assert lapdog.bleu == ours.bleu  # BLEU is ours in both


def test_lapdog_f1_and_rouge_l_against_the_rouge_package():
    rouge = pytest.importorskip("rouge", reason="the [lapdog] extra (rouge package) is not installed")
    scorer = rouge.Rouge()
    # the rouge package splits sentences at "." and is case-sensitive: "I like Teal" vs "i like teal"
    # share one word of three: LCS-based F = 1/3 (the package adds 1e-8 to its denominator)
    assert lapdog_rouge_l("I like Teal.", ["i like teal ."]) == pytest.approx(1 / 3, abs=1e-7)
    for response, answers in ROWS:
        expected = max(scorer.get_scores(response, a, avg=True)["rouge-l"]["f"] for a in answers)
        assert lapdog_rouge_l(response, answers) == expected
        by_hand = []
        for a in answers:  # LAPDOG's src/evaluation.py f1 with its default identity normalisation
            common = sum(min(response.split().count(w), a.split().count(w)) for w in set(response.split()))
            p, r = common / len(response.split()), common / len(a.split())
            by_hand.append(0.0 if common == 0 else 2 * p * r / (p + r))
        assert lapdog_f1(response, answers) == pytest.approx(max(by_hand))
    # no tokens: LAPDOG's wrapper returns 0 (the package raises "Hypothesis is empty.")
    assert lapdog_rouge_l("", ["a b"]) == 0.0 and lapdog_rouge_l(" . ", ["a b"]) == 0.0
    assert lapdog_rouge_l(".", ["a b"]) == 0.0


def test_lapdog_compat_without_the_rouge_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge", None)
    reward_mod._rouge_package.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install 'alignment\[lapdog\]'"):
            lapdog_rouge_l("a b", ["a b"])
    finally:
        reward_mod._rouge_package.cache_clear()


@pytest.fixture(scope="module")
def toy_reader(persona_toy):
    torch.manual_seed(0)
    model = FiDReader.from_pretrained(persona_toy / "reader").eval()
    with torch.no_grad():  # spread the probability so that sampling has something to choose
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(persona_toy / "reader")
    model.decoder_prefix = models.prefix_ids(tok, "<extra_id_0>")
    return model, tok


def test_prefix_is_given_to_the_decoder_and_never_predicted(toy_reader):
    model, tok = toy_reader
    x0 = tok.convert_tokens_to_ids("<extra_id_0>")
    assert model.decoder_prefix == [x0]
    ids, mask = tokenize_fid(tok, QUERIES, PASSAGES, ENCODER_FORMAT, 64)
    targets = tok(["i like red .", "hello"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids, mask, targets)
        enc = model.encode(ids, mask)
        start = torch.tensor([[0, x0]] * 2)
        manual = model.t5(encoder_outputs=(enc.hidden,), attention_mask=enc.mask,
                          decoder_input_ids=torch.cat([start, targets[:, :-1]], 1)).logits  # fmt: skip
    assert logits.shape == (*targets.shape, len(tok))
    assert torch.equal(logits, manual[:, 1:])  # the same forward: the logits of the target positions
    ban = banned_ids(tok)
    out = model.greedy(ids, mask, 6, ban)
    keep = response_mask(out, tok.eos_token_id)
    with torch.no_grad():
        tf = model(ids, mask, out)
    tf[..., ban] = float("-inf")
    assert torch.equal(tf.argmax(-1)[keep], out[keep])  # greedy after the prefix, prefix not returned
    samples = sample_responses(
        model, model.encode(ids, mask), 3, 6, 1.0, 1.0, ban, torch.Generator().manual_seed(0)
    )
    assert not torch.isin(samples.tokens[samples.mask], torch.tensor(ban)).any()
    with torch.no_grad():
        logp = response_logprobs(sampled_logits(model(ids, mask, samples.tokens, repeats=3), samples, 1.0, 1.0, ban),
                                 samples)  # fmt: skip
    # cached incremental decoding vs one teacher-forced pass: float noise only
    torch.testing.assert_close(logp, samples.logprobs, rtol=1e-5, atol=1e-5)


def test_no_prefix_is_t5s_shift_right(persona_toy):
    model = FiDReader.from_pretrained(persona_toy / "reader").eval()
    tok = AutoTokenizer.from_pretrained(persona_toy / "reader")
    ids, mask = tokenize_fid(tok, QUERIES, PASSAGES, ENCODER_FORMAT, 64)
    targets = tok(["i like red .", "hello"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        enc = model.encode(ids, mask)
        plain = model.t5(encoder_outputs=(enc.hidden,), attention_mask=enc.mask,
                         decoder_input_ids=model.t5._shift_right(targets)).logits  # fmt: skip
        assert torch.equal(model(ids, mask, targets), plain)


def lapdog_checkpoint(persona_toy: Path, folder: Path, ddp: bool = False) -> tuple[Path, dict, dict]:
    """What LAPDOG's save_lapdog_model writes, from perturbed toy models: checkpoint/step-N/model.pth.tar
    holding the Lapdog module's state dict (reader.*, retriever.contriever.* without BERT's pooler) and
    its options as an argparse.Namespace."""
    torch.manual_seed(1)
    t5 = FiDReader.from_pretrained(persona_toy / "reader").t5
    bert = BertModel.from_pretrained(persona_toy / "retriever")
    with torch.no_grad():
        for p in [*t5.parameters(), *bert.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    r, q = ("reader.module.", "retriever.module.contriever.") if ddp else ("reader.", "retriever.contriever.")
    state = {f"{r}{k}": v for k, v in t5.state_dict().items()}
    state |= {f"{q}{k}": v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    step = folder / "checkpoint" / "step-10"
    step.mkdir(parents=True)
    opt = argparse.Namespace(name="lapdog", reader_model_type="google/t5-base-lm-adapt", n_context=1)
    torch.save({"step": 10, "model": state, "optimizer": None, "retr_optimizer": None, "scheduler": {},
                "retr_scheduler": None, "opt": opt}, step / "model.pth.tar")  # fmt: skip
    (folder / "checkpoint" / "latest").symlink_to("step-10")
    return step, t5.state_dict(), bert.state_dict()


@pytest.mark.parametrize("ddp", [False, True])
def test_lapdog_checkpoint_loads_into_the_base_architectures(persona_toy, tmp_path, ddp):
    step, t5_state, bert_state = lapdog_checkpoint(persona_toy, tmp_path, ddp)
    assert ckpt.resolve_checkpoint(tmp_path) == step.resolve()
    reader, tok = models.load_reader(step, str(persona_toy / "reader"))
    assert all(torch.equal(v, t5_state[k]) for k, v in reader.t5.state_dict().items())
    retriever, _ = models.load_retriever(step, str(persona_toy / "retriever"))
    loaded = retriever.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in bert_state.items() if not k.startswith("pooler."))
    assert models.resolve_target_prefix("auto", step) == "<extra_id_0>"
    assert models.resolve_target_prefix("", step) == "" and models.resolve_target_prefix("auto", None) == ""
    with pytest.raises(UserError, match="pass the T5 it was trained from"):
        models.load_reader(step, None)


def test_untied_lapdog_retriever_is_refused(persona_toy, tmp_path):
    step = tmp_path / "step-1"
    step.mkdir()
    torch.save({"model": {"reader.shared.weight": torch.zeros(2, 2), "retriever.query_contriever.x": torch.zeros(1)},
                "opt": argparse.Namespace()}, step / "model.pth.tar")  # fmt: skip
    with pytest.raises(UserError, match="untied"):
        models.load_retriever(step, str(persona_toy / "retriever"))


def test_rl_from_a_lapdog_checkpoint_samples_after_its_prefix(persona_toy, tmp_path):
    from alignment.persona.trainer import train

    step, _, _ = lapdog_checkpoint(persona_toy, tmp_path / "lapdog")
    cfg = toy_cfg(persona_toy, tmp_path, "grpo", model_path=str(tmp_path / "lapdog"), reader_rl_learning=True,
                  use_grpo=True, per_gpu_batch_size=2, total_steps=1, reward_compat="lapdog")  # fmt: skip
    out = train(cfg)
    state = ckpt.load_state(out["checkpoint"])
    assert state["target_prefix"] == "<extra_id_0>" and state["reference"]["source"] == str(step.resolve())
    assert out["eval"][0]["eval/kl_to_reference"] == 0.0  # the reference reads the same prefix
    # a run from that checkpoint keeps the prefix it was trained with
    sft = train(toy_cfg(persona_toy, tmp_path, "sft", model_path=out["checkpoint"], total_steps=1))
    assert ckpt.load_state(sft["checkpoint"])["target_prefix"] == "<extra_id_0>"
    none = train(
        toy_cfg(persona_toy, tmp_path, "none", model_path=out["checkpoint"], total_steps=1, target_prefix="")
    )
    assert ckpt.load_state(none["checkpoint"])["target_prefix"] == ""
