"""Where an ES iteration's time goes: generation versus everything else.

    python bench/es_iteration.py                    # toy policy on CPU (a few minutes on 2 cores)
    python bench/es_iteration.py --model-shape 1b --device cuda --dtype bf16   # on a GPU
    python bench/es_iteration.py --noise lowrank                 # low-rank ES vs pure generate (transformers)
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python bench/es_iteration.py --noise lowrank --backend vllm

Builds (or reuses) the toy models, starts the real scorer on the toy reward/cost models, runs ES
(``run_es``) with the toy recipe's hyper-parameters (population 16, batch 16, 24 new tokens,
sigma 0.05, alpha 0.03) for ``--iterations``, then reads the run's ``logs/metrics.jsonl``, drops the
first ``--warmup`` iterations and reports the mean time per iteration split into generation,
perturb/restore, scoring wait (end of generation until all scores are back), update, sync and
other, each in ms and as a share of the iteration. Targets: the non-generation share
1 - sum(generation)/sum(iteration) is at most 10 % (scoring overlaps generation; perturbations are
regenerated from seeds), and 0 weight bytes are sent per iteration (ES ships seeds and coefficients,
never weights). It also reports the (prompt, response) pairs sent to the scorer per iteration with
the pair cache (each distinct pair once) beside those sent without it (every member's every pair,
population x batch), both from the same run's ``scoring/pairs_sent`` and ``scoring/pairs_total``.

``--noise lowrank`` (EGGROLL, :mod:`alignment.es.lowrank`) measures instead, in one run on ONE
engine and the same population x prompts x new tokens, interleaved iteration by iteration so that
machine load hits all three alike: (a) a pure batched ``generate`` of the population's sequences
(the iteration's prompts repeated once per member, unperturbed weights, no adapters, one call);
(b) a low-rank ES iteration (``ESTrainer.step``: members as adapters in one batched call, scoring,
update, λ, replay); (c) a full-rank ES iteration (member by member) on the same engine. The last
line prints ``throughput_ratio`` = ES tokens/s over pure-generate tokens/s (tokens of the answers,
counted with the policy's tokenizer, so members answering longer or shorter than θ do not bias it;
target >= 0.9), the plain time ratio beside it, and the full-rank iteration time with the speed-up.
With ``--backend vllm`` (run it with the vLLM environment's python) the engine is a LoRA-enabled
vLLM engine; with ``transformers`` the members are the forward-hook adapters.

``--model-shape 1b`` builds a randomly initialised ``LlamaForCausalLM`` of Llama-1B shape (hidden
2048, 16 layers, 32 heads, intermediate 5632) with the toy tokenizer, in bf16, under
``--models-dir/policy-1b``; its answers are noise but the cost of generating and perturbing is
realistic. The scorer keeps the toy reward/cost models. The last line printed is machine-readable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/es_iteration.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.es.config import ESConfig
from alignment.es.train_es_alignment import build_executor, run_es
from alignment.es.trainer import ESTrainer, batch_prompts
from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_scorer
from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS
from alignment.tracking import read_jsonl_metrics

logger = logging.getLogger("bench.es_iteration")

REPO = Path(__file__).resolve().parents[1]

SHAPE_1B = (2048, 16, 32, 5632)  # hidden, layers, heads, intermediate
STEP_PARTS = {  # what a low-rank comparison reports of each ES iteration
    "generate phase": "time/generate_phase", "scoring wait": "time/scoring_wait", "update": "time/update",
}  # fmt: skip
PARTS = {  # report label -> metrics.jsonl key
    "generation": "time/generation",
    "perturb/restore": "time/perturb_restore",
    "scoring wait": "time/scoring_wait",
    "update": "time/update",
    "sync": "time/sync",
}


def build_policy(shape: str, models_dir: Path) -> Path:
    """The policy folder for ``shape``; builds the toy models (and the 1B policy) when missing."""
    from alignment.toy.build import build_toy_models

    build_toy_models(models_dir)
    if shape == "toy":
        return models_dir / "policy"
    out = models_dir / "policy-1b"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        logger.info("reusing the 1b policy in %s", out)
        return out
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from alignment.toy.build import ToyShapes, llama_config

    hidden, layers, heads, inter = SHAPE_1B
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tokenizer")
    config = llama_config(ToyShapes(hidden, heads, layers, inter, max_position_embeddings=4096), tokenizer)
    logger.info("building a random-initialised 1b LlamaForCausalLM (bf16) in %s", out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise fp32 weights
    try:
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    params = sum(p.numel() for p in model.parameters())
    logger.info("built %.2fB parameters in %.0f s", params / 1e9, time.perf_counter() - t0)
    return out


def summarise(records: list[dict], warmup: int) -> dict:
    """Per-iteration means (seconds) of the timed parts, after dropping ``warmup`` iterations."""
    rows = [r for r in records if r.get("time/iteration") is not None]
    rows.sort(key=lambda r: r["step"])
    kept = rows[warmup:] if len(rows) > warmup else rows[-1:]
    if not kept:
        raise RuntimeError("metrics.jsonl holds no iteration timings")
    mean = {label: statistics.fmean(r.get(key) or 0.0 for r in kept) for label, key in PARTS.items()}
    mean["iteration"] = statistics.fmean(r["time/iteration"] for r in kept)
    mean["other"] = mean["iteration"] - sum(mean[label] for label in PARTS)
    total_iteration = sum(r["time/iteration"] for r in kept)
    total_generation = sum(r.get("time/generation") or 0.0 for r in kept)
    return {
        "iterations_kept": len(kept),
        "iterations_logged": len(rows),
        "mean_s": mean,
        "generate_phase_s": statistics.fmean(r.get("time/generate_phase") or 0.0 for r in kept),
        "non_generation_share": 1.0 - total_generation / total_iteration,
        "weight_bytes_per_iteration": statistics.fmean(r.get("sync/weight_bytes_sent") or 0.0 for r in kept),
        "pairs_sent": statistics.fmean(r.get("scoring/pairs_sent") or 0.0 for r in kept),
        "pairs_without_cache": statistics.fmean(r.get("scoring/pairs_total") or 0.0 for r in kept),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=["toy", "1b"], default="toy", help="policy shape")
    p.add_argument("--models-dir", type=Path, default=REPO / "bench/results/toy-models")
    p.add_argument("--experiment-dir", type=Path, default=REPO / "bench/results/es-runs")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="first iterations left out of the means")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--num-engines", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--scorer-threads", type=int, default=1, help="torch CPU threads of the scorer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=0.05, help="noise scale (toy recipe: 0.05)")
    p.add_argument("--antithetic", action="store_true", help="antithetic pairs (θ ± σε)")
    p.add_argument(
        "--noise",
        choices=["full", "lowrank"],
        default="full",
        help="lowrank: ES iteration vs pure batched generate vs full-rank ES on one engine",
    )
    p.add_argument("--noise-rank", type=int, default=4)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per iteration")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the scorer to load")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    started = time.perf_counter()
    policy = build_policy(args.model_shape, args.models_dir)
    logs = args.experiment_dir / "scorer"
    logs.mkdir(parents=True, exist_ok=True)
    with start_scorer(
        args.models_dir / "reward",
        args.models_dir / "cost",
        address_file=logs / "address.json",
        log_file=logs / "scorer.log",
        timeout=args.start_timeout,
        num_threads=args.scorer_threads,
    ) as proc:
        if args.noise == "lowrank":
            print_lowrank(args, compare_lowrank(args, policy, proc.url), time.perf_counter() - started)
            return 0
        cfg = ESConfig(
            policy_model_path=str(policy), backend=args.backend, executor=args.executor,
            num_engines=args.num_engines, device=args.device, dtype=args.dtype,
            population_size=args.population, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            sigma=args.sigma, alpha=0.03, antithetic=args.antithetic,
            temperature=0.0, lambda_cost=1.0, lambda_adapt=True, cost_threshold_d=0.0, lambda_lr=0.05,
            eval_max_prompts=24, num_iterations=args.iterations, save_every=max(10, args.iterations),
            seed=args.seed, scorer_url=proc.url, experiment_dir=str(args.experiment_dir),
            run_name=f"bench-{args.model_shape}",
        )  # fmt: skip
        t_run = time.perf_counter()
        results = run_es(cfg)
        run_seconds = time.perf_counter() - t_run
    run_dir = Path(results["run_dir"])
    summary = summarise(read_jsonl_metrics(run_dir / "logs/metrics.jsonl"), args.warmup)
    mean = summary["mean_s"]
    iteration = mean["iteration"]
    share = summary["non_generation_share"]
    weight_bytes = summary["weight_bytes_per_iteration"]

    print(f"\nES iteration breakdown ({args.model_shape} policy, backend={args.backend}, "
          f"executor={args.executor}, engines={args.num_engines}, device={args.device}, dtype={args.dtype})")  # fmt: skip
    print(f"  run: {run_dir}")
    print(f"  population {args.population} x batch {args.batch_size} x {args.max_new_tokens} new tokens, "
          f"sigma {args.sigma}, antithetic {args.antithetic}; "
          f"{summary['iterations_logged']} iteration(s), "
          f"means over the last {summary['iterations_kept']} (warm-up {args.warmup} dropped)")  # fmt: skip
    for label in ("iteration", *PARTS, "other"):
        print(f"    {label:<16} {mean[label] * 1e3:10.1f} ms  {100 * mean[label] / iteration:6.1f} %")
    print(f"    (generate phase, wall: {summary['generate_phase_s'] * 1e3:.1f} ms)")
    verdict = "ok" if share <= 0.10 else "ABOVE TARGET"
    print(f"  non-generation share: {100 * share:.1f} % (target <= 10 %: {verdict})")
    print(f"  weight bytes sent per iteration: {weight_bytes:.0f} (target 0: "
          f"{'ok' if weight_bytes == 0 else 'ABOVE TARGET'})")  # fmt: skip
    sent, without = summary["pairs_sent"], summary["pairs_without_cache"]
    print(f"  pairs sent to the scorer per iteration: {sent:.1f} with the pair cache, {without:.0f} without "
          f"({100 * (1 - sent / without):.1f} % duplicates)")  # fmt: skip
    print(
        f"  ES run {run_seconds:.0f} s (with evals); total bench time {time.perf_counter() - started:.0f} s"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"config": {k: str(v) for k, v in vars(args).items()}, "run_dir": str(run_dir), **summary}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"es_iteration: non_generation_share={100 * share:.1f}% "
          f"weight_bytes_per_iteration={weight_bytes:.0f} iteration_ms={iteration * 1e3:.0f} "
          f"pairs_sent={sent:.1f}/{without:.0f} (with/without pair cache, ratio {sent / without:.3f})")  # fmt: skip
    return 0


def compare_lowrank(args: argparse.Namespace, policy: Path, scorer_url: str) -> dict:
    """(a) pure batched generate, (b) low-rank ES iteration, (c) full-rank ES iteration, interleaved on
    one engine for ``args.iterations`` iterations; means (s, tokens) over the kept iterations."""
    from transformers import AutoTokenizer

    rows = args.population * args.batch_size
    common = dict(
        policy_model_path=str(policy), backend=args.backend, executor=args.executor, num_engines=args.num_engines,
        device=args.device, dtype=args.dtype, population_size=args.population, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, sigma=args.sigma, alpha=0.03, antithetic=args.antithetic,
        temperature=0.0, lambda_cost=1.0, lambda_adapt=True, lambda_lr=0.05, seed=args.seed,
        gen_batch_size=rows, noise_rank=args.noise_rank, save_every=10**6,
    )  # fmt: skip
    configs = {mode: ESConfig(**common, noise=mode) for mode in ("lowrank", "full")}
    executor = build_executor(configs["lowrank"])  # a vLLM engine started for low-rank serves both modes
    tokenizer = AutoTokenizer.from_pretrained(policy)
    count = lambda texts: sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)  # noqa: E731
    client = ScorerClient(scorer_url)
    trainers, answers = {}, {}
    for mode, cfg in configs.items():
        trainers[mode] = ESTrainer(cfg, executor, client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4],
                                   args.experiment_dir / f"lowrank-bench-{mode}-{time.strftime('%Y%m%d_%H%M%S')}")  # fmt: skip
        answers[mode] = []

        def recording(*a, _original=trainers[mode].score_population, _store=answers[mode], **k):
            scores, responses, timings = _original(*a, **k)
            _store.append([r for member in responses for r in member])
            return scores, responses, timings

        trainers[mode].score_population = recording
    samples: dict[str, list[tuple[float, int]]] = {"generate": [], "lowrank": [], "full": []}
    parts: dict[str, list[dict[str, float]]] = {"lowrank": [], "full": []}
    try:
        for i in range(args.iterations):
            prompts = batch_prompts(TOY_TRAIN_PROMPTS, args.seed, i, args.batch_size)
            settings = trainers["lowrank"].settings
            t0 = time.perf_counter()
            pure = executor.generate(prompts * args.population, settings)
            samples["generate"].append((time.perf_counter() - t0, count(pure)))
            for mode in ("lowrank", "full"):
                metrics = trainers[mode].step(i)
                samples[mode].append((metrics["time/iteration"], count(answers[mode][-1])))
                parts[mode].append({k: metrics[v] for k, v in STEP_PARTS.items()})
            logger.info("iteration %d: generate %.2f s, low-rank %.2f s, full %.2f s", i,
                        *(samples[k][-1][0] for k in ("generate", "lowrank", "full")))  # fmt: skip
    finally:
        executor.close()
        client.close()
    kept = {k: v[args.warmup :] or v[-1:] for k, v in samples.items()}
    report = {
        k: {"seconds": statistics.fmean(s for s, _ in v), "tokens": statistics.fmean(n for _, n in v)}
        for k, v in kept.items()
    }
    for mode, rows_of in parts.items():
        kept_parts = rows_of[args.warmup :] or rows_of[-1:]
        report[mode]["parts"] = {k: statistics.fmean(r[k] for r in kept_parts) for k in STEP_PARTS}
    return report | {"rows": rows, "iterations_kept": len(kept["generate"])}


def print_lowrank(args: argparse.Namespace, report: dict, total_seconds: float) -> None:
    gen, low, full = report["generate"], report["lowrank"], report["full"]
    tput = {k: v["tokens"] / v["seconds"] for k, v in (("generate", gen), ("lowrank", low), ("full", full))}
    ratio, time_ratio, speedup = (
        tput["lowrank"] / tput["generate"],
        gen["seconds"] / low["seconds"],
        (full["seconds"] / low["seconds"]),
    )
    print(f"\nLow-rank ES vs pure batched generate ({args.model_shape} policy, backend={args.backend}, "
          f"device={args.device}, dtype={args.dtype}, rank {args.noise_rank})")  # fmt: skip
    print(f"  one engine; {report['rows']} sequences per iteration (population {args.population} x "
          f"{args.batch_size} prompts) x <= {args.max_new_tokens} new tokens, sigma {args.sigma}; means over "
          f"{report['iterations_kept']} iteration(s) after {args.warmup} warm-up")  # fmt: skip
    for label, key in (("pure generate", "generate"), ("low-rank ES iteration", "lowrank"),
                       ("full-rank ES iteration", "full")):  # fmt: skip
        v = report[key]
        print(
            f"    {label:<24} {v['seconds'] * 1e3:9.1f} ms  {v['tokens']:8.0f} tokens  {tput[key]:9.0f} tok/s"
        )
        if "parts" in v:
            print("      " + ", ".join(f"{k} {ms * 1e3:.1f} ms" for k, ms in v["parts"].items()))
    verdict = "ok" if ratio >= 0.9 else "BELOW TARGET"
    # the multi-adapter generation alone (no scoring, update, λ): what the adapters cost the engine
    gen_ratio = (low["tokens"] / low["parts"]["generate phase"]) / tput["generate"]
    print(f"  generation-only throughput ratio (members as adapters vs no adapters): {gen_ratio:.3f}")
    print(f"  total bench time {total_seconds:.0f} s")
    print(f"es_iteration: noise=lowrank backend={args.backend} throughput_ratio={ratio:.3f} (target >= 0.9: "
          f"{verdict}; time ratio {time_ratio:.3f}; generation only {gen_ratio:.3f}) lowrank_iteration_ms={low['seconds'] * 1e3:.0f} "
          f"generate_ms={gen['seconds'] * 1e3:.0f} full_iteration_ms={full['seconds'] * 1e3:.0f} "
          f"speedup={speedup:.2f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
