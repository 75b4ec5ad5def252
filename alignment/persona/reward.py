"""The reward ``f1rougebleudist``: text overlap of a response with the gold answers, in [0, Σw].

    reward = w_f1 · F1 + w_rouge · ROUGE-L + w_bleu · BLEU

* F1: token F1 after SQuAD normalisation (lower case, punctuation and articles removed), the best
  over the gold answers.
* ROUGE-L: the F-measure of ``rouge-score``'s ``rougeL`` (its own tokeniser, no stemming), the best
  over the gold answers.
* BLEU: ``sacrebleu``'s sentence BLEU with effective order, all gold answers as references,
  divided by 100.

Each component is in [0, 1]; REINFORCE and GRPO optimise this same number, and the retriever's
distillation ("dist") uses it per passage. A library error is never turned into a score: it
propagates. Also the evaluation's EM and distinct-n.

``compat="lapdog"`` (``--reward_compat lapdog``) computes F1 and ROUGE-L as LAPDOG's code does,
so that numbers compare with its papers' and logs: F1 on whitespace tokens *without* any
normalisation (case and punctuation count), ROUGE-L the ``rouge-l`` F of the ``rouge`` package
(sentences split at ".", case-sensitive; 0 when the response is empty, as LAPDOG's wrapper
returns). BLEU stays ours: LAPDOG divides each row's BLEU by the L2 norm of the batch's BLEU
scores, so a row's reward depends on the other rows of its batch (and is NaN when all are 0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from alignment.cli import UserError
from alignment.config import finite_number

RewardCompat = Literal["ours", "lapdog"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the best over ``answers``."""
    return max(_f1(prediction, a) for a in answers)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score), the best over ``answers``."""
    scorer = _rouge_scorer()
    return float(max(scorer.score(a, prediction)["rougeL"].fmeasure for a in answers))


@lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def sentence_bleu(prediction: str, answers: Sequence[str]) -> float:
    """sacrebleu sentence BLEU with effective order against all ``answers``, in [0, 1]."""
    score = _bleu().sentence_score(prediction, list(answers)).score / 100.0
    return min(score, 1.0)  # a perfect match comes back as 100.00000000000004 (exp of a log sum)


def lapdog_f1(prediction: str, answers: Sequence[str]) -> float:
    """LAPDOG's reward F1: token F1 on ``str.split()`` tokens with no normalisation, best over ``answers``."""
    best = 0.0
    for answer in answers:
        pred, gold = prediction.split(), answer.split()
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            precision, recall = same / len(pred), same / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@lru_cache(maxsize=1)
def _rouge_package():
    try:
        from rouge import Rouge
    except ImportError:
        raise UserError(
            "reward_compat lapdog needs the rouge package: pip install 'alignment[lapdog]'"
        ) from None
    return Rouge()


_EMPTY = ("Hypothesis is empty.", "Reference is empty.")  # the rouge package's words for "no tokens"


def lapdog_rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """LAPDOG's ROUGE-L: the ``rouge`` package's ``rouge-l`` F, best over ``answers``; 0 for a
    response with no tokens (empty, or only "." which the package splits away)."""
    answers = [a for a in answers if a]
    if not prediction or not answers:
        return 0.0
    best = 0.0
    for answer in answers:
        try:
            score = _rouge_package().get_scores(prediction, answer, avg=True)["rouge-l"]["f"]
        except ValueError as exc:
            if str(exc) not in _EMPTY:  # anything else is a real failure: it propagates
                raise
            score = 0.0
        best = max(best, float(score))
    return best


@dataclass(frozen=True)
class RewardWeights:
    """The reward's weights, and whose definitions of F1 and ROUGE-L it uses (``compat``)."""

    f1: float = 1.0
    rouge: float = 1.0
    bleu: float = 1.0
    compat: RewardCompat = "ours"

    def __post_init__(self) -> None:
        if self.compat not in ("ours", "lapdog"):
            raise ValueError(f"reward compat must be 'ours' or 'lapdog', got {self.compat!r}")
        for name in ("f1", "rouge", "bleu"):
            if finite_number(getattr(self, name), f"reward weight {name}") < 0:
                raise ValueError(f"reward weight {name} must be >= 0, got {getattr(self, name)}")
        if self.f1 + self.rouge + self.bleu == 0:
            raise ValueError("at least one reward weight must be > 0")


@dataclass(frozen=True)
class RewardScore:
    f1: float
    rouge_l: float
    bleu: float
    reward: float  # the weighted sum


def score_response(prediction: str, answers: Sequence[str], weights: RewardWeights) -> RewardScore:
    """Every component of the reward of ``prediction`` against the gold ``answers``."""
    if not answers:
        raise ValueError("a reward needs at least one gold answer")
    if weights.compat == "lapdog":
        f1, rl = lapdog_f1(prediction, answers), lapdog_rouge_l(prediction, answers)
    else:
        f1, rl = token_f1(prediction, answers), rouge_l(prediction, answers)
    bleu = sentence_bleu(prediction, answers)
    return RewardScore(f1, rl, bleu, weights.f1 * f1 + weights.rouge * rl + weights.bleu * bleu)


def score_batch(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], weights: RewardWeights
) -> list[RewardScore]:
    """:func:`score_response` for each (prediction, its gold answers) pair."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    return [score_response(p, a, weights) for p, a in zip(predictions, answers, strict=True)]


def mean_components(scores: Sequence[RewardScore]) -> dict[str, float]:
    """Means of each component: {"reward", "f1", "rouge_l", "bleu"}."""
    n = max(len(scores), 1)
    return {
        "reward": sum(s.reward for s in scores) / n,
        "f1": sum(s.f1 for s in scores) / n,
        "rouge_l": sum(s.rouge_l for s in scores) / n,
        "bleu": sum(s.bleu for s in scores) / n,
    }


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams over ``texts`` (whitespace
    tokens, lower case); 0.0 when there are no n-grams."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.lower().split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0
