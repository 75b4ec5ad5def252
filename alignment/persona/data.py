"""LAPDOG's data files: dialogue rows and the passage corpus, checked row by row.

Dialogue rows (``--train_data`` / ``--eval_data``), one JSON object per line::

    {"question": "persona: i love horror movies. ... context: Q: hi ! R: hello . Q: what now ?",
     "answers": ["i am watching a scary film ."]}

``question`` holds the responder's persona after ``persona:`` (or ``persona for R:``) and the
dialogue so far after ``context:`` (or ``dialog:``), each turn starting ``Q:`` or ``R:``;
``answers`` the gold replies (one or more). Passage rows (``--passages``)::

    {"id": "story-17", "title": "halloween", "text": "the family watched a scary film ..."}

Every malformed row is a :class:`DataError` naming ``file:line`` and the field (a user error: one
line from the command line); other fields are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignment.cli import UserError
from alignment.data import iter_jsonl

RetrieverFrom = Literal["all", "persona", "context"]

_PERSONA = re.compile(r"persona(?: for R)?:")
_CONTEXT = re.compile(r"context:|dialog:")


class DataError(UserError, ValueError):
    """A data file or row that cannot be used; the message names the file (and line) and the field."""


@dataclass(frozen=True)
class DialogueExample:
    question: str  # the whole LAPDOG question: "persona: ... context: ..."
    answers: tuple[str, ...]  # gold responses (at least one)
    persona: str  # the text after "persona:", stripped
    context: str  # the text after "context:", stripped
    source: str  # "file:line", for messages


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    title: str = ""


def split_question(question: str) -> tuple[str, str]:
    """(persona, context) of a LAPDOG question; ValueError when a marker is missing or misplaced."""
    persona = _PERSONA.search(question)
    if persona is None:
        raise ValueError("question has no 'persona:' part")
    context = _CONTEXT.search(question, persona.end())
    if context is None:
        raise ValueError("question has no 'context:' part after its persona")
    return question[persona.end() : context.start()].strip(), question[context.end() :].strip()


def _example(row: dict, where: str) -> DialogueExample:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
    answers = row.get("answers")
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise DataError(
            f"{where}: field 'answers' must be a non-empty list of non-empty strings, got {answers!r}"
        )
    try:
        persona, context = split_question(question)
    except ValueError as exc:
        raise DataError(f"{where}: field 'question': {exc}") from None
    return DialogueExample(question, tuple(answers), persona, context, where)


def _rows(path: Path):
    """iter_jsonl's rows, its bad-line errors as :class:`DataError` (they already name file:line)."""
    rows = iter_jsonl(path)
    while True:
        try:
            yield next(rows)
        except StopIteration:
            return
        except ValueError as exc:
            raise DataError(str(exc)) from exc


def load_examples(path: str | Path, limit: int = 0) -> list[DialogueExample]:
    """The dialogue rows of ``path`` (the first ``limit`` when > 0); malformed rows fail naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    examples = []
    for line, row in _rows(path):
        examples.append(_example(row, f"{path}:{line}"))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no dialogue rows")
    return examples


def load_passages(path: str | Path) -> list[Passage]:
    """The passage corpus of ``path``; a bad or duplicate row fails naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such passages file: {path}")
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path):
        where = f"{path}:{line}"
        pid = row.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
            raise DataError(f"{where}: field 'id' must be a non-empty string or integer, got {pid!r}")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string, got {text!r}")
        title = row.get("title", "")
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' must be a string when present, got {title!r}")
        if str(pid) in seen:
            raise DataError(f"{where}: duplicate passage id {pid!r} (first at line {seen[str(pid)]})")
        seen[str(pid)] = line
        passages.append(Passage(str(pid), text, title))
    if not passages:
        raise DataError(f"{path}: no passages")
    return passages


def retrieval_query(example: DialogueExample, retriever_from: RetrieverFrom) -> str:
    """The text the retriever embeds: the whole question, the persona only, or the context only."""
    if retriever_from == "all":
        return example.question
    if retriever_from == "persona":
        return example.persona
    if retriever_from == "context":
        return example.context
    raise ValueError(f"retriever_from must be 'all', 'persona' or 'context', got {retriever_from!r}")


def reader_query(example: DialogueExample, qa_prompt_format: str) -> str:
    """The reader's query text: LAPDOG's ``qa_prompt_format`` filled with the question."""
    return qa_prompt_format.format(question=example.question)


def format_passage(passage: Passage, fmt: str, query: str | None = None) -> str:
    """``fmt`` filled with the passage's ``title`` and ``text`` (and ``query`` for the reader's format)."""
    if query is None:
        return fmt.format(title=passage.title, text=passage.text)
    return fmt.format(query=query, title=passage.title, text=passage.text)
