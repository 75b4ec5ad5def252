"""Quadrant classification: real generation with the toy policy, real scoring over HTTP, resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.config import ConfigError
from alignment.es.checkpoint import apply_weights, save_final
from alignment.evaluation.classify_reward_cost_unified import (
    classify_model,
    main,
    read_partial,
    rebuild_from_points,
    run_sweep,
)
from alignment.evaluation.comparisons import STAT_KEYS, list_models, read_points
from alignment.evaluation.sweep import SweepConfig, SweepModel, generation_fingerprint, load_sweep
from alignment.scoring.client import ScorerClient, ScorerUnavailableError
from alignment.toy.objective import TOY_EVAL_PROMPTS
from tests.conftest import REPO, SHARED_REFERENCE

REFERENCE = SHARED_REFERENCE / "anchor_outputs" / "model_comparisons"
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"reference data not found at {REFERENCE}"
)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TOY_EVAL_PROMPTS[:6]))
    return path


@pytest.fixture(scope="module")
def es_checkpoint(toy_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ES-style ``pytorch_model.pth``: the toy policy with every weight moved a little."""
    model = AutoModelForCausalLM.from_pretrained(toy_models / "policy")
    gen = torch.Generator().manual_seed(0)
    state = {k: p.detach() + 0.05 * torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}
    return save_final(tmp_path_factory.mktemp("es-run"), 7, state)


def _cfg(toy_models: Path, prompts_file: Path, out: Path, **kw) -> SweepConfig:
    kw.setdefault("models", [SweepModel("Toy-base", str(toy_models / "policy"))])
    kw.setdefault("scatter", False)
    return SweepConfig(prompts=str(prompts_file), backend="transformers", device="cpu",
                       dtype="fp32", max_new_tokens=12, batch_size=4, save_every=2, output_dir=str(out),
                       **kw)  # fmt: skip


def test_sweep_writes_reference_fields_and_applies_es_checkpoint(
    toy_models, prompts_file, es_checkpoint, scorer, tmp_path
):
    models = [SweepModel("Toy-base", str(toy_models / "policy")),
              SweepModel("Toy-ES", str(toy_models / "policy"), es_checkpoint=str(es_checkpoint))]  # fmt: skip
    cfg = _cfg(toy_models, prompts_file, tmp_path / "out", models=models, scatter=True)
    with ScorerClient(scorer.url) as client:
        summaries = run_sweep(cfg, client)
        assert list_models(cfg.output_dir) == ["Toy-ES", "Toy-base"]
        for name in ("Toy-base", "Toy-ES"):
            rows = read_points(tmp_path / "out" / f"{name}_points.jsonl")
            assert [r["prompt"] for r in rows] == TOY_EVAL_PROMPTS[:6]
            assert all(set(r) == {"prompt", "response", "reward", "cost", "label"} for r in rows)
            again = client.score([r["prompt"] for r in rows], [r["response"] for r in rows])
            np.testing.assert_allclose([r["reward"] for r in rows], again.rewards, rtol=0, atol=1e-5)
            rs = np.load(tmp_path / "out" / f"{name}_Rs.npy")
            assert rs.dtype == np.float32 and rs.tolist() == pytest.approx([r["reward"] for r in rows])
            labels = np.load(tmp_path / "out" / f"{name}_labels.npy").tolist()
            assert labels == [r["label"] for r in rows]
            summary = json.loads((tmp_path / "out" / f"{name}_summary.json").read_text())
            assert set(STAT_KEYS) <= set(summary) and summary["num_points"] == 6
            assert summary["reward_model"] and summary["used_policy_model"] is True
            assert (tmp_path / "out" / f"{name}_scatter.png").stat().st_size > 10_000
            assert not (tmp_path / "out" / f".{name}.partial.jsonl").exists()
    base = [r["response"] for r in read_points(tmp_path / "out" / "Toy-base_points.jsonl")]
    moved = [r["response"] for r in read_points(tmp_path / "out" / "Toy-ES_points.jsonl")]
    assert base != moved, "the ES checkpoint was not applied"
    assert summaries["Toy-ES"]["es_checkpoint"] == str(es_checkpoint)


