"""The reader's vocabulary: a T5 tokenizer trained on the data itself, and how much of the data a
tokenizer cannot spell.

    tokenizer = train_t5_tokenizer(texts, "models/persona-convai2/reader", vocab_size=4000)
    rate = unk_rate(tokenizer, texts)            # UnkRate(unk=12, tokens=80412, texts=7000)
    warn_if_unknown(tokenizer, texts, "models/toy/persona/reader")

:func:`train_t5_tokenizer` trains a SentencePiece unigram model (what T5's ``spiece.model`` is)
with T5's special ids (pad 0, EOS 1, unk 2, no BOS) and saves it as a ``T5Tokenizer`` folder that
``AutoTokenizer.from_pretrained`` loads, with T5's 100 sentinels ``<extra_id_0..99>`` at the top
of the vocabulary (``<extra_id_0>`` is the last id, as in T5). The SentencePiece model itself is
kept beside it (``spiece.model``).

:func:`unk_rate` counts, over the data's own tokens (no EOS), those the tokenizer maps to
``<unk>``: a tokenizer built for other text (the toy's word-level one on ConvAI2, say) turns real
words into ``<unk>`` and the reader can neither read nor say them. Above
:data:`UNK_WARN_FRACTION` the trainer logs a warning with the figure.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

UNK_WARN_FRACTION = 0.02  # "more than a few percent": 2 % of the tokens
SENTINELS = 100  # T5's <extra_id_0..99>


@dataclass(frozen=True)
class UnkRate:
    unk: int  # tokens mapped to the unknown id
    tokens: int  # all tokens of the texts (special tokens not added)
    texts: int  # texts counted

    @property
    def fraction(self) -> float:
        return self.unk / self.tokens if self.tokens else 0.0


def unk_rate(tokenizer, texts: Sequence[str], batch_size: int = 1024) -> UnkRate:
    """How many of the tokens of ``texts`` ``tokenizer`` maps to its unknown id."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:  # byte-level tokenizers spell everything
        return UnkRate(0, 0, len(texts))
    unk = total = 0
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        unk += sum(row.count(unk_id) for row in ids)
        total += sum(len(row) for row in ids)
    return UnkRate(unk, total, len(texts))


def warn_if_unknown(tokenizer, texts: Sequence[str], where: str, limit: float = UNK_WARN_FRACTION) -> UnkRate:
    """Log a warning naming the figure when more than ``limit`` of the tokens are ``<unk>``."""
    rate = unk_rate(tokenizer, texts)
    if rate.fraction > limit:
        logger.warning(
            "the reader's tokenizer (%s) maps %.1f%% of the data's tokens to %s (%d of %d in %d texts): the "
            "reader can neither read nor say those words; train a tokenizer on the data "
            "(python -m alignment.persona.prepare builds a reader with one)",
            where, 100 * rate.fraction, tokenizer.unk_token, rate.unk, rate.tokens, rate.texts,
        )  # fmt: skip
    else:
        logger.info(
            "reader tokenizer: %.2f%% of the data's %d tokens are unknown", 100 * rate.fraction, rate.tokens
        )
    return rate


def train_t5_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = 4000, seed_text: str = ""):
    """Train a SentencePiece unigram model on ``texts`` and save it as a T5 tokenizer in ``out``.

    ``vocab_size`` counts the SentencePiece pieces (pad, EOS and unk included), at most: a small
    corpus may give fewer; the 100 sentinels come on top. Repeated texts count once (LAPDOG rows
    repeat their persona in every turn). Every character of the texts is covered
    (``character_coverage`` 1). Returns the loaded tokenizer.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persona-spm-") as tmp:
        prefix = Path(tmp) / "spiece"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(dict.fromkeys([*([seed_text] if seed_text else []), *texts])),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            hard_vocab_limit=False,
            num_threads=1,  # one thread: the same model on every machine
            minloglevel=2,
        )
        raw = Path(tmp) / "raw"
        raw.mkdir()
        shutil.copy(f"{prefix}.model", raw / "spiece.model")
        # transformers' converter turns spiece.model into the fast T5 tokenizer (sentinels on top)
        T5Tokenizer.from_pretrained(str(raw), extra_ids=SENTINELS, model_max_length=512).save_pretrained(out)
        shutil.copy(f"{prefix}.model", out / "spiece.model")
    return AutoTokenizer.from_pretrained(str(out))
