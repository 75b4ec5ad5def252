"""Shared fixtures: tiny models built once per session, real scorer processes on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignment.scoring.launch import ScorerProcess, start_scorer  # noqa: E402
from alignment.toy.build import build_toy_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference beside the checkout; ALIGNMENT_REFERENCE points elsewhere (e.g. from a git worktree)
SHARED_REFERENCE = Path(os.environ.get("ALIGNMENT_REFERENCE") or REPO.parent / "shared" / "reference")


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer, policy and reward/cost models in both Beaver layouts.

    Built in the session's temporary folder, or reused from ``$ALIGNMENT_TEST_MODELS`` when set
    (``make test`` shares one build between the main and the vLLM environment); tests never write
    into it.
    """
    shared = os.environ.get("ALIGNMENT_TEST_MODELS")
    return build_toy_models(Path(shared) if shared else tmp_path_factory.mktemp("toy-models"))


@pytest.fixture(scope="session")
def scorer(toy_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerProcess]:
    """One real scorer service (current layout, no token) shared by read-only tests."""
    logs = tmp_path_factory.mktemp("scorer")
    with start_scorer(
        toy_models / "reward", toy_models / "cost", logs / "address.json", log_file=logs / "scorer.log"
    ) as proc:
        yield proc


@pytest.fixture(scope="session")
def exact_scorer(toy_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerProcess]:
    """A scorer whose scores do not depend on which requests share a batch (one row per forward).

    With batching, the same text can score differently in the last bits depending on its row in
    the batch (matmul kernels block rows differently); tests that compare ES runs bit for bit use
    this scorer. One thread too, whatever the test's environment, so that scorers started elsewhere
    with the same two flags (the SLURM replicas of test_multinode.py) score every text alike.
    """
    logs = tmp_path_factory.mktemp("exact-scorer")
    with start_scorer(
        toy_models / "reward",
        toy_models / "cost",
        logs / "address.json",
        extra_args=["--max-batch-size", "1", "--num-threads", "1"],
        log_file=logs / "scorer.log",
    ) as proc:
        yield proc


@pytest.fixture
def scorer_factory(toy_models: Path, tmp_path: Path) -> Iterator:
    """Start scorers with extra flags; every one is stopped at the end of the test."""
    started: list[ScorerProcess] = []

    def start(
        *extra: str, address_file: Path | None = None, reward: str = "reward", cost: str = "cost"
    ) -> ScorerProcess:
        proc = start_scorer(
            toy_models / reward,
            toy_models / cost,
            address_file or tmp_path / f"address-{len(started)}.json",
            extra_args=extra,
            log_file=tmp_path / f"scorer-{len(started)}.log",
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def char_diffusion_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny synthetic character-diffusion pipeline, built once: paths of its text, prepared data,
    generator checkpoint and judge checkpoint (alignment.char_diffusion.build.TINY, a few seconds)."""
    from alignment.char_diffusion.build import TINY, build

    return build(tmp_path_factory.mktemp("char-diffusion"), TINY)


@pytest.fixture(scope="session")
def persona_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny T5 reader, BERT retriever and synthetic persona task (alignment.persona.toy)."""
    from alignment.persona.toy import build_persona_toy

    shared = os.environ.get("ALIGNMENT_TEST_MODELS")
    return build_persona_toy(Path(shared) / "persona" if shared else tmp_path_factory.mktemp("persona-toy"))


@pytest.fixture(scope="session")
def guarded_scorer(toy_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerProcess]:
    """A scorer with tight protections, to see them act: 128 file descriptors (so about 32
    connections), a 64-item queue, 1 s for headers and for a body."""
    logs = tmp_path_factory.mktemp("guarded-scorer")
    with start_scorer(
        toy_models / "reward",
        toy_models / "cost",
        logs / "address.json",
        extra_args=["--max-queue-items", "64", "--header-timeout", "1", "--body-timeout", "1"],
        log_file=logs / "scorer.log",
        env={"SCORER_TEST_NOFILE": "128"},
        module="tests.faulty_scorer",
    ) as proc:
        yield proc
