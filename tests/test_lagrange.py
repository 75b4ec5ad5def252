"""Tests for the shared λ controller: direction, exact steps, clipping, sign convention and resume."""

from __future__ import annotations

import json
import logging
import math

import pytest

from alignment.lagrange import LagrangeConfig, LagrangeController


def make(**overrides: object) -> LagrangeController:
    """An adapting controller with a learning rate large enough to see movement in one step."""
    kwargs: dict[str, object] = {"lambda_adapt": True, "lambda_lr": 0.1}
    kwargs.update(overrides)
    return LagrangeController(LagrangeConfig(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["ema_log", "ppo_lag"])
def test_lambda_rises_above_threshold_and_falls_below(rule: str) -> None:
    up = make(rule=rule, cost_threshold_d=-0.1)
    down = make(rule=rule, cost_threshold_d=-0.1)
    assert up.update(0.5) > 1.0
    assert down.update(-0.5) < 1.0


def test_ema_log_exact_steps() -> None:
    ctrl = make(rule="ema_log", lambda_lr=0.1, jc_ema_beta=0.9, cost_threshold_d=-0.2)
    costs = [1.0, 0.0, 0.5]
    log_lam, ema = 0.0, None
    for c in costs:
        jc = c - 0.2
        ema = jc if ema is None else 0.9 * ema + 0.1 * jc
        log_lam += 0.1 * ema
        assert ctrl.update(c) == pytest.approx(math.exp(log_lam), rel=1e-12)
    # Hand values: ema = 0.8, 0.7, 0.66 -> ln λ = 0.08, 0.15, 0.216.
    assert ctrl.value == pytest.approx(math.exp(0.216), rel=1e-12)
    assert ctrl.last_stats()["jc_ema"] == pytest.approx(0.66, rel=1e-12)


def test_ppo_lag_exact_steps() -> None:
    ctrl = make(rule="ppo_lag", lambda_lr=0.1, lambda_init=2.0)
    # Step 1: ln λ = ln 2 + 0.1*2*0.5 = ln 2 + 0.1.  Step 2: ln λ += 0.1*λ1*(-1.0).
    lam1 = math.exp(math.log(2.0) + 0.1)
    lam2 = math.exp(math.log(lam1) - 0.1 * lam1)
    assert ctrl.update(0.5) == pytest.approx(lam1, rel=1e-12)
    assert ctrl.update(-1.0) == pytest.approx(lam2, rel=1e-12)
    assert ctrl.last_stats()["jc"] == -1.0


def test_ema_first_step_initialises_to_jc() -> None:
    ctrl = make(jc_ema_beta=0.99, cost_threshold_d=0.3)
    ctrl.update(0.2)
    assert ctrl.last_stats()["jc_ema"] == pytest.approx(0.5)
    assert ctrl.value == pytest.approx(math.exp(0.1 * 0.5))


@pytest.mark.parametrize("rule", ["ema_log", "ppo_lag"])
def test_clipping_at_bounds(rule: str) -> None:
    hi = make(rule=rule, lambda_lr=10.0, lambda_max=3.0)
    for _ in range(5):
        hi.update(10.0)
    assert hi.value == 3.0
    lo = make(rule=rule, lambda_lr=10.0, lambda_min=0.01)
    lo.update(-10.0)
    if rule == "ema_log":
        assert lo.value == 0.01
    else:  # safe-rlhf clamps only the top: ln λ = 0 + 10·1·(-10)
        assert lo.value == pytest.approx(math.exp(-100.0), rel=1e-12)


def test_huge_cost_does_not_overflow() -> None:
    ctrl = make(rule="ppo_lag", lambda_lr=1.0)
    assert ctrl.update(1e300) == 5.0


@pytest.mark.parametrize("rule", ["ema_log", "ppo_lag"])
def test_pos_cost_only_keeps_lambda_from_falling(rule: str) -> None:
    ctrl = make(rule=rule, lambda_pos_cost_only=True)
    for _ in range(3):
        assert ctrl.update(-1.0) == 1.0
    assert ctrl.last_stats()["jc"] == 0.0
    assert ctrl.update(1.0) > 1.0


def test_adapt_false_never_changes_lambda_but_records_stats() -> None:
    ctrl = make(lambda_adapt=False, lambda_init=0.7)
    for c in (5.0, -5.0, 100.0):
        assert ctrl.update(c) == 0.7
    stats = ctrl.last_stats()
    assert stats["mean_cost"] == 100.0 and stats["steps"] == 3.0
    assert stats["jc_ema"] == pytest.approx(0.9 * (0.9 * 5.0 + 0.1 * -5.0) + 0.1 * 100.0)


@pytest.mark.parametrize("rule", ["ema_log", "ppo_lag"])
def test_threshold_sign_convention(rule: str) -> None:
    # d = -0.1 encodes E[C] <= 0.1: cost 0.05 satisfies it (λ falls), cost 0.2 violates it (λ rises).
    assert make(rule=rule, cost_threshold_d=-0.1).update(0.05) < 1.0
    assert make(rule=rule, cost_threshold_d=-0.1).update(0.2) > 1.0


@pytest.mark.parametrize("rule", ["ema_log", "ppo_lag"])
def test_state_dict_json_round_trip_is_bit_identical(rule: str) -> None:
    costs = [0.3, -0.2, 0.7, 0.1, -0.4, 0.9, 0.05, -0.6]
    ref = make(rule=rule, cost_threshold_d=-0.1, lambda_init=0.5)
    first = make(rule=rule, cost_threshold_d=-0.1, lambda_init=0.5)
    for c in costs[:4]:
        ref.update(c)
        first.update(c)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(rule=rule, cost_threshold_d=-0.1, lambda_init=0.5)
    resumed.load_state_dict(state)
    assert resumed.value == ref.value
    ref_traj = [ref.update(c) for c in costs[4:]]
    res_traj = [resumed.update(c) for c in costs[4:]]
    assert res_traj == ref_traj
    assert resumed.state_dict() == ref.state_dict()


def test_load_rejects_different_rule() -> None:
    state = make(rule="ema_log").state_dict()
    with pytest.raises(ValueError, match="rule"):
        make(rule="ppo_lag").load_state_dict(state)


def test_load_warns_on_other_config_difference_and_keeps_current(caplog: pytest.LogCaptureFixture) -> None:
    saved = make(lambda_lr=0.1)
    saved.update(1.0)
    current = make(lambda_lr=0.2)
    with caplog.at_level(logging.WARNING, logger="alignment.lagrange"):
        current.load_state_dict(saved.state_dict())
    assert "lambda_lr" in caplog.text
    assert current.config.lambda_lr == 0.2
    assert current.value == saved.value


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_cost_raises(bad: float) -> None:
    ctrl = make()
    with pytest.raises(ValueError, match="mean_cost"):
        ctrl.update(bad)
    assert ctrl.last_stats()["steps"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lambda_min": 0.0}, "lambda_min"),
        ({"lambda_min": 6.0, "lambda_max": 5.0, "lambda_init": 5.0}, "lambda_min"),
        ({"lambda_init": 10.0}, "lambda_init"),
        ({"jc_ema_beta": 1.0}, "jc_ema_beta"),
        ({"jc_ema_beta": -0.1}, "jc_ema_beta"),
        ({"lambda_lr": -0.01}, "lambda_lr"),
        ({"rule": "sgd"}, "rule"),
        ({"cost_threshold_d": math.nan}, "cost_threshold_d"),
    ],
)
def test_config_validation_names_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LagrangeConfig(**kwargs)  # type: ignore[arg-type]


