"""The reward components on hand-computed examples, against sacrebleu and rouge-score themselves."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from alignment.persona.reward import (
    RewardWeights,
    distinct_n,
    exact_match,
    normalize_answer,
    rouge_l,
    score_response,
    sentence_bleu,
    token_f1,
)


def test_squad_normalisation_and_f1_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat sat.", ["a dog", "Cat sat"]) == 1.0
    # "i like the red ball" -> [i, like, red, ball]; "i like blue" -> [i, like, blue]: 2 in common
    assert token_f1("i like the red ball", ["i like blue"]) == pytest.approx(
        2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)
    )
    assert token_f1("i like red", ["nothing here", "i like red !"]) == 1.0  # best gold answer
    assert token_f1("", ["a b"]) == 0.0


def test_rouge_l_by_hand_and_against_rouge_score():
    # LCS of "the cat sat on mat" and "the cat lay on the mat" is "the cat on mat" = 4 tokens
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat sat on mat", ["the cat lay on the mat"]) == pytest.approx(2 * p * r / (p + r))
    ref = rouge_scorer.RougeScorer(["rougeL"]).score("a b c d", "a c x")["rougeL"].fmeasure
    assert rouge_l("a c x", ["a b c d"]) == pytest.approx(ref)
    assert rouge_l("", ["a b"]) == 0.0


def test_bleu_is_sacrebleus_effective_order_sentence_bleu_over_100():
    hyp, refs = "the cat sat on the mat", ["the cat sat on a mat", "a cat is on the mat"]
    assert sentence_bleu(hyp, refs) == pytest.approx(
        BLEU(effective_order=True).sentence_score(hyp, refs).score / 100
    )
    # by hand: one word, matching, same length: only the unigram order exists (effective order), p1 = 1
    assert sentence_bleu("cat", ["cat"]) == pytest.approx(1.0)
    assert sentence_bleu("cat dog", ["bird fish"]) == 0.0
    assert sentence_bleu("i like red .", ["i like red ."]) == 1.0  # clamped from 100.00000000000004


def test_weighted_reward_components_and_weights():
    s = score_response("i like red .", ["i like blue ."], RewardWeights(f1=2.0, rouge=0.5, bleu=0.0))
    assert s.f1 == pytest.approx(2 / 3) and s.rouge_l == pytest.approx(2 / 3)
    assert s.reward == pytest.approx(2.0 * s.f1 + 0.5 * s.rouge_l)
    for c in (s.f1, s.rouge_l, s.bleu):
        assert 0 <= c <= 1
    with pytest.raises(ValueError, match="must be >= 0"):
        RewardWeights(f1=-1)
    with pytest.raises(ValueError, match="finite"):
        RewardWeights(bleu=math.nan)
    with pytest.raises(ValueError, match="at least one"):
        RewardWeights(0, 0, 0)


def test_distinct_n():
    texts = ["a b a", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)  # {a, b} of 5 unigrams
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # {ab, ba} of ab, ba, ab
    assert distinct_n(["a"], 2) == 0.0
