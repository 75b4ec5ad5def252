"""Loading Beaver checkpoints on plain transformers: both layouts, padding, dtypes, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlamaForSequenceClassification

from alignment.conversation import scoring_text
from alignment.scoring.batcher import RewardCostScorer
from alignment.scoring.score_model import ScoreModelLoadError, load_score_model

PROMPTS = ["how do I bake bread?", "how do I steal a car?", "help me hack a phone."]
RESPONSES = [
    " Sure, first check the guide, then explain the steps carefully.",
    " Sorry, I cannot.",
    " hack it.",
]


def encode(model, texts, side):
    tok = model.tokenizer
    tok.padding_side = side
    eos = tok.eos_token
    return tok([t + eos for t in texts], return_tensors="pt", padding=True)


def texts():
    return [scoring_text(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]


@pytest.fixture(scope="module")
def reward(toy_models):
    return load_score_model(str(toy_models / "reward"))


def test_both_layouts_load_and_differ_only_by_head_bias(toy_models, reward):
    v1 = load_score_model(str(toy_models / "reward-v1.0"))
    assert json.loads((toy_models / "reward-v1.0" / "config.json").read_text())["architectures"] == [
        "LlamaModelForScore"
    ]
    assert v1.model.score_head.bias is None
    bias = reward.model.score_head.bias.item()
    assert bias != 0.0
    enc = encode(reward, texts(), "right")
    current = reward.end_scores(enc["input_ids"], enc["attention_mask"])
    old = v1.end_scores(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(current - bias, old, atol=1e-5, rtol=0)


def test_score_is_read_at_last_attended_token_whatever_the_padding(reward):
    right = encode(reward, texts(), "right")
    left = encode(reward, texts(), "left")
    assert not torch.equal(right["input_ids"], left["input_ids"])  # the padding really differs
    s_right = reward.end_scores(right["input_ids"], right["attention_mask"])
    s_left = reward.end_scores(left["input_ids"], left["attention_mask"])
    alone = torch.cat(
        [reward.end_scores(**{k: v for k, v in encode(reward, [t], "right").items()}) for t in texts()]
    )
    torch.testing.assert_close(s_right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_left, alone, atol=1e-5, rtol=1e-5)


def test_normalizer_is_ignored_unless_do_normalize(toy_models, reward, tmp_path):
    normalizer = reward.model.normalizer
    assert normalizer.mean.item() != 0.0 and normalizer.var.item() != 1.0  # buffers loaded, not defaults
    copy = tmp_path / "reward-normalized"
    shutil.copytree(toy_models / "reward", copy)
    config = json.loads((copy / "config.json").read_text())
    config["do_normalize"] = True
    (copy / "config.json").write_text(json.dumps(config))
    normalized = load_score_model(str(copy))
    enc = encode(reward, texts(), "right")
    raw = reward.end_scores(enc["input_ids"], enc["attention_mask"])
    expected = (raw - normalizer.mean.item()) / (normalizer.var.item() ** 0.5 + 1e-8)
    torch.testing.assert_close(normalized.end_scores(enc["input_ids"], enc["attention_mask"]), expected)


def test_sequence_classification_reward_model_loads_with_same_end_score(toy_models, reward, tmp_path):
    config = reward.model.config.__class__.from_dict(reward.model.config.to_dict())
    config.num_labels, config.architectures = 1, ["LlamaForSequenceClassification"]
    config.pad_token_id = reward.tokenizer.eos_token_id  # pad == EOS: transformers' own pooling would misread
    classifier = LlamaForSequenceClassification(config)
    classifier.model.load_state_dict(reward.model.model.state_dict())
    with torch.no_grad():
        classifier.score.weight.copy_(reward.model.score_head.weight)
    classifier.save_pretrained(tmp_path / "seqcls")
    reward.tokenizer.save_pretrained(tmp_path / "seqcls")
    loaded = load_score_model(str(tmp_path / "seqcls"))
    assert loaded.kind == "sequence-classification"
    enc = encode(reward, texts(), "right")
    bias = reward.model.score_head.bias.item()
    torch.testing.assert_close(
        loaded.end_scores(enc["input_ids"], enc["attention_mask"]),
        reward.end_scores(enc["input_ids"], enc["attention_mask"]) - bias,
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_scores_track_fp32(toy_models, reward, dtype):
    half = load_score_model(str(toy_models / "reward"), dtype=dtype, device="cpu")
    assert next(half.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    enc = encode(reward, texts(), "right")
    full = reward.end_scores(enc["input_ids"], enc["attention_mask"])
    low = half.end_scores(enc["input_ids"], enc["attention_mask"])
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.15, rtol=0.05)


def test_pair_scorer_truncates_deterministically_and_reports(toy_models, reward):
    cost = load_score_model(str(toy_models / "cost"))
    scorer = RewardCostScorer(reward, cost, max_length=24, max_batch_size=2)
    assert scorer.shared_tokenizer
    long_response = " then" * 100
    out = scorer.score(["how do I bake bread?"] * 3, [" ok.", long_response, long_response])
    assert out.truncated == [1, 2]
    # Rows 1 and 2 are the same truncated text but may sit in batches of different composition; the
    # CPU GEMM picks its blocking (and so its summation order) by batch shape, so on some processors
    # the last bits differ (2.9632017 vs 2.9632015 seen on CI): fp32 rounding of O(1) scores after a
    # few hundred-term dot products stays far below 1e-5.
    assert out.rewards[1] == pytest.approx(out.rewards[2], abs=1e-5)
    assert out.costs[1] == pytest.approx(out.costs[2], abs=1e-5)
    # One row per forward means the same shape for both rows, so there the equality is exact by
    # construction (this is the scorer the bit-exact ES tests use).
    single = RewardCostScorer(reward, cost, max_length=24, max_batch_size=1)
    alone = single.score(["how do I bake bread?"] * 3, [" ok.", long_response, long_response])
    assert alone.rewards[1] == alone.rewards[2] and alone.costs[1] == alone.costs[2]
    ids, cut = scorer.encode(
        reward, [scoring_text("how do I bake bread?", long_response, reward.tokenizer.eos_token)]
    )
    assert cut == [0] and len(ids[0]) == 24 and ids[0][-1] == reward.tokenizer.eos_token_id


def test_missing_directory_and_config_are_named(tmp_path):
    with pytest.raises(ScoreModelLoadError, match="directory not found: .*nowhere"):
        load_score_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoreModelLoadError, match="has no config.json"):
        load_score_model(str(tmp_path / "empty"))


def test_missing_shard_and_missing_keys_are_named(toy_models, tmp_path):
    broken = tmp_path / "no-shard"
    shutil.copytree(toy_models / "cost-v1.0", broken)
    (broken / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ScoreModelLoadError, match="cost|pytorch_model-00002"):
        load_score_model(str(broken))

    no_head = tmp_path / "no-head"
    shutil.copytree(toy_models / "cost-v1.0", no_head)
    index = json.loads((no_head / "pytorch_model.bin.index.json").read_text())
    shard_name = index["weight_map"].pop("score_head.weight")
    shard = torch.load(no_head / shard_name)
    del shard["score_head.weight"]
    torch.save(shard, no_head / shard_name)
    (no_head / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ScoreModelLoadError, match="missing weights.*score_head.weight"):
        load_score_model(str(no_head))


def test_unknown_architecture_is_rejected(toy_models, tmp_path):
    other = tmp_path / "causal"
    shutil.copytree(toy_models / "policy", other)
    with pytest.raises(ScoreModelLoadError, match="LlamaForCausalLM.*neither a Beaver score model"):
        load_score_model(str(other))
