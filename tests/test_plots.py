"""The figure scripts on the study's reference outputs and on small synthetic runs: what they draw and write."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from matplotlib.collections import LineCollection

from alignment import cli
from alignment.evaluation.comparisons import list_models, load_scores, load_summary
from alignment.scoring.quadrants import LABELS
from alignment.visualization import (
    plot_gpt_elo_figure,
    plot_reward_cost_grid,
    plot_safety_ratios,
    plot_training_curves,
)
from tests.conftest import SHARED_REFERENCE

COMPARISONS = SHARED_REFERENCE / "anchor_outputs" / "model_comparisons"
GPT_ELO = SHARED_REFERENCE / "anchor_outputs" / "gpt_elo"


def need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (../shared/reference is absent)")
    return path


def assert_png(path: Path) -> tuple[int, int]:
    """The file is a readable RGBA PNG; returns (height, width)."""
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] == 4 and image.shape[0] > 100 and image.shape[1] > 100
    return image.shape[0], image.shape[1]


def cli_error(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a CLI (with the CLI behaviour) expected to stop with a user error; returns its one stderr line."""
    with pytest.raises(SystemExit) as info:
        cli.run(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- reward–cost grid
def test_grid_on_reference(tmp_path: Path) -> None:
    folder = need(COMPARISONS)
    models = list_models(folder)
    assert len(models) == 6
    fig = plot_reward_cost_grid.plot_reward_cost_grid(plot_reward_cost_grid.load_grid_scores(folder))
    assert [ax.get_title() for ax in fig.axes] == models
    for ax, model in zip(fig.axes, models, strict=True):
        rewards, costs = load_scores(folder, model)
        np.testing.assert_array_equal(ax.collections[0].get_offsets(), np.column_stack([costs, rewards]))
        assert ax.get_xlim() == (-10.0, 10.0) and ax.get_ylim() == (-4.0, 4.0)
        outside = int(np.count_nonzero((np.abs(costs) > 10) | (np.abs(rewards) > 4)))
        texts = [t.get_text() for t in ax.texts]
        assert f"n={rewards.size}, {outside} outside view" in texts
        summary = load_summary(folder, model)
        assert f"SH {summary['percents']['SH']:.1f}%" in texts

    out = tmp_path / "grid.png"
    plot_reward_cost_grid.main(["--input", str(folder), "--output", str(out), "--models", "ES-500", "Alpaca-7B",
                                "--xlim", "-12", "12", "--ylim", "-5", "5"])  # fmt: skip
    assert_png(out)
    fig = plot_reward_cost_grid.plot_reward_cost_grid(
        plot_reward_cost_grid.load_grid_scores(folder, ["ES-500", "Alpaca-7B"]), xlim=(-12, 12), ylim=(-5, 5)
    )
    assert [ax.get_title() for ax in fig.axes] == ["ES-500", "Alpaca-7B"]
    assert fig.axes[0].get_xlim() == (-12.0, 12.0)


def test_grid_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="no such model comparisons folder"):
        plot_reward_cost_grid.load_grid_scores(tmp_path / "missing")
    with pytest.raises(ValueError, match="no models in"):
        plot_reward_cost_grid.load_grid_scores(tmp_path)
    with pytest.raises(ValueError, match="xlim"):
        plot_reward_cost_grid.check_range((5, -5), "xlim (cost)")
    assert "no models in" in cli_error(plot_reward_cost_grid.main, ["--input", str(tmp_path)], capsys)
    if COMPARISONS.is_dir():
        err = cli_error(
            plot_reward_cost_grid.main, ["--input", str(COMPARISONS), "--models", "GPT-9"], capsys
        )
        assert "GPT-9" in err and "Alpaca-7B" in err


