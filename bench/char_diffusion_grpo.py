"""Character-diffusion GRPO: sampling k fills from one forward vs k forwards, and what GRPO does to
held-out judge reward and ground-truth fill accuracy.

    python bench/char_diffusion_grpo.py                     # demo models (built if needed), CPU
    python bench/char_diffusion_grpo.py --iterations 200 --group_size 16 --shape large

Part 1 times sampling ``group_size`` fills for each of ``batch`` masked inputs, two ways, alternating
for ``--rounds`` rounds (median per sampled fill):

- one forward: the generator runs once on the B inputs and the k fills are drawn from that one
  distribution (what ``train_grpo`` does; :mod:`alignment.char_diffusion.sampling`);
- k forwards: the B inputs are repeated k times and the generator runs on all B·k rows (what the
  anchor implementation did), one fill per row.

``--shape demo`` uses the demo generator (2 layers, 64 wide, 32 characters); ``--shape large``
a randomly initialised 6-layer, 384-wide generator on 256-character blocks (the recipe's shape).
Part 2 runs GRPO (the demo recipe, ``--iterations`` iterations) from the demo generator against the
demo judge and prints held-out judge reward and fill accuracy before and after. The last line holds
both results side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/char_diffusion_grpo.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alignment.char_diffusion.build import DEMO, build
from alignment.char_diffusion.checkpoint import load_model
from alignment.char_diffusion.config import GRPOConfig
from alignment.char_diffusion.demo import GRPO, HERE
from alignment.char_diffusion.model import Generator, ModelArgs
from alignment.char_diffusion.sampling import draw_fills, fill_distribution, place_fills
from alignment.char_diffusion.train_grpo import train_grpo
from alignment.config import load_config

SPECIALS = 3


@torch.no_grad()
def one_forward(
    gen: torch.nn.Module, inp: torch.Tensor, mask: torch.Tensor, k: int, banned, g
) -> torch.Tensor:
    dist, _ = fill_distribution(gen(inp).float(), mask, 0.8, 0.95, banned)
    return place_fills(inp, mask, draw_fills(dist, k, g))


@torch.no_grad()
def k_forwards(
    gen: torch.nn.Module, inp: torch.Tensor, mask: torch.Tensor, k: int, banned, g
) -> torch.Tensor:
    rows, rmask = inp.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    dist, _ = fill_distribution(gen(rows).float(), rmask, 0.8, 0.95, banned)
    return place_fills(rows, rmask, draw_fills(dist, 1, g))[:, 0].view(inp.shape[0], k, -1)


def time_sampling(gen: torch.nn.Module, vocab_size: int, block: int, batch: int, k: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size - SPECIALS, (batch, block), generator=g)
    mask = torch.rand(batch, block, generator=g) < 0.2
    inp = tokens.masked_fill(mask, vocab_size - SPECIALS)
    banned = tuple(range(vocab_size - SPECIALS, vocab_size))
    times: dict[str, list[float]] = {"one": [], "k": []}
    for _ in range(rounds):
        for name, fn in (("one", one_forward), ("k", k_forwards)):
            start = time.perf_counter()
            out = fn(gen, inp, mask, k, banned, g)
            times[name].append((time.perf_counter() - start) / (batch * k))
            assert out.shape == (batch, k, block)
    return {name: statistics.median(v[1:] if len(v) > 1 else v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", default="models/char_diffusion")
    p.add_argument("--shape", choices=("demo", "large"), default="demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=GRPO["max_iters"])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    paths = build(a.models_dir, DEMO)
    gen, vocab, _ = load_model(paths["generator"], "generator", "generator_checkpoint")
    if a.shape == "large":
        torch.manual_seed(0)
        gen = Generator(ModelArgs("generator", vocab.size, 256, n_layer=6, n_head=6, n_embd=384))
    gen.eval()
    block = gen.args.block_size
    t = time_sampling(gen, vocab.size, block, a.batch, a.group_size, a.rounds)
    ratio = t["k"] / t["one"]
    print(f"sampling {a.group_size} fills for each of {a.batch} masked inputs ({a.shape} generator, "
          f"{block} characters, {torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{'':14} {'ms per fill':>12}")
    print(f"{'one forward':14} {t['one'] * 1e3:12.4f}")
    print(f"{'k forwards':14} {t['k'] * 1e3:12.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(GRPOConfig, HERE / "grpo.yaml", {
            **GRPO, "dataset": paths["data"], "generator_checkpoint": paths["generator"],
            "judge_checkpoint": paths["judge"], "out_dir": tmp, "max_iters": a.iterations,
            "eval_interval": a.iterations, "sample_interval": 0, "group_size": a.group_size})  # fmt: skip
        evals = train_grpo(cfg)["evals"]
    (s0, before), (s1, after) = evals[0], evals[-1]
    print(
        f"\nGRPO on {cfg.eval_iters * cfg.eval_batch_size} held-out masked blocks ({a.iterations} iterations)"
    )
    print(f"{'':12} {'judge reward':>13} {'fill accuracy':>14}")
    print(f"{'iteration ' + str(s0):12} {before['mean_reward']:13.4f} {before['fill_accuracy']:14.4f}")
    print(f"{'iteration ' + str(s1):12} {after['mean_reward']:13.4f} {after['fill_accuracy']:14.4f}")
    print(f"one forward vs k={a.group_size} forwards: {t['one'] * 1e3:.4f} vs {t['k'] * 1e3:.4f} ms per fill "
          f"({ratio:.1f}x); judge reward {before['mean_reward']:.4f} -> {after['mean_reward']:.4f}, "
          f"fill accuracy {before['fill_accuracy']:.4f} -> {after['fill_accuracy']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
