"""Models: the policy and the reward/cost models every later check uses, built locally or given.

``toy``: the tiny trained toy models (:func:`alignment.toy.build.build_toy_models`); ``1b``/``7b``:
randomly initialised Llama shapes (:mod:`alignment.toy.shapes`, built on the GPU, reused when
present); or the user's folders (``--policy``, ``--reward-model``, ``--cost-model``), checked to
hold a config. The parent reads the resolved folders from this check's figures.
"""

from __future__ import annotations

from pathlib import Path

from alignment.doctor.context import Context
from alignment.doctor.report import CheckResult, Figure

TITLE = "Models: build or find the policy and score models"


def _params(path: str, score: bool) -> float:
    """Parameters from the config alone (meta device; no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not score:
        from alignment.es.memory import count_parameters

        return float(count_parameters(path))
    from alignment.scoring.score_model import LlamaForScore

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        try:
            model = LlamaForScore(config)
        except Exception:  # noqa: BLE001 - another score architecture: count its backbone
            model = AutoModelForCausalLM.from_config(config)
    return float(sum(p.numel() for p in model.parameters()))


def resolve(ctx: Context) -> dict[str, str]:
    """Folders of the policy and the reward/cost models, built when they are generated ones."""
    from alignment.toy.build import build_toy_models
    from alignment.toy.shapes import build_random_policy, build_random_score_model

    models_dir = Path(ctx.models_dir)
    build_toy_models(models_dir)  # the tokenizer of the random shapes, and the toy models
    device = "cuda" if ctx.on_gpu else "cpu"
    out = {"policy": ctx.policy, "reward_model": ctx.reward_model, "cost_model": ctx.cost_model}
    if out["policy"] is None:
        shape = ctx.policy_label
        out["policy"] = (
            str(models_dir / "policy")
            if shape == "toy"
            else str(build_random_policy(shape, models_dir, device))
        )
    if out["reward_model"] is None or out["cost_model"] is None:
        shape = ctx.score_label
        if shape == "toy":
            generated = {"reward_model": str(models_dir / "reward"), "cost_model": str(models_dir / "cost")}
        else:
            path = str(build_random_score_model(shape, models_dir, device))
            generated = {"reward_model": path, "cost_model": path}
        out = {k: v if v is not None else generated[k] for k, v in out.items()}
    for key, path in out.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--{key.replace('_', '-')}: no config.json in {path}")
    return out


def run_models(ctx: Context) -> CheckResult:
    paths = resolve(ctx)
    figures = []
    for key, path in paths.items():
        params = _params(path, score=key != "policy")
        label = ctx.policy_label if key == "policy" else ctx.score_label
        figures.append(Figure(key, params / 1e9, "B params", note=f"{label}: {path}"))
    return CheckResult.from_figures("models", TITLE, figures, data=paths)
