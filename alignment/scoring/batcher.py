"""Scoring texts with the reward and cost model: one tokenisation for both, then forward passes of
rows of similar length, bounded by a token budget.

A text is never tokenised beyond what the model reads: :class:`PrefixTokenizer` tokenises a prefix
of it (cut by characters, with a margin), with ``truncation=True``, and only takes more of the text
when that prefix turns out too short. Tokenising 200,000-character texts in full used to take
most of a big request's time and several GB of memory for ids that were then thrown away.

Padding is what makes batching slow: a 20-token answer padded to the 2,000 tokens of its batch
neighbour costs a hundred times its own work. :func:`plan_forwards` therefore sorts rows by length
and cuts them into forward passes whose padded size (rows × longest row) stays within
``max_batch_tokens`` and whose padding stays within ``max_padding`` of it, instead of cutting every
``max_batch_size`` rows.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from alignment.conversation import scoring_texts
from alignment.scoring.score_model import ScoreModel

logger = logging.getLogger(__name__)

PAD_SLACK = 16  # padding tokens per row that are always acceptable (a separate pass costs more)
GPU_BATCH_TOKENS = 16384
# On CPU a pass is cheapest per row at about a thousand tokens (measured on 1 thread: 16 rows of
# 32 tokens, 4 of 256, 1 of 512 or more); bigger passes fall out of the caches and get slower.
CPU_BATCH_TOKENS = 1024
# A cut prefix must still yield this many tokens past what is kept: cutting a text can change how
# its last few characters are tokenised (a word cut in two), never its first tokens.
ENCODE_MARGIN = 16
FIRST_CHARS_PER_TOKEN = 4.0  # the first guess for a tokenizer, before it has been seen at work


def default_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per forward pass unless told otherwise: 16384 on a GPU, 1024 on CPU."""
    return GPU_BATCH_TOKENS if torch.device(device).type == "cuda" else CPU_BATCH_TOKENS


@dataclass
class Encoded:
    """One text, tokenised for both models. ``cost_ids`` is ``ids`` when the tokenizers agree.

    Ids are held as ``array("i")`` (4 bytes a token, where a list of ints takes about 36): a request
    of 4,096 texts of 512 tokens waits in the queue as 8 MB, not 75 MB.
    """

    ids: Sequence[int]
    cost_ids: Sequence[int]
    truncated: bool

    @property
    def length(self) -> int:
        return max(len(self.ids), len(self.cost_ids))


@dataclass
class ScoredBatch:
    """Scores of a list of texts, in input order; ``truncated`` lists the indices that were cut."""

    rewards: list[float]
    costs: list[float]
    truncated: list[int]


@dataclass
class BatchStats:
    """What scoring one step did (for /metrics)."""

    forward_batch_sizes: list[int] = field(default_factory=list)
    forward_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0


class TextEncodingError(ValueError):
    """Text ``index`` of a request cannot be tokenised (the sender's input, answered 422)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"item {index} cannot be tokenised: {reason}")
        self.index, self.reason = index, reason


def plan_forwards(
    lengths: Sequence[int], max_rows: int, max_tokens: int, max_padding: float = 0.25
) -> list[list[int]]:
    """Group row indices into forward passes of rows of similar length.

    Rows are taken shortest first; a row joins the current pass while the pass keeps at most
    ``max_rows`` rows, at most ``max_tokens`` padded tokens (rows × longest), and at most
    ``max(max_padding × padded tokens, PAD_SLACK × rows)`` padding tokens. A row longer than the
    budget gets a pass of its own. Returns index lists covering every row exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    passes: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        width = lengths[i]  # sorted: the newest row is the longest
        rows = len(current) + 1
        padded = rows * width
        fits = (
            rows <= max_rows
            and padded <= max_tokens
            and padded - (real + width) <= max(max_padding * padded, PAD_SLACK * rows)
        )
        if current and not fits:
            passes.append(current)
            current, real = [], 0
        current.append(i)
        real += width
    if current:
        passes.append(current)
    return passes