def test_penalised_arithmetic() -> None:
    ctrl = LagrangeController(LagrangeConfig(lambda_init=0.5))
    assert ctrl.penalised(2.0, 3.0) == 0.5
    assert ctrl.penalised(1.0, -2.0) == 2.0
    assert ctrl.penalise([2.0, 1.0], [3.0, -2.0]) == [0.5, 2.0]
    with pytest.raises(ValueError, match="same length"):
        ctrl.penalise([1.0], [1.0, 2.0])


def test_ppo_lag_window_and_delay_exact_steps() -> None:
    # threshold 0.5 (d = -0.5), a window of 4 episodes, no λ update in the first step
    ctrl = make(rule="ppo_lag", lambda_lr=0.1, cost_threshold_d=-0.5, episode_cost_window_size=4,
                lambda_update_delay_steps=1)  # fmt: skip
    # step 0: window [1, 2, 3], mean 2, J_C = 1.5, delayed: λ stays 1
    assert ctrl.update_costs([1.0, 2.0, 3.0]) == 1.0
    assert ctrl.last_stats()["jc"] == 1.5 and ctrl.last_stats()["mean_cost"] == 2.0
    # step 1: window [2, 3, 0, 0], mean 1.25, J_C = 0.75: ln λ = 0 + 0.1·1·0.75 = 0.075
    assert ctrl.update_costs([0.0, 0.0]) == pytest.approx(math.exp(0.075), rel=1e-12)
    assert ctrl.last_stats()["window_cost"] == 1.25 and ctrl.last_stats()["mean_cost"] == 0.0
    # step 2: window [3, 0, 0, -4], mean -0.25, J_C = -0.75: ln λ = 0.075 + 0.1·e^0.075·(-0.75)
    lam = ctrl.update_costs([-4.0])
    assert lam == pytest.approx(math.exp(0.075 - 0.075 * math.exp(0.075)), rel=1e-12)  # ≈ 0.994176
    assert ctrl.state_dict()["window"] == [3.0, 0.0, 0.0, -4.0]


