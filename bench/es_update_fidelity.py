"""How much of the ES update survives bf16 weights: with and without the fp32 master, side by side.

    python bench/es_update_fidelity.py                      # Llama-shaped, scaled down (CPU, ~3 min)
    python bench/es_update_fidelity.py --hidden 4096 --intermediate 11008 --vocab 32000 --layers 1 \\
        --device cuda                                       # one real Llama-7B layer, on a GPU
    python bench/es_update_fidelity.py --compile --hidden 512 --intermediate 1376   # compiled noise on CPU

Llama-shaped bf16 weights (embeddings, per layer q/k/v/o, gate/up/down and two norms, final norm,
lm_head; matrices ~ N(0, 0.02²), norms 1) get 50 iterations of the real update
(:meth:`alignment.es.weights.PerturbableParams.apply_update`, the study's α = 5e-4, N = 30;
fitness is a fresh standard normal per member, z-scored, since only the update arithmetic is
measured) twice: ``bf16`` keeps the exact weights in bf16 (each update rounded into them, as
before), ``fp32`` keeps an fp32 master and rounds it into the live bf16 weights. The intended
cumulative update Σₜ α/N Σᵢ zᵢεᵢ is accumulated separately in float64. Reported per variant: the
cosine between the realised cumulative update (live weights − initial weights, what the engine
computes with) and the intended one, the same for the exact weights, the norm ratio, and the
fraction of entries that never moved (and, per iteration, that moved). The last line prints ``cosine_<variant>=X`` for both, for the
exact weights each variant keeps (for ``bf16`` they are the live weights), and
``cosine_fp32_live``: the live bf16 weights rounded from the fp32 master, which differ from it by
at most half an ulp per entry, whatever the number of iterations.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/es_update_fidelity.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.es.noise import combined_noise, set_compile_mode
from alignment.es.population import population, shape_fitness, update_terms
from alignment.es.weights import PerturbableParams


def llama_shapes(hidden: int, intermediate: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{m}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def initial_weights(shapes: dict[str, tuple[int, ...]], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        w = torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=gen)
        out[name] = w.to(torch.bfloat16).to(device)
    return out


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(cosine, ‖a‖/‖b‖) over all tensors, in float64."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(a[k].double().square().sum()) for k in a))
    nb = math.sqrt(sum(float(b[k].double().square().sum()) for k in b))
    return dot / (na * nb), na / nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--alpha", type=float, default=5e-4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the noise kernel (same numbers)")
    args = p.parse_args(argv)
    if args.compile:
        set_compile_mode("1")

    shapes = llama_shapes(args.hidden, args.intermediate, args.vocab, args.layers)
    init = initial_weights(shapes, args.device)
    numel = sum(t.numel() for t in init.values())
    variants = {"bf16": "model", "fp32": "fp32"}
    live = {v: {k: t.clone() for k, t in init.items()} for v in variants}
    params = {v: PerturbableParams(live[v], master_dtype=m) for v, m in variants.items()}
    moved = {v: {k: torch.zeros_like(t, dtype=torch.bool) for k, t in init.items()} for v in variants}
    intended = {k: torch.zeros(t.shape, dtype=torch.float64, device=args.device) for k, t in init.items()}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    changed: dict[str, list[float]] = {v: [] for v in variants}
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    print(f"{numel / 1e6:.1f}M Llama-shaped bf16 weights (hidden {args.hidden}, intermediate "
          f"{args.intermediate}, vocab {args.vocab}, {args.layers} layers) on {args.device}; "
          f"{args.iterations} iterations, N={args.population}, alpha={args.alpha}")  # fmt: skip
    for it in tqdm(range(args.iterations), desc="updates"):
        members = population(0, it, args.population)
        z = shape_fitness(rng.standard_normal(args.population), "zscore")
        seeds, coefs, scale = update_terms(members, z, args.alpha)
        for v in variants:
            before = {k: t.clone() for k, t in live[v].items()}
            stats = params[v].apply_update(seeds, coefs, scale).metrics()
            ratios[v].append(stats["update/realised_intended_ratio"])
            changed[v].append(stats["update/fraction_changed"])
            for k, t in live[v].items():
                moved[v][k] |= t != before[k]
        for k, shape in shapes.items():
            intended[k] += scale * combined_noise(seeds, coefs, k, shape, args.device).double()
    results = {}
    for v in variants:
        realised = {k: live[v][k].double() - init[k].double() for k in init}
        exact = {k: params[v].master[k].double() - init[k].double() for k in init}
        cos_live, norm_live = cosine(realised, intended)
        cos_exact, _ = cosine(exact, intended)
        never = 1.0 - sum(int(m.sum()) for m in moved[v].values()) / numel
        results[v] = cos_exact
        results[f"{v}_live"] = cos_live
        print(f"  {v}: cosine(realised, intended) = {cos_live:.5f} (live weights), {cos_exact:.5f} (exact "
              f"weights); norm ratio {norm_live:.4f}; never moved {100 * never:.1f} %; per iteration: "
              f"{100 * np.mean(changed[v]):.1f} % of entries moved, realised/intended norm "
              f"{np.mean(ratios[v]):.3f}")  # fmt: skip
    print(f"  {time.perf_counter() - t0:.0f} s")
    print(f"cosine_bf16={results['bf16']:.5f} cosine_fp32={results['fp32']:.5f} "
          f"cosine_fp32_live={results['fp32_live']:.5f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
