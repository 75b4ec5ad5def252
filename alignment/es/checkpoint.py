"""ES checkpoints and the replay log: written atomically, enough to resume bit-identically.

Run directory layout (ARCHITECTURE.md, "Output formats")::

    <run>/replay.jsonl                               one line per iteration: seeds, coefficients, scale, λ
    <run>/model_saves/latest_hf/                     from_pretrained format + trainer_state.json
    <run>/model_saves/final_model_iteration_N/pytorch_model.pth

Because an ES update is a pure function of (weights, seeds, coefficients, scale), the replay log
rebuilds any iteration's weights from the base model (:func:`replay_updates`), and a resumed run
that loads ``latest_hf`` and replays the iterations logged after it reaches exactly the weights an
uninterrupted run would have, provided it draws the same noise and keeps the exact weights in the
same dtype: both are recorded in every replay entry and checkpoint, and :func:`check_numerics`
refuses a resume that would differ. ``latest_hf`` holds the exact (fp32 master) weights;
``from_pretrained(..., dtype=bf16)`` rounds them to exactly the weights a bf16 engine computes with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignment.atomic import replace_dir, write_text
from alignment.data import repair_jsonl_tail
from alignment.es.lowrank import NoiseSpec
from alignment.es.noise import NOISE_ID, NoiseMismatchError, require_noise

logger = logging.getLogger(__name__)

LATEST = "latest_hf"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_NOISE = "torch.randn/v0"  # what entries written before noise versions were drawn with


@dataclass
class ReplayEntry:
    """The update of one iteration: θ ← θ + scale · Σ coefficients[i] · ε(seeds[i])."""

    iteration: int
    seeds: list[int]
    coefficients: list[float]
    scale: float
    lagrange: dict[str, Any]
    noise: str = LEGACY_NOISE  # NoiseSpec.id of the run that wrote it (full: noise.NOISE_ID)
    master_dtype: str = "model"


class ReplayLog:
    """Append-only JSONL of :class:`ReplayEntry`, flushed and fsynced per line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, entry: ReplayEntry) -> None:
        """Append one line; a line torn by a crash is removed first, so the entry starts a line."""
        line = json.dumps(asdict(entry), allow_nan=False)
        repair_jsonl_tail(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[ReplayEntry]:
        """Entries in order; a half-written last line (crash mid-write) is dropped with a warning."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        entries = []
        for i, line in enumerate(lines):
            try:
                entries.append(ReplayEntry(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                if i == len(lines) - 1:
                    logger.warning("dropping a truncated last line of %s", self.path)
                    break
                raise ValueError(f"{self.path}:{i + 1} is not a replay entry: {exc}") from exc
        for prev, cur in zip(entries, entries[1:], strict=False):
            if cur.iteration != prev.iteration + 1:
                raise ValueError(f"{self.path}: iteration {cur.iteration} follows {prev.iteration}")
        return entries

    def truncate_after(self, iteration: int) -> None:
        """Drop entries after ``iteration`` (a resumed run re-does them), atomically."""
        keep = [e for e in self.read() if e.iteration <= iteration]
        write_text(self.path, "".join(json.dumps(asdict(e), allow_nan=False) + "\n" for e in keep))


def check_numerics(
    entries: Iterable[ReplayEntry],
    trainer_state: dict[str, Any] | None,
    master_dtype: str,
    where: str,
    noise_id: str = NOISE_ID,
) -> None:
    """Refuse to resume or replay updates that this run would compute differently.

    ``entries`` and ``trainer_state`` (of ``latest_hf``) must record this run's noise ``noise_id``
    (:attr:`NoiseSpec.id`: the noise implementation, full or low rank, and the rank) and
    ``master_dtype``; ``where`` names the run directory in the error.
    """
    found: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    for e in entries:
        found[f"{where}/replay.jsonl (iteration {e.iteration})"] = e.noise
        dtypes[f"{where}/replay.jsonl (iteration {e.iteration})"] = e.master_dtype
    if trainer_state is not None:
        found[f"{where}/model_saves/{LATEST}"] = trainer_state.get("noise", LEGACY_NOISE)
        dtypes[f"{where}/model_saves/{LATEST}"] = trainer_state.get("master_dtype", "model")
    other = {k: v for k, v in found.items() if v != noise_id}
    if other:
        first, nid = next(iter(other.items()))
        try:
            written = NoiseSpec.from_id(nid)
        except NoiseMismatchError:
            written = None
        if written is not None:  # this code draws it: the run was started in another mode or rank
            raise NoiseMismatchError(
                f"{first} was written with ES noise {nid!r} but this run draws {noise_id!r}: a resume "
                f"in another noise mode or rank would continue another algorithm. Resume with {written.flags()}"
            )
    require_noise(found, noise_id)
    wrong = {k: v for k, v in dtypes.items() if v != master_dtype}
    if wrong:
        first = next(iter(wrong.items()))
        raise ValueError(
            f"{first[0]} was written with master_dtype={first[1]!r} but this run uses {master_dtype!r}: "
            f"the replayed weights would differ. Resume with --master_dtype {first[1]}"
        )


def replay_updates(engine: Any, entries: Iterable[ReplayEntry]) -> int:
    """Apply logged updates to an engine (or executor) in order, each with the noise its entry
    records; returns the last iteration applied (-1 if none)."""
    last = -1
    for entry in entries:
        engine.apply_update(entry.seeds, entry.coefficients, entry.scale, NoiseSpec.from_id(entry.noise))
        last = entry.iteration
    return last


def save_latest(
    run_dir: str | Path,
    state: dict[str, torch.Tensor],
    base_model_path: str | Path,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``model_saves/latest_hf`` (config, tokenizer, safetensors weights, trainer state)."""
    saves = Path(run_dir) / "model_saves"
    saves.mkdir(parents=True, exist_ok=True)
    tmp = saves / f".{LATEST}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    base = Path(base_model_path)
    for name in os.listdir(base):  # config, generation config, tokenizer files; not the weights
        if not name.endswith((".safetensors", ".bin", ".pth", ".index.json")) and (base / name).is_file():
            shutil.copy2(base / name, tmp / name)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
    final = saves / LATEST
    replace_dir(tmp, final)
    return final


def find_latest(run_dir: str | Path) -> Path | None:
    """``latest_hf`` if complete, else the ``.old`` copy a crash mid-swap may have left."""
    saves = Path(run_dir) / "model_saves"
    for candidate in (saves / LATEST, saves / f"{LATEST}.old"):
        if (candidate / STATE_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def load_latest(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(weights, trainer_state) of the newest complete checkpoint, or None."""
    path = find_latest(run_dir)
    if path is None:
        return None
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return load_file(str(path / WEIGHTS_FILE)), state


def save_final(run_dir: str | Path, iteration: int, state: dict[str, torch.Tensor]) -> Path:
    """``model_saves/final_model_iteration_N/pytorch_model.pth`` (a plain state dict), atomically."""
    out = Path(run_dir) / "model_saves" / f"final_model_iteration_{iteration}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "pytorch_model.pth.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "pytorch_model.pth")
    return out / "pytorch_model.pth"


def load_final(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``pytorch_model.pth`` (ours, or the study's ``tmp_iter_N.pth``), on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ES checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(state).__name__})")
    return state


@torch.no_grad()
def apply_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``'s parameters by HF name, in the model's dtype and device.

    Every parameter must be present with its shape (a checkpoint of another architecture must not
    load half-way). Extra entries that are not parameters, such as a tied ``lm_head.weight``
    saved beside ``embed_tokens.weight`` or rotary buffers, are ignored.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(p.shape)}"
             for k, p in params.items() if k in state and state[k].shape != p.shape]  # fmt: skip
    if missing or wrong:
        raise ValueError(
            f"{source} does not fit the model: {len(missing)} parameter(s) missing {missing[:5]}, "
            f"{len(wrong)} with another shape {wrong[:5]}"
        )
    for name, param in params.items():
        param.copy_(state[name])
