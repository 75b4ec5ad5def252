"""The balanced PKU-SafeRLHF selection: quotas, disjointness, determinism, files, errors, CLI, notebook."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from alignment import cli
from alignment.cli import UserError
from alignment.data import load_prompts
from alignment.evaluation.select_pku_balanced import (
    BUCKETS,
    SelectionError,
    bucket_quotas,
    compute_stats,
    load_pku,
    main,
    plot_bucket_proportions,
    run_selection,
    select_balanced,
)
from tests.conftest import REPO, SHARED_REFERENCE

PKU_REF = SHARED_REFERENCE / "pku_selection"
NOTEBOOK = REPO / "alignment" / "evaluation" / "select_pku_balanced.ipynb"
HARMS = [
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior", "Endangering Public Health",
    "Copyright Issues", "Violence", "Drugs", "Privacy Violation", "Economic Crime", "Mental Manipulation",
    "Human Trafficking", "Physical Harm", "Sexual Content", "Cybercrime", "Disrupting Public Order",
    "Environmental Damage", "Psychological Harm", "White-Collar Crime", "Animal Abuse",
]  # fmt: skip
# 200 rows in PKU-like proportions: (True, True) 80, (False, False) 92, (False, True) 16, (True, False) 12.
LAYOUT = [(True, True)] * 80 + [(False, False)] * 92 + [(False, True)] * 16 + [(True, False)] * 12
TRAIN_QUOTAS = {"(True, True)": 20, "(False, False)": 23, "(False, True)": 4, "(True, False)": 3}  # of 50
EVAL_QUOTAS = {"(True, True)": 40, "(False, False)": 46, "(False, True)": 8, "(True, False)": 6}  # of 100


def pku_row(k: int, prompt: str, safe: tuple[bool, bool], source: str = "Alpaca-7B") -> dict:
    """One row with the real PKU-SafeRLHF columns; unsafe responses carry one or two harm categories."""
    answers = [f"answer {i} to row {k}" for i in (0, 1)]
    harms = [{c: not safe[i] and j % 7 in (k % 7, (k + i) % 5) for j, c in enumerate(HARMS)} for i in (0, 1)]
    return {
        "prompt": prompt, "response_0": answers[0], "response_1": answers[1], "prompt_source": "Alpaca3-70B",
        "response_0_source": source, "response_1_source": source,
        "is_response_0_safe": safe[0], "is_response_1_safe": safe[1],
        "response_0_harm_category": harms[0], "response_1_harm_category": harms[1],
        "response_0_severity_level": 0 if safe[0] else 2, "response_1_severity_level": 0 if safe[1] else 1,
        "better_response_id": k % 2, "safer_response_id": 0 if safe[0] else 1,
        "response_0_sha256": hashlib.sha256(answers[0].encode()).hexdigest(),
        "response_1_sha256": hashlib.sha256(answers[1].encode()).hexdigest(),
    }  # fmt: skip


def make_rows(layout=LAYOUT, source: str = "Alpaca-7B", same_prompt_bucket=None) -> list[dict]:
    """Rows in ``layout`` order; the last 20 reuse the first 20 prompts (PKU has several rows per prompt)."""
    rows = []
    for k, safe in enumerate(layout):
        prompt = f"{source} question {k if k < len(layout) - 20 else k - (len(layout) - 20)}?"
        rows.append(pku_row(k, "one shared prompt" if safe == same_prompt_bucket else prompt, safe, source))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def pku_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pku.jsonl", make_rows())


def bucket_counts(rows: list[dict]) -> dict[str, int]:
    return compute_stats(rows)["bucket_counts"]


def test_selection_is_stratified_disjoint_and_deterministic(pku_file):
    data = load_pku(pku_file)
    sel = select_balanced(data.rows, 50, 100, seed=42)
    assert bucket_counts(sel.train) == TRAIN_QUOTAS and bucket_counts(sel.eval) == EVAL_QUOTAS
    assert sel.train_stats == compute_stats(sel.train) and sel.train_stats["num_rows"] == 50
    assert list(sel.eval_stats["bucket_counts"]) == list(BUCKETS)  # the published files' order
    assert not {r["prompt"] for r in sel.train} & {r["prompt"] for r in sel.eval}
    assert all(r in data.rows for r in sel.train + sel.eval)  # full-schema rows, unchanged
    assert len({json.dumps(r) for r in sel.train + sel.eval}) == 150
    # seeded order, not grouped by bucket: the first 20 eval rows already span several buckets
    assert len(bucket_counts(sel.eval[:20])) > 1
    again = select_balanced(load_pku(pku_file).rows, 50, 100, seed=42)
    assert (again.train, again.eval) == (sel.train, sel.eval)
    other = select_balanced(data.rows, 50, 100, seed=7)
    assert other.eval != sel.eval and bucket_counts(other.eval) == EVAL_QUOTAS


def test_bucket_quotas_largest_remainder():
    assert bucket_quotas({"(True, True)": 80, "(False, False)": 92, "(False, True)": 16, "(True, False)": 12},
                         7) == {"(True, True)": 3, "(False, False)": 3, "(False, True)": 1, "(True, False)": 0}  # fmt: skip
    # equal remainders: the bigger bucket, then the published order, wins
    assert bucket_quotas({"(True, False)": 1, "(False, True)": 1, "(True, True)": 1}, 2) == {
        "(True, True)": 1, "(False, True)": 1, "(True, False)": 0}  # fmt: skip
    skewed = {"(True, True)": 7, "(False, False)": 190, "(True, False)": 3}
    for size in (1, 13, 99, 200):
        assert sum(bucket_quotas(skewed, size).values()) == size


def test_parquet_and_json_sources_give_the_same_selection(tmp_path, pku_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pku.parquet")
    (tmp_path / "pku.json").write_text(json.dumps(rows))
    from_jsonl = select_balanced(load_pku(pku_file).rows, 10, 20)
    for path in (tmp_path / "pku.parquet", tmp_path / "pku.json"):
        data = load_pku(path)
        assert data.rows == rows and data.total_rows == 200
        assert select_balanced(data.rows, 10, 20).eval == from_jsonl.eval


def test_config_filter_uses_the_response_sources(tmp_path, caplog):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", make_rows() + make_rows(LAYOUT[:60], source="Alpaca2-7B"))
    data = load_pku(mixed, config="alpaca-7b")
    assert len(data.rows) == 200 and data.total_rows == 260
    assert {r["response_0_source"] for r in data.rows} == {"Alpaca-7B"}
    full = select_balanced(data.rows, 5, 5, total_rows=data.total_rows).full_stats
    assert (full["total_rows"], full["alpaca_rows"]) == (260, 200)
    assert full["bucket_counts"] == bucket_counts(make_rows())
    assert "num_rows" not in full
    assert len(load_pku(mixed, config="default").rows) == 260
    assert len(load_pku(mixed, config="alpaca2-7b").rows) == 60
    with pytest.raises(ValueError, match=r"no rows of config 'alpaca3-8b'.*Alpaca2-7B"):
        load_pku(mixed, config="alpaca3-8b")
    bare = [{k: v for k, v in r.items() if not k.endswith("_source")} for r in make_rows()]
    with caplog.at_level("WARNING"):
        assert len(load_pku(write_jsonl(tmp_path / "bare.jsonl", bare)).rows) == 200
    assert "config alpaca-7b not checked" in caplog.text


def test_written_files_follow_the_reference_format_and_load_as_prompts(tmp_path, pku_file):
    sel, paths = run_selection(pku_file, train_size=50, eval_size=100, out_dir=tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["alpaca7b_stats.json", "custom_eval_100.jsonl", "custom_eval_100_stats.json",
                     "custom_train_50.jsonl", "custom_train_50_stats.json"]  # fmt: skip
    written_train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert written_train == sel.train
    for name in ("train", "eval"):
        rows = [json.loads(line) for line in paths[name].read_text().splitlines()]
        assert json.loads(paths[f"{name}_stats"].read_text()) == compute_stats(rows)
    full = json.loads(paths["full_stats"].read_text())
    assert list(full)[:2] == ["total_rows", "alpaca_rows"] and full["total_rows"] == 200
    assert load_prompts(paths["train"]) == [r["prompt"] for r in sel.train]
    assert len(load_prompts(paths["eval"])) == 100


@pytest.mark.skipif(not PKU_REF.is_dir(), reason=f"reference data absent: {PKU_REF}")
@pytest.mark.parametrize("name", ["custom_eval_500", "custom_train_250"])
def test_compute_stats_reproduces_the_published_stats(name):
    rows = load_pku(PKU_REF / f"{name}.jsonl").rows
    assert compute_stats(rows) == json.loads((PKU_REF / f"{name}_stats.json").read_text())


@pytest.mark.skipif(not PKU_REF.is_dir(), reason=f"reference data absent: {PKU_REF}")
def test_quotas_from_the_full_data_match_the_published_selection():
    full = json.loads((PKU_REF / "alpaca7b_stats.json").read_text())
    counts = full["bucket_counts"]
    assert full["bucket_proportions"] == {k: c / full["alpaca_rows"] for k, c in counts.items()}
    for name in ("custom_eval_500", "custom_train_250"):
        published = json.loads((PKU_REF / f"{name}_stats.json").read_text())
        assert bucket_quotas(counts, published["num_rows"]) == published["bucket_counts"]


def test_prompt_disjointness_failure_names_the_bucket(tmp_path):
    rows = make_rows(same_prompt_bucket=(True, False))
    with pytest.raises(SelectionError, match=r"impossible: bucket \(True, False\) needs 3 train.*only 0"):
        select_balanced(rows, 50, 100)
    sel = select_balanced(rows, 50, 100, disjoint_by="row")  # the published selection's rule
    assert "one shared prompt" in {r["prompt"] for r in sel.train} & {r["prompt"] for r in sel.eval}
    assert not {json.dumps(r) for r in sel.train} & {json.dumps(r) for r in sel.eval}


@pytest.mark.parametrize(
    ("rows", "sizes", "kwargs", "error", "match"),
    [
        (make_rows(), (150, 51), {}, SelectionError, r"150 \+ eval_size 51 = 201 exceeds the 200 rows"),
        (make_rows([(True, True)] * 4 + [(False, False)] * 4 + [(False, True), (True, False)]), (5, 5), {},
         SelectionError, r"overlap impossible: bucket \(False, True\) needs 1 train \+ 1 eval = 2 rows.*only 1"),
        (make_rows(), (0, 5), {}, SelectionError, "train_size must be a positive integer, got 0"),
        (make_rows(), (5, True), {}, SelectionError, "eval_size must be a positive integer"),
        (make_rows(), (5, 5), {"disjoint_by": "hash"}, SelectionError, "disjoint_by must be one of"),
        ([], (1, 1), {}, ValueError, "rows: no rows"),
    ],
)  # fmt: skip
def test_impossible_selections_are_refused(rows, sizes, kwargs, error, match):
    with pytest.raises(error, match=match):
        select_balanced(rows, *sizes, **kwargs)


@pytest.mark.parametrize(
    ("name", "text", "error", "match"),
    [
        ("a.jsonl", "".join(json.dumps({k: v for k, v in r.items() if k != "is_response_1_safe"}) + "\n"
                            for r in make_rows()[:3]), ValueError, r"a\.jsonl: row 1 is missing column\(s\) \['is_response_1_safe'\]"),
        ("b.jsonl", json.dumps({**make_rows()[0], "is_response_0_safe": "yes"}) + "\n", ValueError,
         r"b\.jsonl: row 1: is_response_0_safe must be true/false, got 'yes'"),
        ("c.jsonl", json.dumps(make_rows()[0]) + "\n\n{oops\n", ValueError, r"c\.jsonl:3: not JSON"),
        ("d.jsonl", "", ValueError, r"d\.jsonl: no rows"),
        ("e.json", '{"prompt": "x"}', ValueError, "must hold an array of row objects"),
        ("f.csv", "prompt\nx\n", ValueError, "unsupported file type"),
    ],
)  # fmt: skip
def test_bad_files_are_named(tmp_path, name, text, error, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(error, match=match):
        load_pku(tmp_path / name)


def test_missing_file_and_unreachable_hub_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_pku(tmp_path / "absent.parquet")
    # Not a path, so it goes through datasets.load_dataset; offline, that fails naming the dataset,
    # the flag that replaces it and the switch that is off
    with pytest.raises(UserError, match=r"'no-such-org/no-such-dataset' \(--source\).*HF_HUB_OFFLINE=1"):
        load_pku("no-such-org/no-such-dataset", config="alpaca-7b")


def test_cli_writes_and_prints_the_paths(tmp_path, pku_file, capsys):
    main(["--source", str(pku_file), "--train-size", "20", "--eval-size", "30", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(tmp_path / "custom_train_20.jsonl"), str(tmp_path / "custom_eval_30.jsonl")]
    assert all(Path(p).is_file() for p in printed) and len(printed) == 5
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["--source", str(pku_file), "--train-size", "500", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "exceeds the 200 rows" in capsys.readouterr().err


def test_chart_draws_the_bucket_proportions(pku_file):
    sel = select_balanced(load_pku(pku_file).rows, 50, 100)
    stats = {"full": sel.full_stats, "train": sel.train_stats, "eval": sel.eval_stats}
    ax = plot_bucket_proportions(stats)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "train", "eval"]
    for bars, s in zip(ax.containers, stats.values(), strict=True):
        assert [b.get_height() for b in bars] == pytest.approx([s["bucket_proportions"][k] for k in BUCKETS])


def test_notebook_runs_headless(tmp_path, pku_file, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "stored with outputs"
    # A kernel spec of our own, so the kernel is this interpreter (the .venv) whatever "python3" resolves to.
    spec = tmp_path / "kernels" / "this-python"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "t", "language": "python"}))
    km = AsyncKernelManager(kernel_name="this-python",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))  # fmt: skip
    out = tmp_path / "out"
    for key, value in {"SOURCE": pku_file, "TRAIN_SIZE": 50, "EVAL_SIZE": 100, "OUT_DIR": out}.items():
        monkeypatch.setenv(f"PKU_{key}", str(value))
    # An inherited MPLBACKEND=Agg would silently drop the chart from the outputs.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nbclient.NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert (out / "custom_train_50.jsonl").is_file() and (out / "alpaca7b_stats.json").is_file()
    written = [json.loads(line) for line in (out / "custom_eval_100.jsonl").read_text().splitlines()]
    assert bucket_counts(written) == EVAL_QUOTAS
    outputs = [o for c in code for o in c.outputs]
    text = "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert str(out / "custom_train_50.jsonl") in text
    assert "(False, True)" in text and "Cybercrime" in text  # the stats tables
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the chart
