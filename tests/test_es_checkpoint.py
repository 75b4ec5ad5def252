"""Replay log and atomic checkpoints: any iteration rebuilds bit-identically from the base model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.es.checkpoint import (
    LEGACY_NOISE,
    ReplayEntry,
    ReplayLog,
    check_numerics,
    find_latest,
    load_latest,
    replay_updates,
    save_final,
    save_latest,
)
from alignment.es.engines import TransformersEngine
from alignment.es.noise import NOISE_ID, NoiseMismatchError

UPDATES = [([1, 2, 3], [0.5, -1.0, 0.25]), ([4, 5], [1.2, -0.7]), ([6], [2.0]), ([7, 8], [-0.3, 0.9])]


def entries(noise: str = LEGACY_NOISE):
    return [ReplayEntry(i, s, c, 0.01, {"log_lambda": 0.0}, noise=noise) for i, (s, c) in enumerate(UPDATES)]


@pytest.fixture
def engine(toy_models):
    return TransformersEngine(str(toy_models / "policy"), dtype="bf16")


def test_replay_log_round_trip_and_truncated_tail(tmp_path):
    log = ReplayLog(tmp_path / "replay.jsonl")
    for e in entries():
        log.append(e)
    assert log.read() == entries()
    with open(log.path, "a") as f:
        f.write('{"iteration": 4, "seeds": [1')  # killed mid-write
    assert log.read() == entries()
    log.truncate_after(1)
    assert [e.iteration for e in log.read()] == [0, 1]


def test_torn_last_line_survives_two_resumes(tmp_path):
    """A crash mid-append leaves a fragment; each resume appends after repairing it, so the next
    resume still reads every committed entry (appending onto the fragment made it unreadable)."""
    log = ReplayLog(tmp_path / "replay.jsonl")
    for e in entries()[:2]:
        log.append(e)
    with open(log.path, "a") as f:
        f.write('{"iteration": 2, "seeds": [4')  # killed mid-write
    assert log.read() == entries()[:2]  # resume 1 redoes iteration 2 ...
    log.append(entries()[2])
    assert log.read() == entries()[:3]  # ... and resume 2 sees it
    with open(log.path, "a") as f:
        f.write(json.dumps(entries()[3].__dict__))  # killed before the newline: whole and committed
    assert log.read() == entries()
    log.append(ReplayEntry(4, [9], [1.0], 0.01, {"log_lambda": 0.0}))
    assert [e.iteration for e in log.read()] == [0, 1, 2, 3, 4]


def test_resume_refuses_other_noise_or_master_dtype(tmp_path):
    ours = [ReplayEntry(0, [1], [1.0], 0.01, {}, noise=NOISE_ID, master_dtype="fp32")]
    check_numerics(ours, {"noise": NOISE_ID, "master_dtype": "fp32"}, "fp32", "run")
    with pytest.raises(NoiseMismatchError, match=r"run/replay.jsonl \(iteration 0\): 'torch.randn/v0'"):
        check_numerics(entries()[:1], None, "model", "run")  # written before noise versions
    with pytest.raises(NoiseMismatchError, match="latest_hf"):
        check_numerics(ours, {"iteration": 0}, "fp32", "run")
    with pytest.raises(ValueError, match="--master_dtype fp32"):
        check_numerics(ours, None, "model", "run")


def test_replay_log_rejects_gaps_and_garbage(tmp_path):
    log = ReplayLog(tmp_path / "replay.jsonl")
    log.append(entries()[0])
    log.append(entries()[2])
    with pytest.raises(ValueError, match="iteration 2 follows 0"):
        log.read()
    log.path.write_text("garbage\n" + json.dumps(entries()[0].__dict__) + "\n")
    with pytest.raises(ValueError, match=":1 is not a replay entry"):
        log.read()


def test_replay_rebuilds_weights_bit_identically(toy_models, engine):
    for seeds, coefs in UPDATES:
        engine.perturb(seeds[0], 0.01)  # evaluation in between must not matter
        engine.restore()
        engine.apply_update(seeds, coefs, 0.01)
    fresh = TransformersEngine(str(toy_models / "policy"), dtype="bf16")
    assert replay_updates(fresh, entries(NOISE_ID)) == 3
    assert fresh.checksum() == engine.checksum()


def test_latest_checkpoint_loads_with_from_pretrained_and_resumes_exactly(toy_models, engine, tmp_path):
    run = tmp_path / "run"
    replay_updates(engine, entries(NOISE_ID)[:2])
    path = save_latest(run, engine.state_dict(), toy_models / "policy", {"iteration": 1, "lambda": 1.5})
    assert find_latest(run) == path
    # the checkpoint holds the exact fp32 weights; loaded in bf16 they are the engine's live weights
    assert {t.dtype for t in load_latest(run)[0].values()} == {torch.float32}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    live = dict(engine.model.named_parameters())
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in live.items())

    weights, state = load_latest(run)
    assert state == {"iteration": 1, "lambda": 1.5}
    resumed = TransformersEngine(str(toy_models / "policy"), dtype="bf16")
    resumed.load_state_dict(weights)
    replay_updates(resumed, entries(NOISE_ID)[2:])
    replay_updates(engine, entries(NOISE_ID)[2:])
    assert resumed.checksum() == engine.checksum()

    save_latest(run, engine.state_dict(), toy_models / "policy", {"iteration": 3})
    assert load_latest(run)[1] == {"iteration": 3}
    assert not (run / "model_saves" / "latest_hf.old").exists()


def test_interrupted_swap_falls_back_to_the_old_copy(toy_models, engine, tmp_path):
    run = tmp_path / "run"
    path = save_latest(run, engine.state_dict(), toy_models / "policy", {"iteration": 0})
    path.rename(path.with_name("latest_hf.old"))  # crash between the two renames
    assert load_latest(run)[1] == {"iteration": 0}
    assert load_latest(tmp_path / "empty") is None


def test_final_pth_is_a_plain_state_dict(engine, tmp_path):
    out = save_final(tmp_path, 12, engine.state_dict())
    assert out.name == "pytorch_model.pth" and out.parent.name == "final_model_iteration_12"
    loaded = torch.load(out)
    assert set(loaded) == set(engine.state_dict())
