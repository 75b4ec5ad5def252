"""A small synthetic language whose structure a tiny judge can learn (tests, demo, benchmark).

Each line is one sentence ``DET [ADJ] NOUN VERB DET [ADJ] NOUN.`` with number agreement: a singular
subject takes ``a``/``the`` and a verb ending in ``s``, a plural one ``the``/``some`` and the bare
verb; objects agree with their own determiner. A wrong fill therefore shows locally (a misspelt word)
or across words (``some cat``, ``the dogs sees``), which is what the judge is trained to notice.
"""

from __future__ import annotations

import random
from pathlib import Path

NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("mouse", "mice"))
VERBS = (("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"), ("hears", "hear"))
ADJECTIVES = ("big", "small", "red", "old", "quick")
SINGULAR_DETS = ("a", "the")
PLURAL_DETS = ("the", "some")


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    plural = rng.random() < 0.5
    det = rng.choice(PLURAL_DETS if plural else SINGULAR_DETS)
    noun = rng.choice(NOUNS)[1 if plural else 0]
    words = [det, rng.choice(ADJECTIVES), noun] if rng.random() < 0.5 else [det, noun]
    return " ".join(words), plural


def sentence(rng: random.Random) -> str:
    """One grammatical line (without its newline)."""
    subject, plural = _noun_phrase(rng)
    obj, _ = _noun_phrase(rng)
    verb = rng.choice(VERBS)[1 if plural else 0]
    return f"{subject} {verb} {obj}."


def synthetic_text(num_lines: int = 4000, seed: int = 0) -> str:
    """``num_lines`` sentences, one per line, from a seeded generator (same seed, same text)."""
    rng = random.Random(seed)
    return "".join(sentence(rng) + "\n" for _ in range(num_lines))


def write_synthetic_text(path: str | Path, num_lines: int = 4000, seed: int = 0) -> Path:
    """Write :func:`synthetic_text` to ``path`` (UTF-8) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(synthetic_text(num_lines, seed), encoding="utf-8")
    return path