def test_ppo_lag_matches_safe_rlhf_sgd_on_log_lambda() -> None:
    """An independent replica of safe-rlhf's update (torch SGD on log λ, loss -(C̄ - threshold)·λ,
    then clamp_(max=ln λ_max)), in float64: the trajectories agree to rounding."""
    torch = pytest.importorskip("torch")
    from collections import deque

    threshold, lr, window, delay, lam_max = 0.2, 0.5, 6, 2, 3.0
    ctrl = make(rule="ppo_lag", lambda_lr=lr, cost_threshold_d=-threshold, episode_cost_window_size=window,
                lambda_update_delay_steps=delay, lambda_max=lam_max, lambda_init=0.5)  # fmt: skip
    log_lambda = torch.nn.Parameter(torch.tensor(math.log(0.5), dtype=torch.float64))
    opt = torch.optim.SGD([log_lambda], lr=lr)
    episode_costs: deque[float] = deque(maxlen=window)
    gen = torch.Generator().manual_seed(0)
    for global_step in range(12):
        costs = (torch.randn(3, generator=gen, dtype=torch.float64) * 2 + 1).tolist()
        episode_costs.extend(costs)
        if global_step >= delay:
            episode_cost = torch.tensor(list(episode_costs), dtype=torch.float64).mean()
            loss = -(episode_cost - threshold) * log_lambda.exp()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                log_lambda.clamp_(max=math.log(lam_max))
        assert ctrl.update_costs(costs) == pytest.approx(math.exp(log_lambda.item()), rel=1e-12)
    assert ctrl.value < 0.5 or ctrl.value == lam_max  # it moved


def test_window_needs_the_episode_costs_and_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="update_costs"):
        make(episode_cost_window_size=8).update(1.0)
    for name in ("episode_cost_window_size", "lambda_update_delay_steps"):
        with pytest.raises(ValueError, match=name):
            LagrangeConfig(**{name: -1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost"):
        make().update_costs([1.0, math.nan])
    # without a window, the step's costs and their mean give the same step
    a, b = make(rule="ppo_lag"), make(rule="ppo_lag")
    assert a.update_costs([0.5, 1.5, -1.0]) == b.update(1.0 / 3.0)


def test_delay_applies_to_the_ema_rule_too() -> None:
    ctrl = make(rule="ema_log", lambda_update_delay_steps=2)
    assert [ctrl.update(1.0), ctrl.update(1.0)] == [1.0, 1.0]
    assert ctrl.update(1.0) == pytest.approx(math.exp(0.1 * 1.0), rel=1e-12)  # EMA was kept: 1.0


def test_resume_mid_delay_with_a_window_is_bit_identical() -> None:
    kw = {"rule": "ppo_lag", "episode_cost_window_size": 5, "lambda_update_delay_steps": 3}
    steps = [[0.3, -0.2], [0.7], [0.1, -0.4, 0.9], [0.05], [-0.6, 0.2], [1.1, 0.4]]
    ref, first = make(**kw), make(**kw)
    for costs in steps[:2]:  # stop inside the delay, with a partly filled window
        ref.update_costs(costs)
        first.update_costs(costs)
    resumed = make(**kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.update_costs(c) for c in steps[2:]] == [ref.update_costs(c) for c in steps[2:]]
    assert resumed.state_dict() == ref.state_dict()
    assert resumed.last_stats()["steps"] == 6.0


def test_state_without_a_window_still_loads() -> None:
    """Checkpoints and ES replay entries written before the window existed."""
    old = {"log_lambda": 0.25, "jc_ema": 0.1, "steps": 4, "config": {"rule": "ema_log"}}
    ctrl = make()
    ctrl.load_state_dict(old)
    assert ctrl.value == math.exp(0.25) and ctrl.state_dict()["window"] == []


def test_recipes_accept_a_window_only_from_trainers_that_pass_episode_costs() -> None:
    from alignment.lagrange import LagrangeRecipe

    with pytest.raises(ValueError, match="episode_cost_window_size=16"):
        LagrangeRecipe(episode_cost_window_size=16).lagrange_config()

    class EpisodeRecipe(LagrangeRecipe):
        passes_episode_costs = True

    cfg = EpisodeRecipe(episode_cost_window_size=16, lambda_update_delay_steps=2).lagrange_config()
    assert (cfg.episode_cost_window_size, cfg.lambda_update_delay_steps) == (16, 2)
