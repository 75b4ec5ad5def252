"""A small synthetic language whose structure a tiny judge can learn (tests, demo, benchmark).

Each line is a short clause ``DET [ADJ] NOUN VERB`` with number agreement (a singular subject takes
``a``/``the`` and a verb ending in ``s``; a plural one ``the``/``some`` and the bare verb), padded
with spaces to ``WIDTH`` characters, then ``|`` and the same clause again, then a newline::

    a red fox sees |a red fox sees \\n
    some mice hear |some mice hear \\n

Every line is ``LINE_LENGTH`` = 32 characters, so a block of 32 starting at a line start is one
line. A wrong fill shows three ways: a misspelt word, broken agreement (``some cat``, ``the dogs
sees``), or two halves that disagree; so a fill that looks right almost always is the original,
and a judge that learns the structure rewards the right characters (no gap for it to be gamed).
"""

from __future__ import annotations

import random
from pathlib import Path

NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("mouse", "mice"))
VERBS = (("sees", "see"), ("likes", "like"), ("finds", "find"), ("hears", "hear"))
ADJECTIVES = ("big", "red", "shy")
SINGULAR_DETS = ("a", "the")
PLURAL_DETS = ("the", "some")
WIDTH = 15
LINE_LENGTH = 2 * WIDTH + 2


def clause(rng: random.Random) -> str:
    """One grammatical clause of at most ``WIDTH`` characters."""
    while True:
        plural = rng.random() < 0.5
        words = [rng.choice(PLURAL_DETS if plural else SINGULAR_DETS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words += [rng.choice(NOUNS)[plural], rng.choice(VERBS)[plural]]
        text = " ".join(words)
        if len(text) <= WIDTH:
            return text


def line(rng: random.Random) -> str:
    """``clause|clause`` padded to ``LINE_LENGTH`` characters, newline included."""
    c = clause(rng).ljust(WIDTH)
    return f"{c}|{c}\n"


def synthetic_text(num_lines: int = 3000, seed: int = 0) -> str:
    """``num_lines`` lines from a seeded generator (same seed, same text)."""
    rng = random.Random(seed)
    return "".join(line(rng) for _ in range(num_lines))


def write_synthetic_text(path: str | Path, num_lines: int = 3000, seed: int = 0) -> Path:
    """Write :func:`synthetic_text` to ``path`` (UTF-8) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(synthetic_text(num_lines, seed), encoding="utf-8")
    return path
