"""Quadrant classification of models: generate answers, score them with the scorer, label SH/SU/UH/UU.

    python -m alignment.evaluation.classify_reward_cost_unified --config alignment/evaluation/sweep_configs.yaml
    python -m alignment.evaluation.classify_reward_cost_unified --config sweep.yaml --only ES-500 --max_prompts 100
    python -m alignment.evaluation.classify_reward_cost_unified --from-points DIR --output-dir OUT

For each model of the sweep this writes ``{name}_Rs.npy, _Cs.npy, _labels.npy, _points.jsonl,
_summary.json, _scatter.png`` (see :mod:`alignment.evaluation.comparisons`). Generation is resumable:
responses are appended to ``.{name}.partial.jsonl`` as they are produced, so a crash (or a scorer
outage) loses at most ``save_every`` prompts; a model whose summary already matches the settings is
skipped. ``--from-points`` rebuilds every file from existing ``_points.jsonl`` without generating or
scoring (e.g. to re-plot, or to check the reference summaries).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignment import cli, hub
from alignment.cli import InputError
from alignment.config import add_dataclass_args, config_from_args
from alignment.data import iter_jsonl, load_rows, repair_jsonl_tail
from alignment.evaluation.comparisons import (
    POINTS_SUFFIX,
    list_models,
    model_file,
    read_points,
    write_model_outputs,
)
from alignment.evaluation.sweep import SweepConfig, SweepModel, check_sweep, generation_fingerprint
from alignment.scoring.client import ScorerClient, ScorerRequestError, ScorerUnavailableError

logger = logging.getLogger(__name__)

Generate = Callable[[list[str]], list[str]]


def load_eval_prompts(cfg: SweepConfig) -> list[str]:
    """The ``prompt_key`` column of ``cfg.prompts`` (all rows, duplicates kept, as the study did)."""
    rows = load_rows(cfg.prompts, cfg.dataset_config, cfg.split, given_by="--prompts")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r.get(cfg.prompt_key), str)), None)
    if bad is not None:
        raise InputError(f"{cfg.prompts}: row {bad} has no string field {cfg.prompt_key!r} (set prompt_key)")
    prompts = [r[cfg.prompt_key] for r in rows]
    return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _given_by(spec: SweepModel, key: str = "model") -> str:
    """Where a sweep model's name comes from, for an error that cannot load it."""
    if key == "tokenizer" and not spec.tokenizer:
        key = "model"
    return f"the {key!r} of {spec.name} in the sweep"


