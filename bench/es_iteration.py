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

``--compare-noise`` measures the ES noise's cost instead: three engines of the same policy in one
process, their ES iterations interleaved iteration by iteration: one drawing each member's
full-rank noise at its perturbation with the previous all-int64 formulation (``bench/noise_int64.py``,
checked bit-equal first, so all three generate the same answers), one drawing the same way with the
current formulation, and one with the current formulation drawing the iteration's noise ahead in a
background thread while members generate (the default on CPU). The last line prints the three
non-generation shares and perturb/restore times.

``--model-shape 1b`` builds a randomly initialised ``LlamaForCausalLM`` of Llama-1B shape
(:mod:`alignment.toy.shapes`) with the toy tokenizer, in bf16, under ``--models-dir/policy-1b``; its
answers are noise but the cost of generating and perturbing is realistic. The scorer keeps the toy
reward/cost models. The measuring itself is :mod:`alignment.es.measure` (the doctor uses it too).
The last line printed is machine-readable.
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

from alignment.es import measure
from alignment.es.config import ESConfig
from alignment.es.train_es_alignment import build_executor, run_es
from alignment.es.trainer import ESTrainer
from alignment.scoring.client import ScorerClient
from alignment.scoring.launch import start_scorer
from alignment.toy.objective import TOY_EVAL_PROMPTS, TOY_TRAIN_PROMPTS
from alignment.tracking import read_jsonl_metrics

logger = logging.getLogger("bench.es_iteration")

REPO = Path(__file__).resolve().parents[1]
PARTS = ("generation", "perturb/restore", "scoring wait", "update", "sync")


def build_policy(shape: str, models_dir: Path, device: str = "cpu") -> Path:
    """The policy folder for ``shape``; builds the toy models (and the random 1b policy) when missing."""
    from alignment.toy.build import build_toy_models
    from alignment.toy.shapes import build_random_policy

    build_toy_models(models_dir)
    if shape == "toy":
        return models_dir / "policy"
    return build_random_policy(shape, models_dir, device="cuda" if device.startswith("cuda") else "cpu")


def summarise(records: list[dict], warmup: int) -> dict:
    """Per-iteration means (seconds) of a run's ``metrics.jsonl``, after dropping ``warmup`` iterations."""
    rows = sorted((r for r in records if r.get("time/iteration") is not None), key=lambda r: r["step"])
    kept = rows[warmup:] if len(rows) > warmup else rows[-1:]
    if not kept:
        raise RuntimeError("metrics.jsonl holds no iteration timings")
    summary = measure.summarise(kept)
    mean = {label: summary["parts"].get(label, 0.0) for label in PARTS}
    mean["iteration"] = summary["seconds"]
    mean["other"] = mean["iteration"] - sum(mean[label] for label in PARTS)
    return {
        "iterations_kept": len(kept),
        "iterations_logged": len(rows),
        "mean_s": mean,
        "generate_phase_s": summary["parts"].get("generate phase", 0.0),
        "non_generation_share": summary["non_generation_share"],
        "weight_bytes_per_iteration": statistics.fmean(r.get("sync/weight_bytes_sent") or 0.0 for r in kept),
        "pairs_sent": statistics.fmean(r.get("scoring/pairs_sent") or 0.0 for r in kept),
        "pairs_without_cache": statistics.fmean(r.get("scoring/pairs_total") or 0.0 for r in kept),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=["toy", "1b", "7b"], default="toy", help="policy shape (7b: GPU)")
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
    p.add_argument(
        "--compare-noise",
        action="store_true",
        help="full-rank ES with the int64 noise formulation vs the current",
    )
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
    policy = build_policy(args.model_shape, args.models_dir, args.device)
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
        if args.compare_noise:
            print_noise(args, compare_noise(args, policy, proc.url), time.perf_counter() - started)
            return 0
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