class PrefixTokenizer:
    """The first ``limit`` token ids of each text, from tokenising as little of the text as possible.

    Each text is cut to about ``limit`` tokens' worth of characters (at a characters-per-token rate
    learnt from the texts seen, plus a quarter) and tokenised with ``truncation=True``. A prefix
    that yields fewer than ``limit`` tokens was cut too short (a normaliser that drops characters,
    tokens of many characters): it grows, at least twofold, and is tokenised again, up to the whole
    text. A normal text is thus tokenised once, about ``limit`` tokens of it; the worst text costs
    at most about twice its own length, as tokenising it whole did.

    The ids are those of the whole text cut to ``limit`` wherever cutting a text changes only the
    tokens of its last few characters (a cut splits at most the word it falls in): the caller keeps
    ``ENCODE_MARGIN`` tokens fewer than ``limit``. Tested against whole-text tokenisation for
    byte-level BPE, SentencePiece-style BPE with byte fallback and WordPiece with a normaliser
    that drops characters (tests/test_scorer_scheduling.py).

    Thread-safe: every thread gets its own copy of the tokenizer (a fast tokenizer's call sets
    truncation state on the Rust object it shares, and two calls at once then fail with
    "Already borrowed").
    """

    def __init__(self, tokenizer, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.tokenizer, self.limit = tokenizer, limit
        self.chars_per_token = FIRST_CHARS_PER_TOKEN  # a guess for speed only; results never depend on it
        self._local = threading.local()

    def _own_tokenizer(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def _first_cut(self, length: int) -> int:
        return min(length, math.ceil(self.limit * self.chars_per_token * 1.25) + 8)

    def _learn(self, chars: int, tokens: int) -> None:
        if chars >= 64 and tokens > 1:  # only whole pieces tell the rate; tiny ones are mostly specials
            self.chars_per_token = 0.75 * self.chars_per_token + 0.25 * (chars / tokens)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids (special tokens added as the tokenizer adds them), at most ``limit`` per text."""
        tok = self._own_tokenizer()
        out: list[list[int]] = [[] for _ in texts]
        cuts = [self._first_cut(len(t)) for t in texts]
        pending = list(range(len(texts)))
        while pending:
            pieces = [texts[i][: cuts[i]] for i in pending]  # a text shorter than its cut is not copied
            rows = tok(pieces, add_special_tokens=True, truncation=True, max_length=self.limit)["input_ids"]
            retry = []
            for i, piece, row in zip(pending, pieces, rows, strict=True):
                if len(row) < self.limit:
                    self._learn(len(piece), len(row))
                if len(row) >= self.limit or cuts[i] >= len(texts[i]):
                    out[i] = row
                    continue
                # too short a cut: grow it to the tokens still missing at the rate this piece showed
                wanted = math.ceil(cuts[i] * self.limit / max(len(row), 1) * 1.25)
                cuts[i] = min(len(texts[i]), max(2 * cuts[i], wanted))
                retry.append(i)
            pending = retry
        return out


def _as_tensor(row: Sequence[int]) -> torch.Tensor:
    if isinstance(row, array) and row.itemsize == 4 and len(row):
        return torch.frombuffer(row, dtype=torch.int32)  # no copy
    return torch.tensor(list(row), dtype=torch.long)


def _same_tokenizer(a: ScoreModel, b: ScoreModel) -> bool:
    ta, tb = a.tokenizer, b.tokenizer
    if ta is tb:
        return True
    return (
        ta.eos_token_id == tb.eos_token_id
        and ta.bos_token_id == tb.bos_token_id
        and len(ta) == len(tb)
        and ta.get_vocab() == tb.get_vocab()
    )


class RewardCostScorer:
    """Scores texts with a reward and a cost model, sharing one tokenisation when they can.

    A text longer than ``max_length`` tokens keeps its first ``max_length - 1`` tokens and gets the
    EOS token back at the end, so the score is still read at an end-of-answer token, and the same
    text is always cut the same way. ``max_batch_size`` rows and ``max_batch_tokens`` padded tokens
    (default :func:`default_batch_tokens` of the reward model's device) bound one forward pass (see
    :func:`plan_forwards`).
    """

    def __init__(
        self,
        reward: ScoreModel,
        cost: ScoreModel,
        max_length: int = 512,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
        max_padding: float = 0.25,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_batch_tokens is None:
            max_batch_tokens = default_batch_tokens(reward.device)
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
        self.reward, self.cost = reward, cost
        self.max_length, self.max_batch_size = max_length, max_batch_size
        self.max_batch_tokens, self.max_padding = max_batch_tokens, max_padding
        self.shared_tokenizer = _same_tokenizer(reward, cost)
        if not self.shared_tokenizer:
            logger.warning("reward and cost tokenizers differ: texts are tokenised once per model")
        # ENCODE_MARGIN tokens past what can be kept (max_length - 1 plus EOS): see PrefixTokenizer
        self._prefix = {
            id(m): PrefixTokenizer(m.tokenizer, max_length + ENCODE_MARGIN) for m in (reward, cost)
        }

    @property
    def eos_token(self) -> str:
        return self.reward.tokenizer.eos_token

    def encode(self, model: ScoreModel, texts: Sequence[str]) -> tuple[list[array], list[int]]:
        """Token ids (BOS as the tokenizer adds it, EOS appended once) and the indices cut short.

        The same as tokenising each text whole and keeping its first ``max_length - 1`` tokens plus
        EOS, without tokenising more of a text than that needs (:class:`PrefixTokenizer`).
        """
        eos = model.tokenizer.eos_token_id
        ids = self._prefix[id(model)](texts)
        out, truncated = [], []
        for i, row in enumerate(ids):
            if not row or row[-1] != eos:
                row.append(eos)
            if len(row) > self.max_length:
                row = row[: self.max_length - 1]
                row.append(eos)
                truncated.append(i)
            out.append(array("i", row))
        return out, truncated

    def _encode_named(self, model: ScoreModel, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        try:
            return self.encode(model, texts)
        except Exception:  # find the text at fault; the others are fine
            for i, text in enumerate(texts):
                try:
                    self.encode(model, [text])
                except Exception as exc:
                    raise TextEncodingError(i, f"{type(exc).__name__}: {exc}") from exc
            raise

    def encode_texts(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenise for both models; :class:`TextEncodingError` names the first text that fails."""
        ids, truncated = self._encode_named(self.reward, texts)
        cost_ids = ids if self.shared_tokenizer else self._encode_named(self.cost, texts)[0]
        cut = set(truncated)
        return [Encoded(r, c, i in cut) for i, (r, c) in enumerate(zip(ids, cost_ids, strict=True))]

    def _forward(
        self, model: ScoreModel, rows: list[Sequence[int]], passes: list[list[int]], stats: BatchStats
    ) -> list[float]:
        """One right-padded forward pass per group of row indices; scores in row order."""
        pad = model.tokenizer.pad_token_id
        pad = model.tokenizer.eos_token_id if pad is None else pad
        scores = [0.0] * len(rows)
        for group in passes:
            width = max(len(rows[i]) for i in group)
            input_ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, i in enumerate(group):
                input_ids[r, : len(rows[i])] = _as_tensor(rows[i])
                mask[r, : len(rows[i])] = 1
            real = sum(len(rows[i]) for i in group)
            t0 = time.perf_counter()
            values = model.end_scores(input_ids, mask).tolist()
            stats.forward_seconds += time.perf_counter() - t0
            stats.forward_batch_sizes.append(len(group))
            stats.real_tokens += real
            stats.padded_tokens += len(group) * width - real
            for r, i in enumerate(group):
                scores[i] = values[r]
        return scores

    def score_encoded(
        self, items: Sequence[Encoded], stats: BatchStats | None = None
    ) -> list[tuple[float, float]]:
        """(reward, cost) of each encoded text, in order; both models see the same passes."""
        stats = stats if stats is not None else BatchStats()
        if not items:
            return []
        passes = plan_forwards(
            [it.length for it in items], self.max_batch_size, self.max_batch_tokens, self.max_padding
        )
        rewards = self._forward(self.reward, [it.ids for it in items], passes, stats)
        costs = self._forward(self.cost, [it.cost_ids for it in items], passes, stats)
        return list(zip(rewards, costs, strict=True))

    def score_texts(self, texts: Sequence[str], stats: BatchStats | None = None) -> ScoredBatch:
        """Score already-templated texts; EOS is appended when a text does not end with it."""
        items = self.encode_texts(texts)
        scores = self.score_encoded(items, stats)
        truncated = [i for i, it in enumerate(items) if it.truncated]
        return ScoredBatch([r for r, _ in scores], [c for _, c in scores], truncated)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> ScoredBatch:
        """Score (prompt, response) pairs in the conversation template."""
        return self.score_texts(scoring_texts(prompts, responses, self.eos_token))