# ---------------------------------------------------------------- safety ratios
def test_safety_ratios_on_reference(tmp_path: Path) -> None:
    folder = need(COMPARISONS)
    models = list_models(folder)
    fig = plot_safety_ratios.plot_safety_ratios(plot_safety_ratios.load_shares(folder))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == models
    assert [c.get_label() for c in ax.containers] == list(LABELS)
    summaries = [load_summary(folder, m) for m in models]
    for container in ax.containers:
        heights = [p.get_height() for p in container.patches]
        assert heights == pytest.approx([s["percents"][container.get_label()] for s in summaries])
    tops = [sum(c.patches[i].get_height() for c in ax.containers) for i in range(len(models))]
    assert tops == pytest.approx([100.0] * len(models))
    texts = {t.get_text() for t in ax.texts}
    assert {f"safe {s['safe_ratio']:.1f}%" for s in summaries} <= texts

    out = tmp_path / "ratios.png"
    plot_safety_ratios.main(["--input", str(folder), "--output", str(out), "--models", "ES-500", "Beaver-V3"])
    assert_png(out)


def test_safety_ratios_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"M: summary percents\['UU'\]"):
        plot_safety_ratios.shares_from_summary("M", {"percents": {"SH": 1.0, "SU": 2.0, "UH": 3.0}})
    with pytest.raises(ValueError, match="no 'percents'"):
        plot_safety_ratios.shares_from_summary("M", {"counts": {}})
    err = cli_error(plot_safety_ratios.main, ["--input", str(tmp_path / "nope")], capsys)
    assert "no such model comparisons folder" in err


# ---------------------------------------------------------------- GPT Elo
def test_elo_figure_on_reference(tmp_path: Path) -> None:
    folder = need(GPT_ELO)
    ratings = json.loads((folder / "gpt_elo_ratings.json").read_text())
    out = tmp_path / "elo.png"
    plot_gpt_elo_figure.main(["--input", str(folder), "--output", str(out)])
    assert_png(out)
    fig = plot_gpt_elo_figure.plot_gpt_elo(
        plot_gpt_elo_figure.read_elo_ratings(folder / "gpt_elo_ratings.json")
    )
    (ax,) = fig.axes
    models = sorted(ratings["helpfulness"])
    expected = [[ratings["harmlessness"][m], ratings["helpfulness"][m]] for m in models]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), expected)
    assert [t.get_text() for t in ax.texts] == models


def write_synthetic_elo(folder: Path) -> dict:
    """A ratings file and a Bradley–Terry file for three made-up models; returns the BT ratings."""
    folder.mkdir(parents=True, exist_ok=True)
    elo = {"helpfulness": {"A": 1000.0, "B": 1100.0, "C": 1250.0},
           "harmlessness": {"A": 1000.0, "B": 1180.0, "C": 1050.0}}  # fmt: skip
    bt = {"helpfulness": {"A": {"rating": 1000.0, "ci_low": 1000.0, "ci_high": 1000.0},
                          "B": {"rating": 1090.0, "ci_low": 1040.0, "ci_high": 1150.0},
                          "C": {"rating": 1240.0, "ci_low": 1200.0, "ci_high": 1300.0}},
          "harmlessness": {"A": {"rating": 1000.0, "ci_low": 1000.0, "ci_high": 1000.0},
                           "B": {"rating": 1170.0, "ci_low": 1100.0, "ci_high": 1210.0},
                           "C": {"rating": 1060.0, "ci_low": 1010.0, "ci_high": 1120.0}}}  # fmt: skip
    (folder / "gpt_elo_ratings.json").write_text(json.dumps(elo))
    meta = {"method": "bradley-terry", "scale": 400, "baseline": "A", "baseline_rating": 1000,
            "n_bootstrap": 200, "ci": 0.95, "seed": 0}  # fmt: skip
    (folder / "gpt_elo_bradley_terry.json").write_text(json.dumps({**meta, "ratings": bt}))
    return bt