def _configs(args: argparse.Namespace, policy: Path, modes: tuple[str, ...]) -> dict[str, ESConfig]:
    rows = args.population * args.batch_size
    common = dict(
        policy_model_path=str(policy), backend=args.backend, executor=args.executor, num_engines=args.num_engines,
        device=args.device, dtype=args.dtype, population_size=args.population, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, sigma=args.sigma, alpha=0.03, antithetic=args.antithetic,
        temperature=0.0, lambda_cost=1.0, lambda_adapt=True, lambda_lr=0.05, seed=args.seed,
        gen_batch_size=rows, noise_rank=args.noise_rank, save_every=10**6,
    )  # fmt: skip
    return {mode: ESConfig(**common, noise=mode) for mode in modes}


def _trainer(args: argparse.Namespace, cfg: ESConfig, executor, client: ScorerClient, tag: str) -> ESTrainer:
    run_dir = args.experiment_dir / f"{tag}-{time.strftime('%Y%m%d_%H%M%S')}"
    return ESTrainer(cfg, executor, client, TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS[:4], run_dir)


def _progress(i: int, done: dict[str, dict[str, float]]) -> None:
    logger.info("iteration %d: %s", i, ", ".join(f"{k} {m['time/iteration']:.2f} s" for k, m in done.items()))


def compare_lowrank(args: argparse.Namespace, policy: Path, scorer_url: str) -> dict:
    """(a) pure batched generate, (b) low-rank ES iteration, (c) full-rank ES iteration, interleaved on
    one engine for ``args.iterations`` iterations (:func:`alignment.es.measure.interleaved`)."""
    from transformers import AutoTokenizer

    configs = _configs(args, policy, ("lowrank", "full"))
    executor = build_executor(configs["lowrank"])  # a vLLM engine started for low-rank serves both modes
    tokenizer = AutoTokenizer.from_pretrained(policy)
    client = ScorerClient(scorer_url)
    try:
        trainers = {
            mode: _trainer(args, cfg, executor, client, f"lowrank-bench-{mode}")
            for mode, cfg in configs.items()
        }
        steps = {"generate": measure.generate_step(executor, trainers["lowrank"], tokenizer)}
        steps.update({mode: measure.trainer_step(t, tokenizer) for mode, t in trainers.items()})
        report = measure.interleaved(steps, args.iterations, args.warmup, _progress)
    finally:
        executor.close()
        client.close()
    return report | {"rows": args.population * args.batch_size}


def compare_noise(args: argparse.Namespace, policy: Path, scorer_url: str) -> dict:
    """Full-rank ES iterations on three engines of ``policy``, interleaved: the int64 formulation of the
    noise drawn when a member is perturbed (before issue 22), the current formulation drawn the same
    way, and the current one drawn ahead in a background thread while members generate (the
    default). Same seeds, same values, same answers."""
    import noise_int64
    from transformers import AutoTokenizer

    noise_int64.check_equal()
    cfg = _configs(args, policy, ("full",))["full"]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    client = ScorerClient(scorer_url)
    with noise_int64.in_es_weights():  # the engine's block layout is built in the int64 form too
        old = build_executor(cfg)
    on_demand, ahead = build_executor(cfg), build_executor(cfg)
    for executor in (old, on_demand):
        executor.engines[0].prefetch = lambda seeds: None  # every member's noise drawn at its perturbation
    try:
        steps = {label: measure.trainer_step(_trainer(args, cfg, ex, client, f"noise-bench-{label}"), tokenizer)
                 for label, ex in (("int64", old), ("int32", on_demand), ("ahead", ahead))}  # fmt: skip

        def int64_step(i: int) -> dict[str, float]:
            with noise_int64.in_es_weights():
                return steps["int64"](i)

        return measure.interleaved({**steps, "int64": int64_step}, args.iterations, args.warmup, _progress)
    finally:
        for executor in (old, on_demand, ahead):
            executor.close()
        client.close()


