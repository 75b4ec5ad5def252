"""LAPDOG's data files: rows parse into persona/context, malformed rows fail naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.persona.data import (
    load_examples,
    load_passages,
    reader_query,
    retrieval_query,
    split_question,
)

REPO = Path(__file__).resolve().parents[1]
CONVAI2 = REPO.parent / "shared" / "reference" / "convai2" / "valid.jsonl"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_split_question_and_queries(tmp_path):
    q = "persona: i love cats. i am tall. context:  Q: hi ! R: hello . Q: pets ?"
    assert split_question(q) == ("i love cats. i am tall.", "Q: hi ! R: hello . Q: pets ?")
    assert split_question("persona for R: a b dialog: Q: x") == ("a b", "Q: x")
    (ex,) = load_examples(_write(tmp_path / "d.jsonl", [{"question": q, "answers": ["yes"], "extra": 1}]))
    assert retrieval_query(ex, "persona") == "i love cats. i am tall."
    assert retrieval_query(ex, "context") == "Q: hi ! R: hello . Q: pets ?"
    assert retrieval_query(ex, "all") == q
    assert reader_query(ex, "dialog with R's persona: {question} R: <extra_id_0>").endswith(
        "pets ? R: <extra_id_0>"
    )
    assert ex.source.endswith("d.jsonl:1")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"question": "persona: a context: b"', "not JSON"),
        ({"answers": ["x"]}, "field 'question'"),
        ({"question": "persona: a context: b", "answers": "x"}, "field 'answers'"),
        ({"question": "persona: a context: b", "answers": []}, "field 'answers'"),
        ({"question": "persona: a context: b", "answers": ["ok", 3]}, "field 'answers'"),
        ({"question": "hello there", "answers": ["x"]}, "no 'persona:' part"),
        ({"question": "context: b persona: a", "answers": ["x"]}, "no 'context:' part"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    good = {"question": "persona: a context: Q: b", "answers": ["c"]}
    path = _write(tmp_path / "bad.jsonl", [good, "", row])
    with pytest.raises(ValueError, match=message) as err:
        load_examples(path)
    assert f"{path}:3" in str(err.value)


def test_passages_checked_and_duplicates_named(tmp_path):
    path = _write(
        tmp_path / "p.jsonl", [{"id": 1, "text": "a story"}, {"id": "b", "title": "t", "text": "x"}]
    )
    assert [(p.id, p.title, p.text) for p in load_passages(path)] == [("1", "", "a story"), ("b", "t", "x")]
    for bad, message in [
        ({"id": "1", "text": "again"}, r"duplicate passage id '1' \(first at line 1\)"),
        ({"id": "c"}, "field 'text'"),
        ({"text": "t"}, "field 'id'"),
        ({"id": "c", "text": "t", "title": 5}, "field 'title'"),
    ]:
        path = _write(tmp_path / "p2.jsonl", [{"id": "1", "text": "a"}, bad])
        with pytest.raises(ValueError, match=message) as err:
            load_passages(path)
        assert f"{path}:2" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_examples(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="no dialogue rows"):
        load_examples(_write(tmp_path / "empty.jsonl", []))


@pytest.mark.skipif(not CONVAI2.is_file(), reason=f"reference data not present at {CONVAI2}")
def test_all_real_convai2_rows_parse():
    rows = load_examples(CONVAI2)
    assert len(rows) == 7801
    assert all(r.persona and r.context and len(r.answers) == 1 for r in rows)
    first = rows[0]
    assert first.persona.startswith("i read twenty books a year.") and first.persona.endswith("household.")
    assert first.context == "Q: hello what are doing today ?"
    assert all("context:" not in retrieval_query(r, "persona") for r in rows)
    assert load_examples(CONVAI2, limit=5) == rows[:5]