def test_crash_mid_model_keeps_responses_and_resumes(toy_models, prompts_file, scorer, tmp_path):
    cfg = _cfg(toy_models, prompts_file, tmp_path / "out")
    spec, prompts = cfg.models[0], TOY_EVAL_PROMPTS[:6]
    calls: list[list[str]] = []

    def crashing(chunk: list[str]) -> list[str]:
        calls.append(chunk)
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return [f"answer to {p}" for p in chunk]

    with ScorerClient(scorer.url) as client:
        with pytest.raises(RuntimeError, match="node lost"):
            classify_model(spec, cfg, prompts, client, generate=crashing)
        partial = tmp_path / "out" / ".Toy-base.partial.jsonl"
        fingerprint = generation_fingerprint(cfg, spec, prompts)
        assert read_partial(partial, fingerprint) == [f"answer to {p}" for p in prompts[:2]]
        with open(partial, "ab") as fh:  # a crash while writing the next line
            fh.write(b'{"i": 2, "respo')
        calls.clear()
        summary = classify_model(
            spec, cfg, prompts, client, generate=lambda c: calls.append(c) or [f"answer to {p}" for p in c]
        )
        assert [p for chunk in calls for p in chunk] == prompts[2:], "only the missing prompts are generated"
        rows = read_points(tmp_path / "out" / "Toy-base_points.jsonl")
        assert [r["response"] for r in rows] == [f"answer to {p}" for p in prompts]
        assert summary["num_points"] == 6

        calls.clear()  # finished with the same settings: skipped without generating
        classify_model(spec, cfg, prompts, client, generate=lambda c: calls.append(c) or c)
        assert calls == []


def test_partial_from_other_settings_is_refused(toy_models, prompts_file, scorer, tmp_path):
    cfg = _cfg(toy_models, prompts_file, tmp_path / "out")
    spec, prompts = cfg.models[0], TOY_EVAL_PROMPTS[:6]
    partial = tmp_path / "out" / ".Toy-base.partial.jsonl"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"fingerprint": "0123456789abcdef"}) + "\n")
    with ScorerClient(scorer.url) as client, pytest.raises(RuntimeError, match="other settings"):
        classify_model(spec, cfg, prompts, client, generate=lambda c: c)


def test_scorer_outage_keeps_generated_responses(toy_models, prompts_file, tmp_path):
    cfg = _cfg(toy_models, prompts_file, tmp_path / "out")
    spec, prompts = cfg.models[0], TOY_EVAL_PROMPTS[:6]
    with (
        ScorerClient("http://127.0.0.1:9", retries=0, timeout=2) as dead,
        pytest.raises(ScorerUnavailableError),
    ):
        classify_model(spec, cfg, prompts, dead, generate=lambda c: [p[::-1] for p in c])
    kept = read_partial(
        tmp_path / "out" / ".Toy-base.partial.jsonl", generation_fingerprint(cfg, spec, prompts)
    )
    assert kept == [p[::-1] for p in prompts]
    assert not (tmp_path / "out" / "Toy-base_summary.json").exists()


@needs_reference
def test_from_points_reproduces_every_reference_summary(tmp_path):
    assert main(["--from-points", str(REFERENCE), "--output-dir", str(tmp_path), "--no_scatter"]) == 0
    models = list_models(REFERENCE)
    assert len(models) == 6 and list_models(tmp_path) == models
    for name in models:
        ref = json.loads((REFERENCE / f"{name}_summary.json").read_text())
        ours = json.loads((tmp_path / f"{name}_summary.json").read_text())
        assert {k: ours[k] for k in STAT_KEYS} == {k: ref[k] for k in STAT_KEYS}, name
        assert ours["reward_model"] == ref["reward_model"]  # provenance carried over
        for arr in ("_Rs.npy", "_Cs.npy"):
            assert np.array_equal(np.load(tmp_path / f"{name}{arr}"), np.load(REFERENCE / f"{name}{arr}"))
        labels = np.load(tmp_path / f"{name}_labels.npy").tolist()
        assert labels == [r["label"] for r in read_points(REFERENCE / f"{name}_points.jsonl")]