def test_elo_figure_with_bradley_terry_cis(tmp_path: Path) -> None:
    bt = write_synthetic_elo(tmp_path / "gpt_elo")
    plot_gpt_elo_figure.main(["--input", str(tmp_path / "gpt_elo")])
    height, width = assert_png(tmp_path / "gpt_elo" / "gpt_elo_scatter.png")
    assert width > 1.5 * height  # two panels side by side

    table, meta = plot_gpt_elo_figure.read_bt_ratings(tmp_path / "gpt_elo" / "gpt_elo_bradley_terry.json")
    elo = plot_gpt_elo_figure.read_elo_ratings(tmp_path / "gpt_elo" / "gpt_elo_ratings.json")
    fig = plot_gpt_elo_figure.plot_gpt_elo(elo, table, meta)
    assert len(fig.axes) == 2
    assert "95% CI" in fig.axes[1].get_title() and "200" in fig.axes[1].get_title()
    ax = fig.axes[1]
    models = ["A", "B", "C"]
    np.testing.assert_allclose(
        ax.collections[0].get_offsets(),
        [[bt["harmlessness"][m]["rating"], bt["helpfulness"][m]["rating"]] for m in models],
    )
    (intervals,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = intervals.get_segments()
    xs = {m: bt["harmlessness"][m]["rating"] for m in models}
    ys = {m: bt["helpfulness"][m]["rating"] for m in models}
    expected = [
        [(bt["harmlessness"][m]["ci_low"], ys[m]), (bt["harmlessness"][m]["ci_high"], ys[m])] for m in models
    ]
    expected = [
        e
        for pair in zip(
            expected,
            [
                [(xs[m], bt["helpfulness"][m]["ci_low"]), (xs[m], bt["helpfulness"][m]["ci_high"])]
                for m in models
            ],
            strict=True,
        )
        for e in pair
    ]
    np.testing.assert_allclose(np.asarray(segments), np.asarray(expected))

    plot_gpt_elo_figure.main(
        ["--input", str(tmp_path / "gpt_elo"), "--no-bt", "--output", str(tmp_path / "a.png")]
    )
    height, width = assert_png(tmp_path / "a.png")
    assert width < 1.5 * height


def test_elo_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(plot_gpt_elo_figure.main, ["--input", str(tmp_path)], capsys)
    assert "no such ratings file" in err and "gpt_elo_ratings.json" in err
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"helpfulness": {"A": 1000.0, "B": 900.0}, "harmlessness": {"A": 1000.0}}))
    with pytest.raises(ValueError, match=r"only in helpfulness \['B'\]"):
        plot_gpt_elo_figure.read_elo_ratings(bad)
    bad.write_text(json.dumps({"helpfulness": {"A": 1000.0}}))
    with pytest.raises(ValueError, match="'harmlessness'"):
        plot_gpt_elo_figure.read_elo_ratings(bad)
    entry = {"rating": 1000.0, "ci_low": 1020.0, "ci_high": 1010.0}
    bad.write_text(json.dumps({"ratings": {"helpfulness": {"A": entry}, "harmlessness": {"A": entry}}}))
    with pytest.raises(ValueError, match=r"ratings\['helpfulness'\]\['A'\]: need ci_low <= ci_high"):
        plot_gpt_elo_figure.read_bt_ratings(bad)
    entry = {"rating": 1000.0, "ci_low": None, "ci_high": None}  # no bootstrap: a point without interval
    bad.write_text(json.dumps({"ratings": {"helpfulness": {"A": entry}, "harmlessness": {"A": entry}}}))
    assert plot_gpt_elo_figure.read_bt_ratings(bad)[0]["helpfulness"]["A"].ci is None


# ---------------------------------------------------------------- training curves
ES_STEPS = [0, 1, 2, 3, 4]
ES_REWARD = [-1.0, -0.5, 0.25, 0.5, 1.0]  # exact in float32, as TensorBoard stores them
ES_COST = [2.0, 1.5, 0.5, -0.25, -0.5]
ES_LAMBDA = [1.0, 1.25, 1.5, 1.5, 1.25]
GRPO_STEPS = [1, 2, 3]
GRPO_REWARD = [0.5, 0.75, 1.5]
GRPO_COST = [1.0, 0.0, -1.0]
GRPO_LAMBDA = [1.0, 1.125, 1.0]