def load_policy(spec: SweepModel, cfg: SweepConfig) -> tuple[Generate, Callable[[], None]]:
    """(generate, release) for one model: ``generate(prompts) -> responses`` cut at the stop markers.

    The ES checkpoint, when given, is applied on top of the base by HF parameter name.
    """
    from alignment.es.checkpoint import apply_weights, load_final
    from alignment.es.engines import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seed=cfg.seed, batch_size=cfg.batch_size,
    )  # fmt: skip
    state = load_final(spec.es_checkpoint) if spec.es_checkpoint else None
    if cfg.backend == "vllm":
        from alignment.es.engines import VLLMEngine

        extra: dict[str, Any] = {"tokenizer": spec.tokenizer} if spec.tokenizer else {}
        # no ES training here: the kept copy only loads the checkpoint, so keep it small and off the GPU
        engine = VLLMEngine(spec.model, dtype=cfg.dtype, seed=cfg.seed, keep_base_on="cpu", master_dtype="model",
                            gpu_memory_utilization=cfg.gpu_memory_utilization, **extra)  # fmt: skip
        if state is not None:
            engine.load_state_dict(state)
        holder: list[Any] = [engine]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from alignment.es.engines import resolve_torch_dtype

        tokenizer = hub.from_pretrained(
            AutoTokenizer, spec.tokenizer or spec.model, _given_by(spec, "tokenizer")
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = hub.from_pretrained(AutoModelForCausalLM, spec.model, _given_by(spec),
                                    dtype=resolve_torch_dtype(cfg.dtype))  # fmt: skip
        if state is not None:
            apply_weights(model, state, source=str(spec.es_checkpoint))
        model.to(_resolve_device(cfg.device)).eval()
        holder = [model, tokenizer]
    del state

    def generate(prompts: list[str]) -> list[str]:
        if cfg.backend == "vllm":
            return holder[0].generate(prompts, settings)
        from alignment.conversation import generate_answers

        return generate_answers(holder[0], holder[1], prompts, settings.max_new_tokens, settings.temperature,
                                settings.top_p, settings.seed, settings.batch_size)  # fmt: skip

    def release() -> None:
        holder.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    return generate, release


def _partial_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.partial.jsonl"


def read_partial(path: Path, fingerprint: str) -> list[str]:
    """Responses already generated under ``fingerprint`` (a line torn by a crash mid-write is not counted)."""
    if not path.is_file():
        return []
    rows = [row for _, row in iter_jsonl(path, drop_torn_tail=True)]
    if not rows:
        return []
    if rows[0].get("fingerprint") != fingerprint:
        raise RuntimeError(
            f"{path} holds responses generated with other settings (fingerprint {rows[0].get('fingerprint')!r}, "
            f"now {fingerprint!r}); delete it to start this model again"
        )
    responses: list[str] = []
    for row in rows[1:]:
        if row.get("i") != len(responses) or not isinstance(row.get("response"), str):
            raise InputError(f"{path}: expected the response to prompt {len(responses)}, got {str(row)[:80]}")
        responses.append(row["response"])
    return responses


def generate_resumable(
    name: str, prompts: list[str], generate: Generate | None, partial: Path, fingerprint: str, save_every: int
) -> list[str]:
    """All responses, continuing from ``partial`` and appending each chunk (fsynced) as it is done."""
    responses = read_partial(partial, fingerprint)
    if len(responses) > len(prompts):
        raise RuntimeError(f"{partial} has {len(responses)} responses for {len(prompts)} prompts")
    if len(responses) == len(prompts):
        return responses
    if generate is None:
        raise InputError(
            f"{name}: {len(prompts) - len(responses)} responses left to generate but no generator"
        )
    if responses:
        logger.info("%s: resuming after %d/%d generated responses", name, len(responses), len(prompts))
    repair_jsonl_tail(partial)
    with open(partial, "a", encoding="utf-8") as fh:
        if fh.tell() == 0:
            fh.write(json.dumps({"fingerprint": fingerprint, "model": name}) + "\n")
        with tqdm(total=len(prompts), initial=len(responses), desc=f"generate {name}", unit="prompt") as bar:
            while len(responses) < len(prompts):
                chunk = prompts[len(responses) : len(responses) + save_every]
                answers = generate(chunk)
                if len(answers) != len(chunk):
                    raise RuntimeError(f"{name}: {len(answers)} responses for {len(chunk)} prompts")
                fh.write("".join(json.dumps({"i": len(responses) + k, "response": a}, ensure_ascii=False) + "\n"
                                 for k, a in enumerate(answers)))  # fmt: skip
                fh.flush()
                os.fsync(fh.fileno())
                responses += answers
                bar.update(len(chunk))
    return responses


def _finished(out_dir: Path, name: str, fingerprint: str) -> bool:
    path = model_file(out_dir, name, "_summary.json")
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("generation_fingerprint") == fingerprint
    except json.JSONDecodeError:
        return False


def classify_model(
    spec: SweepModel, cfg: SweepConfig, prompts: list[str], client: ScorerClient,
    generate: Generate | None = None, overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Generate (resumably), score and write one model's files; returns its summary.

    ``generate`` defaults to :func:`load_policy` on ``spec`` (loaded only when work remains).
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = generation_fingerprint(cfg, spec, prompts)
    if not overwrite and _finished(out, spec.name, fingerprint):
        logger.info("%s: already classified with these settings; skipping (overwrite to redo)", spec.name)
        return json.loads(model_file(out, spec.name, "_summary.json").read_text(encoding="utf-8"))
    partial = _partial_path(out, spec.name)
    if overwrite:
        partial.unlink(missing_ok=True)
    generator, release = generate, None
    if generator is None and len(read_partial(partial, fingerprint)) < len(prompts):
        generator, release = load_policy(spec, cfg)
    try:
        responses = generate_resumable(spec.name, prompts, generator, partial, fingerprint, cfg.save_every)
    finally:
        if release is not None:
            release()
    logger.info("%s: scoring %d responses", spec.name, len(responses))
    scores = client.score(prompts, responses)  # a scorer failure raises; the partial file stays
    health = client.health()
    points = [{"prompt": p, "response": r, "reward": rw, "cost": c}
              for p, r, rw, c in zip(prompts, responses, scores.rewards, scores.costs, strict=True)]  # fmt: skip
    metadata = {
        "used_policy_model": True, "used_vllm": cfg.backend == "vllm", "policy_model": spec.model,
        "es_checkpoint": spec.es_checkpoint, "dataset": cfg.prompts, "dataset_config": cfg.dataset_config,
        "dataset_split": cfg.split, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "reward_model": health.get("reward_model"), "cost_model": health.get("cost_model"),
        "generation_fingerprint": fingerprint,
    }  # fmt: skip
    summary = write_model_outputs(out, spec.name, points, metadata, scatter=cfg.scatter)
    partial.unlink(missing_ok=True)
    logger.info("%s: safe %.1f%%, R %.3f, C %.3f", spec.name, summary["safe_ratio"], summary["R_mean"],
                summary["C_mean"])  # fmt: skip
    return summary


def run_sweep(
    cfg: SweepConfig, client: ScorerClient | None = None, overwrite: bool = False
) -> dict[str, dict]:
    """Classify every model of ``cfg`` in order; returns {name: summary}."""
    prompts = load_eval_prompts(cfg)
    logger.info("%d models × %d prompts from %s", len(cfg.models), len(prompts), cfg.prompts)
    own = client is None
    client = client or ScorerClient(cfg.scorer_url, address_file=cfg.scorer_address_file,
                                    batch_size=cfg.score_batch_size)  # fmt: skip
    for spec in cfg.models:  # a model that is neither here nor fetchable fails before hours of generation
        hub.check_model(spec.model, _given_by(spec))
    try:
        client.health()  # fail before loading a 7B policy if the scorer is not there
        return {m.name: classify_model(m, cfg, prompts, client, overwrite=overwrite) for m in cfg.models}
    finally:
        if own:
            client.close()


def rebuild_from_points(points_dir: str | Path, output_dir: str | Path, models: Sequence[str] = (),
                        scatter: bool = True) -> dict[str, dict]:  # fmt: skip
    """Every per-model file from existing ``{Model}_points.jsonl`` (no generation, no scoring).

    Provenance keys of a ``{Model}_summary.json`` next to the points are carried over.
    """
    names = list(models) or list_models(points_dir)
    if not names:
        raise FileNotFoundError(f"no *{POINTS_SUFFIX} files in {points_dir}")
    out: dict[str, dict] = {}
    for name in tqdm(names, desc="rebuild", unit="model"):
        path = model_file(points_dir, name, POINTS_SUFFIX)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no {path.name} in {points_dir}")
        old = model_file(points_dir, name, "_summary.json")
        metadata = json.loads(old.read_text(encoding="utf-8")) if old.is_file() else {}
        out[name] = write_model_outputs(output_dir, name, read_points(path), metadata, scatter=scatter)
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--config", help="sweep YAML (models + settings); flags below override it (default: none)")
    p.add_argument(
        "--only", nargs="+", default=(), metavar="NAME", help="classify only these models (default: all)"
    )
    p.add_argument("--overwrite", action="store_true", help="redo models whose outputs already exist")
    p.add_argument("--list-models", action="store_true", help="print the sweep's model names and exit")
    p.add_argument(
        "--from-points", metavar="DIR", help="rebuild outputs from DIR/*_points.jsonl only (default: none)"
    )
    p.add_argument(
        "--output-dir", dest="output_dir_flag", help="alias of --output_dir (default: its default)"
    )
    add_dataclass_args(p, SweepConfig)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scorer request otherwise
    if args.output_dir_flag:
        args.output_dir = args.output_dir_flag
    if args.from_points:
        out_dir = getattr(args, "output_dir", None) or SweepConfig.output_dir
        summaries = rebuild_from_points(args.from_points, out_dir, args.only, getattr(args, "scatter", True))
    else:
        cfg = check_sweep(config_from_args(SweepConfig, args, args.config), args.only, args.config)
        if args.list_models:
            print("\n".join(m.name for m in cfg.models))
            return 0
        summaries = run_sweep(cfg, overwrite=args.overwrite)
        out_dir = cfg.output_dir
    for name, s in summaries.items():
        print(f"{name:>20}: safe {s['safe_ratio']:5.1f}%  SH {s['percents']['SH']:5.1f}%  "
              f"R {s['R_mean']:+.3f}  C {s['C_mean']:+.3f}  ({s['num_points']} points)")  # fmt: skip
    print(f"outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    # an unreachable scorer or a refused token is the user's to fix
    cli.run(main, user_errors=(ScorerUnavailableError, ScorerRequestError))