def test_from_points_rejects_a_label_with_another_convention(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [{"prompt": "p", "response": "r", "reward": 0.5, "cost": 0.0, "label": "UH"}]  # cost 0 is safe
    (src / "M_points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"M: 1 stored label.*label 'UH'"):
        rebuild_from_points(src, tmp_path / "out", scatter=False)
    (src / "M_points.jsonl").write_text(
        json.dumps({"prompt": "p", "response": "r", "reward": "x", "cost": 1}) + "\n"
    )
    with pytest.raises(ValueError, match="M_points.jsonl:1: reward must be a finite number"):
        rebuild_from_points(src, tmp_path / "out", scatter=False)


def test_sweep_config_errors_name_the_problem(tmp_path):
    def sweep(text: str) -> Path:
        path = tmp_path / "sweep.yaml"
        path.write_text(text)
        return path

    with pytest.raises(ConfigError, match=r"unknown key 'es_chekpoint'.*did you mean 'es_checkpoint'"):
        load_sweep(sweep("models:\n  - {name: A, model: m, es_chekpoint: x.pth}\n"))
    with pytest.raises(ConfigError, match=r"ES checkpoint file\(s\) not found: \['B: nope.pth'\]"):
        load_sweep(
            sweep("models:\n  - {name: A, model: m}\n  - {name: B, model: m, es_checkpoint: nope.pth}\n")
        )
    with pytest.raises(ConfigError, match="repeated"):
        load_sweep(sweep("models:\n  - {name: A, model: m}\n  - {name: A, model: n}\n"))
    with pytest.raises(ConfigError, match=r"--only names \['C'\]"):
        load_sweep(sweep("models:\n  - {name: A, model: m}\n"), only=["C"])
    with pytest.raises(ConfigError, match="must be non-empty"):
        load_sweep(sweep("models:\n  - {name: a/b, model: m}\n"))
    shipped = load_sweep(REPO / "alignment/evaluation/sweep_configs.yaml", only=["Alpaca-7B", "Beaver-V3"])
    assert [m.model for m in shipped.models] == ["models/alpaca-7b", "PKU-Alignment/beaver-7b-v3.0"]


def test_apply_weights_refuses_another_architecture(toy_models):
    model = AutoModelForCausalLM.from_pretrained(toy_models / "policy")
    state = {k: p.detach().clone() for k, p in model.named_parameters()}
    name = next(iter(state))
    with pytest.raises(ValueError, match=r"1 parameter\(s\) missing"):
        apply_weights(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="1 with another shape"):
        apply_weights(model, {**state, name: state[name][:1]})


def test_runner_script_with_plain_bash(toy_models, prompts_file, scorer, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"prompts: {prompts_file}\nbackend: transformers\ndevice: cpu\ndtype: fp32\nmax_new_tokens: 8\n"
        f"scatter: false\nmodels:\n  - {{name: Toy-base, model: {toy_models / 'policy'}}}\n"
    )
    env = {**os.environ, "SWEEP_CONFIG": str(sweep), "OUTPUT_DIR": str(tmp_path / "out"),
           "SCORER_ADDRESS_FILE": str(scorer.address_file), "SCORER_WAIT_S": "30", "PLOTS": "0"}  # fmt: skip
    script = "alignment/evaluation/classify_reward_cost_unified.sh"
    proc = subprocess.run(["bash", script, "--max_prompts", "3"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Toy-base: safe" in proc.stdout
    assert len(read_points(tmp_path / "out" / "Toy-base_points.jsonl")) == 3

    assert not (tmp_path / "out" / "model_safety_ratios.png").exists()
    env.update(FROM_POINTS=str(tmp_path / "out"), OUTPUT_DIR=str(tmp_path / "rebuilt"), PLOTS="1")
    proc = subprocess.run(["bash", script, "--no_scatter"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("reward_cost_scatter_grid.png", "model_safety_ratios.png"):
        assert (tmp_path / "rebuilt" / figure).stat().st_size > 10_000, figure
    assert (tmp_path / "rebuilt" / "Toy-base_summary.json").read_text() == (
        tmp_path / "out" / "Toy-base_summary.json"
    ).read_text()
