"""Check that this node, the install and the models are ready for a long job, and measure them.

    python -m alignment.doctor                                   # the GPU (if any), toy models
    python -m alignment.doctor --policy-shape 7b --json doctor.json          # Llama-7B shapes, random weights
    python -m alignment.doctor --policy models/alpaca-7b --reward-model models/beaver-7b-v1.0-reward \
        --cost-model models/beaver-7b-v1.0-cost
    python -m alignment.doctor --device cpu --policy-shape toy --quick       # what CI runs (~2 min)

Checks, in order, each in its own process with its own time limit (a check that overruns is
stopped and reported "timed out"; the others still run): environment, models, noise (ES noise
self-check; CPU vs every GPU bit for bit, eager and compiled; speed), scorer (batching on vs off),
es (full and low-rank iterations: share outside generation, low-rank throughput ratio, memory plan),
grpo (TRL steps against the running scorer), persona and char_diffusion (a few GRPO steps each).
A check that cannot run here (no GPU, no vLLM) says so and why, and never counts as passed.

The table goes to the terminal, the same numbers as JSON to --json (and to the logs folder, with
each check's log). Exit code 0: nothing failed, missed a target or timed out; 1 otherwise; 2 for a
bad flag. The 1b/7b shapes are random-initialised Llama layers with the toy tokenizer (no hub),
built on the GPU into --models-dir and reused; the 7b shape is refused on a CPU.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from alignment import cli
from alignment.doctor.checks import CHECKS
from alignment.doctor.report import format_table
from alignment.doctor.run import Options, run_doctor


def _limits(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        try:
            out[name] = float(seconds)
        except ValueError:
            raise cli.UserError(f"--limit {item!r}: expected CHECK=SECONDS, e.g. es=600") from None
        if out[name] <= 0:
            raise cli.UserError(f"--limit {item!r}: seconds must be > 0")
    return out


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (kill, scancel) unwinds like Ctrl-C: the running check and the scorer are stopped too."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__, prog="python -m alignment.doctor")
    p.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if a GPU is visible"
    )
    p.add_argument("--policy-shape", choices=["toy", "1b", "7b"], default="toy",
                   help="random-initialised Llama shape of the policy (toy: the trained toy policy)")  # fmt: skip
    p.add_argument("--policy", default=None, help="a policy folder instead of a generated shape")
    p.add_argument("--reward-model", default=None, help="reward model folder (with --cost-model)")
    p.add_argument("--cost-model", default=None, help="cost model folder (with --reward-model)")
    p.add_argument("--score-shape", choices=["toy", "1b", "7b"], default=None,
                   help="shape of the generated score models (default: the policy's; 1b with --policy)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smaller loads and fewer iterations")
    p.add_argument("--only", default="", help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    p.add_argument("--limit", action="append", default=[], metavar="CHECK=SECONDS",
                   help="a check's time limit (repeatable); defaults in docs/doctor.md")  # fmt: skip
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models/toy"),
        help="the toy models (built if missing) and the 1b/7b shapes beside them (built once, reused)",
    )
    p.add_argument("--out-dir", type=Path, default=None, help="logs and report (default logs/doctor/<time>)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--scorer-threads", type=int, default=1, help="torch CPU threads of each scorer process")
    a = p.parse_args(argv)
    if (a.reward_model is None) != (a.cost_model is None):
        raise cli.UserError(
            "--reward-model and --cost-model go together (or neither: generated score models)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    opts = Options(
        device=a.device, policy_shape=a.policy_shape, policy=a.policy, reward_model=a.reward_model,
        cost_model=a.cost_model, score_shape=a.score_shape, quick=a.quick, models_dir=str(a.models_dir),
        out_dir=str(a.out_dir) if a.out_dir else None, only=tuple(x.strip() for x in a.only.split(",") if x.strip()),
        limits=_limits(a.limit), scorer_threads=a.scorer_threads,
    )  # fmt: skip
    report = run_doctor(opts)
    print(format_table(report), flush=True)
    report.write_json(Path(report.setup["logs"]) / "report.json")
    if a.json is not None:
        report.write_json(a.json)
    return 0 if report.ok else 1


if __name__ == "__main__":
    cli.run(main)
