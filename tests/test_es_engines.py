"""The transformers engine: templated generation with stop markers, in-place perturbation, repair."""

from __future__ import annotations

import pytest
import torch

from alignment.conversation import prompt_text
from alignment.es.engines import GenerationSettings, TransformersEngine
from alignment.toy import TOY_EVAL_PROMPTS

GREEDY = GenerationSettings(max_new_tokens=16)


@pytest.fixture(scope="module")
def engine(toy_models):
    return TransformersEngine(str(toy_models / "policy"))


def test_greedy_generation_is_deterministic(engine):
    prompts = TOY_EVAL_PROMPTS[:6]
    together = engine.generate(prompts, GREEDY)
    assert engine.generate(prompts, GREEDY) == together  # same inputs and shapes: same bits
    assert all(isinstance(t, str) for t in together) and any(together)


def test_left_padding_leaves_each_prompt_unchanged(engine):
    """A prompt's next-token logits in a left-padded batch are its logits alone, to 1e-5: another
    batch shape blocks the matmuls differently, so only the last bits may differ (answers compared
    across batch shapes could flip at a near-tie, so they are not compared)."""
    tok, model = engine.tokenizer, engine.model
    texts = [prompt_text(p) for p in TOY_EVAL_PROMPTS[:6]]
    enc = tok(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # some rows are padded

    def last_logits(batch):
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(**batch, position_ids=positions).logits[:, -1]

    together = last_logits(enc)
    for i, text in enumerate(texts):
        alone = last_logits(tok([text], return_tensors="pt"))[0]
        assert torch.allclose(together[i], alone, atol=1e-5, rtol=0), i


def test_generation_stops_at_turn_markers(engine):
    sampled = engine.generate(TOY_EVAL_PROMPTS * 2, GenerationSettings(max_new_tokens=48, temperature=1.0))
    assert not any(marker in text for text in sampled for marker in GREEDY.stop)


def test_sampling_is_seeded(engine):
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, seed=5)
    assert engine.generate(TOY_EVAL_PROMPTS[:4], settings) == engine.generate(TOY_EVAL_PROMPTS[:4], settings)


def test_perturbation_changes_answers_and_restore_brings_them_back(engine):
    before_text = engine.generate(TOY_EVAL_PROMPTS, GREEDY)
    before_sum = engine.checksum()
    engine.perturb(seed=3, sigma=0.2)
    assert engine.checksum() == before_sum  # the checksum is of the kept, unperturbed weights
    assert engine.generate(TOY_EVAL_PROMPTS, GREEDY) != before_text
    engine.restore()
    assert engine.generate(TOY_EVAL_PROMPTS, GREEDY) == before_text


def test_state_dict_repairs_a_diverged_engine(toy_models, engine):
    other = TransformersEngine(str(toy_models / "policy"))
    other.apply_update([1, 2], [1.0, -1.0], scale=0.01)
    assert other.checksum() != engine.checksum()
    other.load_state_dict(engine.state_dict())
    assert other.checksum() == engine.checksum()
    assert all(
        torch.equal(a, b) for a, b in zip(other.model.parameters(), engine.model.parameters(), strict=True)
    )
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({})
