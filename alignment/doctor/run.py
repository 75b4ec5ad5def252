"""The doctor's run: the checks in order, each in its own process under its own limit, the shared scorer
for ES and GRPO, and the report (:class:`alignment.doctor.report.DoctorReport`)."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignment.cli import UserError
from alignment.doctor.checks import CHECKS
from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult, DoctorReport
from alignment.doctor.runner import run_check

logger = logging.getLogger(__name__)
NEEDS_MODELS = ("scorer", "es", "grpo")


@dataclass
class Options:
    device: str = "auto"  # auto, cuda or cpu
    policy_shape: str = "toy"
    policy: str | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    score_shape: str | None = None  # default: the policy's shape (1b when --policy is a path)
    quick: bool = False
    models_dir: str = "models/toy"
    out_dir: str | None = None  # default logs/doctor/<timestamp>
    only: tuple[str, ...] = ()
    limits: dict[str, float] = field(default_factory=dict)
    scorer_threads: int = 1
    scorer_start_timeout: float = 900.0


def check_names(opts: Options) -> None:
    unknown = sorted(set(opts.only) - set(CHECKS)) + sorted(set(opts.limits) - set(CHECKS))
    if unknown:
        raise UserError(f"no check named {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda, but torch {torch.__version__} sees no GPU "
                        f"(CUDA build: {torch.version.cuda or 'none, a CPU build'}); use --device cpu")  # fmt: skip
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device must be auto, cuda or cpu, got {device!r}")
    return device


def context(opts: Options, device: str, out_dir: Path) -> Context:
    """The checks' context; shapes are checked here (a 7b on a CPU is refused before anything runs)."""
    from alignment.toy.shapes import check_shape

    policy_label = opts.policy or opts.policy_shape
    score_label = opts.score_shape or (opts.policy_shape if opts.policy is None else "1b")
    if opts.reward_model and opts.cost_model:
        score_label = "given"
    for label, given in (
        (opts.policy_shape, opts.policy),
        (score_label, opts.reward_model and opts.cost_model),
    ):
        if not given and label != "toy":
            check_shape(label, device)
    for flag, path in (("--policy", opts.policy), ("--reward-model", opts.reward_model),
                       ("--cost-model", opts.cost_model)):  # fmt: skip
        if path is not None and not (Path(path) / "config.json").is_file():
            raise UserError(f"{flag} {path}: no config.json there (a Hugging Face model folder is expected)")
    return Context(device=device, quick=opts.quick, models_dir=str(opts.models_dir), out_dir=str(out_dir),
                   policy_label=policy_label, score_label=score_label, policy=opts.policy,
                   reward_model=opts.reward_model, cost_model=opts.cost_model,
                   scorer_threads=opts.scorer_threads)  # fmt: skip


def _skipped(name: str, reason: str) -> CheckResult:
    return CheckResult(name, CHECKS[name].title, "not run", reason=reason)


def run_doctor(opts: Options) -> DoctorReport:
    """Every selected check in order; a check that cannot run says why and the rest go on."""
    t0 = time.perf_counter()
    check_names(opts)
    device = resolve_device(opts.device)
    out_dir = Path(opts.out_dir or Path("logs/doctor") / time.strftime("%Y%m%d_%H%M%S"))
    ctx = context(opts, device, out_dir)  # bad flags are refused before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = [n for n in CHECKS if not opts.only or n in opts.only or (n == "models" and any(
        c in opts.only for c in NEEDS_MODELS + ("models",)))]  # fmt: skip
    results: list[CheckResult] = []
    scorer, models_ready = None, False
    try:
        for name in CHECKS:
            spec = CHECKS[name]
            if name not in selected:
                results.append(_skipped(name, "not selected (--only)"))
                continue
            if name in NEEDS_MODELS and not models_ready:
                results.append(_skipped(name, "the models check did not pass"))
                continue
            if spec.needs_scorer and scorer is None:
                scorer, why = _start_scorer(ctx, opts)
                if scorer is None:
                    results.append(_skipped(name, why))
                    continue
                ctx.scorer_url = scorer.url
            limit = opts.limits.get(name, spec.quick_limit_s if opts.quick else spec.limit_s)
            logger.info("doctor: %s (limit %.0f s)", name, limit)
            result = run_check(name, ctx, limit)
            logger.info("doctor: %s %s in %.1f s", name, result.status, result.seconds)
            results.append(result)
            if name == "models" and result.status == "passed":
                models_ready = True
                ctx.policy, ctx.reward_model, ctx.cost_model = (
                    result.data[k] for k in ("policy", "reward_model", "cost_model")
                )
    finally:
        if scorer is not None:
            scorer.stop()
    setup = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": platform.node(), "quick": opts.quick,
        "policy": f"{ctx.policy_label} ({ctx.policy or 'not built'})",
        "score models": f"{ctx.score_label} (reward {ctx.reward_model or '-'}, cost {ctx.cost_model or '-'})",
        "logs": str(out_dir),
    }  # fmt: skip
    return DoctorReport(device, setup, results, time.perf_counter() - t0)


def _start_scorer(ctx: Context, opts: Options):
    """The scorer ES and GRPO score against, on the chosen models and device; (process, None) or
    (None, why it did not start)."""
    from alignment.scoring.launch import start_scorer

    logs = Path(ctx.out_dir) / "scorer-shared"
    logs.mkdir(parents=True, exist_ok=True)
    flags = ["--device", "cuda" if ctx.on_gpu else "cpu"]
    env = None if ctx.on_gpu else {"CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = start_scorer(ctx.reward_model, ctx.cost_model, address_file=logs / "address.json", extra_args=flags,
                            log_file=logs / "scorer.log", timeout=opts.scorer_start_timeout, env=env,
                            num_threads=ctx.scorer_threads)  # fmt: skip
    except (RuntimeError, TimeoutError, OSError) as exc:
        return None, f"the shared scorer did not start: {' '.join(str(exc).split())[:400]}"
    return proc, None
