import pytest

from alignment.data import load_prompts


def test_load_prompts_reads_the_column_and_limits(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "x": 1}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')
    assert load_prompts(path) == ["a", "b", "c"]
    assert load_prompts(path, limit=2) == ["a", "b"]
    assert load_prompts(None, default=["d"]) == ["d"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"question": "a"}\n', ":1 has no string field 'prompt'"),
        ("not json\n", ":1: not JSON"),
        ("[1, 2]\n", ":1: expected a JSON object, got list"),
        ("", "no prompts"),
    ],
)
def test_bad_prompt_files_are_named(tmp_path, text, fragment):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        load_prompts(path)


def test_torn_last_line_is_dropped_only_when_asked_and_only_at_the_end(tmp_path):
    from alignment.data import iter_jsonl

    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b"')  # a crash while appending the third row
    assert [(n, r["a"]) for n, r in iter_jsonl(path, drop_torn_tail=True)] == [(1, 1), (3, 2)]
    with pytest.raises(ValueError, match=r"log\.jsonl:4: not JSON"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')  # a bad line in the middle is corruption, not a crash
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not JSON"):
        list(iter_jsonl(path, drop_torn_tail=True))


def test_repair_jsonl_tail_before_appending(tmp_path):
    from alignment.data import repair_jsonl_tail

    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')  # whole row, newline lost: kept
    repair_jsonl_tail(path)
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": ')  # cut mid-row: removed
    repair_jsonl_tail(path)
    assert path.read_text() == '{"a": 1}\n'
    repair_jsonl_tail(tmp_path / "absent.jsonl")  # nothing to repair
    assert not (tmp_path / "absent.jsonl").exists()