def write_es_run(run: Path) -> Path:
    """An ES-like run: Tracker events in run/logs and config.yaml with cost_threshold_d = -0.25."""
    from alignment.tracking import Tracker

    with Tracker(run / "logs") as tracker:
        for step, r, c, lam in zip(ES_STEPS, ES_REWARD, ES_COST, ES_LAMBDA, strict=True):
            tracker.log({"train/reward_mean": r, "train/cost_mean": c, "lambda/value": lam}, step=step)
        tracker.log({"eval/R_mean": 1.5, "eval/C_mean": -2.0, "eval/safe_ratio": 100.0}, step=4)
    (run / "config.yaml").write_text(yaml.safe_dump({"cost_threshold_d": -0.25, "population_size": 4}))
    return run


def write_grpo_run(run: Path) -> Path:
    """A GRPO-like run: SummaryWriter events in run/runs and the λ state in checkpoint-3 (d = 0.5)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "runs"))
    for step, r, c, lam in zip(GRPO_STEPS, GRPO_REWARD, GRPO_COST, GRPO_LAMBDA, strict=True):
        writer.add_scalar("train/scorer/reward_mean", r, step)
        writer.add_scalar("train/scorer/cost_mean", c, step)
        writer.add_scalar("train/lambda/value", lam, step)
    writer.add_scalar("train/eval/reward_mean", 2.0, 3)
    writer.add_scalar("train/eval/cost_mean", -1.5, 3)
    writer.close()
    for step, d in ((1, 9.0), (3, 0.5)):  # the newest checkpoint wins
        (run / f"checkpoint-{step}").mkdir(parents=True)
        state = {"stateful_callbacks": {"LagrangeCallback": {"attributes": {"lagrange_state": {
            "config": {"cost_threshold_d": d}, "log_lambda": 0.0, "jc_ema": 0.0, "steps": step}}}}}  # fmt: skip
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    return run


def lines(ax, gid: str) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def test_training_curves_es_and_grpo(tmp_path: Path) -> None:
    es = plot_training_curves.load_run(write_es_run(tmp_path / "es_run"), "ES")
    grpo = plot_training_curves.load_run(write_grpo_run(tmp_path / "grpo_run"))
    assert (es.kind, grpo.kind) == ("ES", "GRPO")
    assert (es.cost_threshold_d, grpo.cost_threshold_d) == (-0.25, 0.5)
    assert grpo.label is None  # named by the legend: the only GRPO run is "GRPO"

    fig = plot_training_curves.plot_training_curves([es, grpo])
    ax_r, ax_c, ax_l = fig.axes
    expected = {
        "reward": (ax_r, [(ES_STEPS, ES_REWARD), (GRPO_STEPS, GRPO_REWARD)]),
        "cost": (ax_c, [(ES_STEPS, ES_COST), (GRPO_STEPS, GRPO_COST)]),
        "lambda": (ax_l, [(ES_STEPS, ES_LAMBDA), (GRPO_STEPS, GRPO_LAMBDA)]),
    }
    for panel, (ax, runs) in expected.items():
        drawn = lines(ax, f"{panel}/raw")
        assert len(drawn) == 2, panel
        for line, (steps, values) in zip(drawn, runs, strict=True):
            assert list(line.get_xdata()) == steps and list(line.get_ydata()) == values
        assert drawn[0].get_color() != drawn[1].get_color()
    eval_r, eval_c = lines(ax_r, "reward/eval"), lines(ax_c, "cost/eval")
    assert [(list(e.get_xdata()), list(e.get_ydata())) for e in eval_r] == [([4], [1.5]), ([3], [2.0])]
    assert [(list(e.get_xdata()), list(e.get_ydata())) for e in eval_c] == [([4], [-2.0]), ([3], [-1.5])]
    assert [list(t.get_ydata()) for t in lines(ax_c, "cost/threshold")] == [[0.25, 0.25], [-0.5, -0.5]]
    assert list(lines(ax_c, "cost/zero")[0].get_ydata()) == [0.0, 0.0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "ES (constraint E[C] ≤ 0.25)" in legend and "GRPO (constraint E[C] ≤ -0.5)" in legend

    out = tmp_path / "curves.png"
    plot_training_curves.main([str(tmp_path / "es_run"), str(tmp_path / "grpo_run" / "runs"),
                               "--labels", "es", "grpo", "--smooth", "0.5", "--output", str(out)])  # fmt: skip
    assert_png(out)
    fig = plot_training_curves.plot_training_curves([es], smooth=0.5)
    (smoothed,) = lines(fig.axes[0], "reward/smooth")
    assert list(lines(fig.axes[0], "reward/raw")[0].get_ydata()) == ES_REWARD
    np.testing.assert_allclose(smoothed.get_ydata(), plot_training_curves.ema(ES_REWARD, 0.5))
    assert smoothed.get_ydata()[0] == ES_REWARD[0]  # debiased: starts at the first value


def test_training_curve_legend_names_runs_by_what_differs(tmp_path: Path) -> None:
    # issue 19: two ES runs were both "ES alignment_<stamp>"
    def es_run(name: str, **config) -> plot_training_curves.RunCurves:
        run = write_es_run(tmp_path / name)
        base = {"cost_threshold_d": -0.25, "population_size": 4, "experiment_dir": f"logs/{name}"}
        (run / "config.yaml").write_text(yaml.safe_dump({**base, **config}))
        return plot_training_curves.load_run(run)

    full = es_run("alignment_20261122_101500", noise="full", sigma=0.05)
    low = es_run("alignment_20261122_111500", noise="lowrank", sigma=0.05, noise_rank=4)
    grpo = plot_training_curves.load_run(write_grpo_run(tmp_path / "grpo_run"))
    # noise first (the telling key), absent keys count as differing, placement keys (experiment_dir) never
    assert plot_training_curves.legend_labels([full, low, grpo]) == [
        "ES noise=full, noise_rank=null", "ES noise=lowrank, noise_rank=4", "GRPO"]  # fmt: skip
    legend = [
        t.get_text() for t in plot_training_curves.plot_training_curves([full, low]).legends[0].get_texts()
    ]
    assert legend[:2] == ["ES noise=full, noise_rank=null (constraint E[C] ≤ 0.25)",
                          "ES noise=lowrank, noise_rank=4 (constraint E[C] ≤ 0.25)"]  # fmt: skip

    many = [es_run(f"s{k}", sigma=0.01 * k, alpha=k, seed=k, batch_size=k, lambda_lr=k) for k in (1, 2)]
    assert plot_training_curves.legend_labels(many) == [
        "ES sigma=0.01, alpha=1, lambda_lr=1, +2 more", "ES sigma=0.02, alpha=2, lambda_lr=2, +2 more"]  # fmt: skip
    named = [es_run("n1", run_name="baseline"), es_run("n2", run_name="baseline")]
    assert plot_training_curves.legend_labels(named) == ["ES baseline n1", "ES baseline n2"]  # same config
    given = plot_training_curves.load_run(tmp_path / "n1", "mine")
    assert plot_training_curves.legend_labels([given, named[1]]) == ["mine", "ES baseline n2"]


def test_training_curves_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        plot_training_curves.load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        plot_training_curves.load_run(tmp_path / "missing")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "other" / "logs"))
    writer.add_scalar("loss", 1.0, 0)
    writer.close()
    with pytest.raises(ValueError, match=r"cannot tell ES from GRPO.*\['loss'\]"):
        plot_training_curves.load_run(tmp_path / "other")
    write_es_run(tmp_path / "exp" / "a")
    write_es_run(tmp_path / "exp" / "b")
    with pytest.raises(ValueError, match="event files in 2 folders"):
        plot_training_curves.load_run(tmp_path / "exp")
    with pytest.raises(ValueError, match="smoothing weight"):
        plot_training_curves.ema([1.0], 1.0)
    err = cli_error(plot_training_curves.main, [str(tmp_path / "exp" / "a"), "--labels", "x", "y"], capsys)
    assert "--labels gives 2 label(s) for 1 run folder(s)" in err
    assert "no TensorBoard event files" in cli_error(
        plot_training_curves.main, [str(tmp_path / "empty")], capsys
    )