def print_noise(args: argparse.Namespace, report: dict, total_seconds: float) -> None:
    old, new, ahead = report["int64"], report["int32"], report["ahead"]
    print(f"\nES noise: int64 formulation vs current, drawn on demand, vs current drawn ahead; full-rank ES "
          f"({args.model_shape} policy, backend={args.backend}, device={args.device}); population "
          f"{args.population} x batch {args.batch_size} x {args.max_new_tokens} new tokens; means over "
          f"{new['iterations']} interleaved iteration(s) after {args.warmup} warm-up")  # fmt: skip
    for label, r in (("int64 on demand", old), ("int32 on demand", new), ("int32 ahead", ahead)):
        parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["parts"].items())
        print(f"    {label:<16} iteration {r['seconds'] * 1e3:8.1f} ms, non-generation "
              f"{100 * r['non_generation_share']:5.1f} %  ({parts})")  # fmt: skip
    speed = old["parts"]["perturb/restore"] / new["parts"]["perturb/restore"]
    verdict = "ok" if ahead["non_generation_share"] <= 0.10 else "ABOVE TARGET"
    print(f"  total bench time {total_seconds:.0f} s")
    print(f"es_iteration: noise_compare non_generation_share int64={100 * old['non_generation_share']:.1f}% "
          f"int32={100 * new['non_generation_share']:.1f}% ahead={100 * ahead['non_generation_share']:.1f}% "
          f"(target <= 10 %: {verdict}) perturb_restore_ms int64={old['parts']['perturb/restore'] * 1e3:.0f} "
          f"int32={new['parts']['perturb/restore'] * 1e3:.0f} ahead={ahead['parts']['perturb/restore'] * 1e3:.0f} "
          f"int64/int32={speed:.2f}x")  # fmt: skip


def print_lowrank(args: argparse.Namespace, report: dict, total_seconds: float) -> None:
    gen, low, full = report["generate"], report["lowrank"], report["full"]
    ratio = measure.throughput_ratio(report)
    time_ratio, speedup = gen["seconds"] / low["seconds"], full["seconds"] / low["seconds"]
    print(f"\nLow-rank ES vs pure batched generate ({args.model_shape} policy, backend={args.backend}, "
          f"device={args.device}, dtype={args.dtype}, rank {args.noise_rank})")  # fmt: skip
    print(f"  one engine; {report['rows']} sequences per iteration (population {args.population} x "
          f"{args.batch_size} prompts) x <= {args.max_new_tokens} new tokens, sigma {args.sigma}; means over "
          f"{gen['iterations']} iteration(s) after {args.warmup} warm-up")  # fmt: skip
    for label, key in (("pure generate", "generate"), ("low-rank ES iteration", "lowrank"),
                       ("full-rank ES iteration", "full")):  # fmt: skip
        v = report[key]
        print(f"    {label:<24} {v['seconds'] * 1e3:9.1f} ms  {v['tokens']:8.0f} tokens  "
              f"{v['tokens_per_s']:9.0f} tok/s")  # fmt: skip
        if key != "generate":
            print("      " + ", ".join(f"{k} {s * 1e3:.1f} ms" for k, s in v["parts"].items()
                                       if k in ("generate phase", "scoring wait", "update")))  # fmt: skip
    verdict = "ok" if ratio >= 0.9 else "BELOW TARGET"
    # the multi-adapter generation alone (no scoring, update, λ): what the adapters cost the engine
    gen_ratio = (low["tokens"] / low["parts"]["generate phase"]) / gen["tokens_per_s"]
    print(f"  generation-only throughput ratio (members as adapters vs no adapters): {gen_ratio:.3f}")
    print(f"  total bench time {total_seconds:.0f} s")
    print(f"es_iteration: noise=lowrank backend={args.backend} throughput_ratio={ratio:.3f} (target >= 0.9: "
          f"{verdict}; time ratio {time_ratio:.3f}; generation only {gen_ratio:.3f}) lowrank_iteration_ms={low['seconds'] * 1e3:.0f} "
          f"generate_ms={gen['seconds'] * 1e3:.0f} full_iteration_ms={full['seconds'] * 1e3:.0f} "
          f"speedup={speedup:.2f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
