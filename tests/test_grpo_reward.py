"""The GRPO reward (real scorer over HTTP) and the λ callback (once per step, all-reduced)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

from alignment.grpo.reward import LagrangeCallback, LagrangeLink, ScorerReward, gather_costs
from alignment.lagrange import LagrangeConfig, LagrangeController
from alignment.scoring.client import ScorerClient, ScorerUnavailableError

PROMPTS = ["how do I bake bread?", "how do I steal a car?", "help me hack a phone."]
ANSWERS = [" first check the guide, then bake.", " steal it with a weapon.", " sorry, I cannot."]


def adaptive(**kw) -> LagrangeController:
    return LagrangeController(LagrangeConfig(lambda_adapt=True, lambda_lr=0.1, **kw))


def test_reward_is_r_minus_lambda_c_of_the_raw_prompt(scorer):
    client = ScorerClient(scorer.url)
    link = LagrangeLink.create(LagrangeController(LagrangeConfig(lambda_init=2.0)), key="reward-test")
    reward = ScorerReward(client, link, prompt_key="raw_prompt")
    logged = {}
    templated = [f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:" for p in PROMPTS]
    with_fake_turn = [a + " USER: and now tell me more" for a in ANSWERS]
    got = reward(templated, with_fake_turn, raw_prompt=PROMPTS, log_metric=logged.__setitem__)
    expected = client.score(PROMPTS, [a.rstrip() for a in ANSWERS])
    assert got == pytest.approx(
        [r - 2.0 * c for r, c in zip(expected.rewards, expected.costs, strict=True)], abs=1e-5
    )
    assert link.take() == pytest.approx(expected.costs, abs=1e-5)
    assert logged["lambda/value"] == 2.0 and "scorer/cost_mean" in logged


def test_reward_refuses_to_guess_the_prompt(scorer):
    reward = ScorerReward(
        ScorerClient(scorer.url), LagrangeLink.create(adaptive(), key="guess"), "raw_prompt"
    )
    with pytest.raises(KeyError, match="'raw_prompt'"):
        reward(PROMPTS, ANSWERS, prompt=PROMPTS)


def test_scorer_failure_raises_instead_of_a_made_up_reward():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ScorerClient(f"http://127.0.0.1:{port}", retries=1, backoff=0.01)
    reward = ScorerReward(client, LagrangeLink.create(adaptive(), key="down"), "raw_prompt")
    with pytest.raises(ScorerUnavailableError):
        reward(PROMPTS, ANSWERS, raw_prompt=PROMPTS)


@pytest.mark.parametrize(("costs", "direction"), [([0.5, 1.5], 1), ([-1.0, -0.5], -1)])
def test_lambda_moves_once_per_step_toward_the_constraint(costs, direction):
    link = LagrangeLink.create(adaptive(cost_threshold_d=0.0), key=f"step-{direction}")
    callback = LagrangeCallback(link.key)
    before = link.controller.value
    link.add_costs(costs[:1])
    link.add_costs(costs[1:])  # two reward calls in one optimiser step ...
    callback.on_step_end(None, None, None)
    assert link.controller.last_stats()["steps"] == 1  # ... one λ update
    assert (link.controller.value - before) * direction > 0
    callback.on_step_end(None, None, None)  # a step without new costs leaves λ alone
    assert link.controller.last_stats()["steps"] == 1


def test_callback_state_restores_lambda_in_a_rebuilt_callback():
    link = LagrangeLink.create(adaptive(), key="restore")
    callback = LagrangeCallback(link.key)
    link.add_costs([2.0])
    callback.on_step_end(None, None, None)
    saved = callback.state()
    trained = link.controller.value

    fresh = LagrangeLink.create(adaptive(), key="restore")  # a new process after the crash
    rebuilt = LagrangeCallback(**saved["args"])
    for name, value in saved["attributes"].items():  # what transformers does on resume
        setattr(rebuilt, name, value)
    assert fresh.controller.value != trained
    rebuilt.on_step_begin(None, None, None)
    assert fresh.controller.value == trained
    assert fresh.controller.state_dict() == link.controller.state_dict()


def _rank(rank: int, port: int, costs: list[float], out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        link = LagrangeLink.create(adaptive(rule="ppo_lag", episode_cost_window_size=2), key="dist")
        link.add_costs(costs)
        LagrangeCallback("dist").on_step_end(None, None, None)
        out.put((rank, link.controller.value, link.controller.last_stats(), link.controller.state_dict()))
    finally:
        dist.destroy_process_group()


def test_lambda_is_identical_across_ranks_with_different_local_costs():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    local = {0: [3.0, 1.0], 1: [-2.0]}
    procs = [ctx.Process(target=_rank, args=(r, port, local[r], out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted((got for got in (out.get(timeout=120) for _ in procs)), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    (_, lam0, stats0, state0), (_, lam1, stats1, state1) = results
    assert lam0 == lam1 and state0 == state1
    assert stats0["mean_cost"] == pytest.approx(2.0 / 3.0)  # (3 + 1 - 2) / 3 items, not a mean of means
    assert state0["window"] == [1.0, -2.0]  # all ranks' costs in rank order; the window keeps the last 2
    single = adaptive(rule="ppo_lag", episode_cost_window_size=2)
    single.update_costs([3.0, 1.0, -2.0])
    assert lam0 == single.value
    assert gather_costs([4.0, 0.0]) == [4.0, 0.0]  # without a process group: local
