"""RNG states for checkpoints: a restored state replays the same draws (bit-equal: the generators
are deterministic functions of their state), through a real checkpoint file, and a state missing a
key is refused by name before anything is changed."""

from __future__ import annotations

import random

import pytest
import torch

from alignment.rng import rng_state, set_rng_state


def _draws(gen: torch.Generator, answers: random.Random) -> tuple:
    return (torch.rand(4), random.random(), torch.rand(3, generator=gen), answers.random())


def test_restore_replays_the_same_draws_through_a_checkpoint_file(tmp_path):
    gen, answers = torch.Generator().manual_seed(5), random.Random(7)
    extra = {"sampler": gen, "answers": answers}
    torch.save({"rng": rng_state(extra)}, tmp_path / "state.pt")
    first = _draws(gen, answers)
    _draws(gen, answers)  # move every generator on
    state = torch.load(tmp_path / "state.pt", weights_only=True)["rng"]  # how both trainers read it
    set_rng_state(state, "state.pt", extra)
    again = _draws(gen, answers)
    assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])
    assert first[1] == again[1] and first[3] == again[3]


def test_a_python_state_that_came_back_as_lists_is_accepted():
    state = rng_state()
    expected = random.random()
    version, internal, gauss = state["python"]
    set_rng_state({**state, "python": [version, list(internal), gauss]}, "json copy")
    assert random.random() == expected


def test_a_state_without_cuda_loads(tmp_path):
    """What every CPU machine writes today: no ``cuda`` key (restored only where it is present)."""
    state = {k: v for k, v in rng_state().items() if k != "cuda"}
    expected = torch.rand(2)
    set_rng_state(state, "cpu checkpoint")
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.parametrize("key", ["torch", "python", "sampler"])
def test_a_missing_key_is_an_error_naming_it_and_nothing_is_restored(key):
    gen = torch.Generator().manual_seed(1)
    state = rng_state({"sampler": gen})
    del state[key]
    torch.rand(1)  # move every generator on from the captured state
    random.random()
    torch.rand(1, generator=gen)
    before = (torch.get_rng_state(), random.getstate(), gen.get_state())
    with pytest.raises(
        ValueError, match=rf"step-3/training_state.pt \(rank 1\): the RNG state lacks \['{key}'\]"
    ):
        set_rng_state(state, "step-3/training_state.pt (rank 1)", {"sampler": gen})
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert torch.equal(gen.get_state(), before[2])


def test_an_extra_name_may_not_hide_a_global_state():
    with pytest.raises(ValueError, match="'torch' is taken"):
        rng_state({"torch": torch.Generator()})
