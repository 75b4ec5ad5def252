"""Low-rank ES noise (EGGROLL, Sarkar et al. 2025, arXiv 2511.16652): the factor maths.

In ``noise: lowrank`` mode member i perturbs each target matrix W (out × in) by a rank-r matrix

    E_i = A_i · B_iᵀ / √r,      A_i (out, r), B_i (in, r) standard normal,

drawn by the device-independent generator of :mod:`alignment.es.noise` from (member seed, HF name,
stream ``"A"`` / ``"B"``), so every engine, backend and device holds the same factors bit for bit.
A perturbed forward is x·Wᵀ + sign·σ·(x·B_i)·A_iᵀ/√r: a LoRA adapter (vLLM serves every member of
the population as one adapter in one batched call; the transformers engine adds it in forward
hooks), and the base weights are never touched while the population is evaluated. The update

    W ← W + α/N · Σ_i z_i·sign_i·A_i·B_iᵀ/√r

is full rank (a sum of N rank-r terms) and is accumulated in fp32 into the exact (master) weights
as a fixed sequence of elementwise IEEE operations (one outer product of a column pair at a time,
members in the order given), never a matrix product whose summation order a BLAS library picks:
every engine that applies the same (seeds, coefficients) reaches the same bits, as in full mode.

Which tensors (as the EGGROLL reference implementation maps a Llama): the seven projection
matrices of every block (q/k/v/o, gate/up/down; vLLM's fused qkv_proj / gate_up_proj are packed by
vLLM from the per-matrix adapters) get low-rank noise. The token embeddings and the LM head are
excluded, as there; the norm weights and any biases are frozen too (the reference's
``freeze_nonlora``), because a per-member vector cannot be served as a LoRA adapter, so with them
the population could not share one batched call. In a 7B Llama the norms are ~0.004 % of the
parameters and the embeddings and head ~3.9 %; the ~6.5e9 projection entries all move.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from alignment.es.noise import NOISE_ID, NoiseMismatchError, f32, gaussian, noise_key, normal_segments

NoiseMode = Literal["full", "lowrank"]
LOWRANK_VERSION = 1
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


@dataclass(frozen=True)
class NoiseSpec:
    """How members are perturbed: ``full`` (every parameter, ε ~ N(0, I)) or ``lowrank`` (rank r)."""

    mode: NoiseMode = "full"
    rank: int = 4

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lowrank"):
            raise ValueError(f"noise must be full or lowrank, got {self.mode!r}")
        if self.mode == "lowrank" and (
            isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1
        ):
            raise ValueError(f"noise_rank must be an integer >= 1, got {self.rank!r}")

    @property
    def lowrank(self) -> bool:
        return self.mode == "lowrank"

    @property
    def id(self) -> str:
        """The noise id replay logs and checkpoints record (full mode: :data:`NOISE_ID` itself)."""
        return NOISE_ID if not self.lowrank else f"{NOISE_ID}+lowrank-r{self.rank}/v{LOWRANK_VERSION}"

    def flags(self) -> str:
        return "--noise full" if not self.lowrank else f"--noise lowrank --noise_rank {self.rank}"

    @classmethod
    def from_id(cls, noise_id: str) -> NoiseSpec:
        """The spec that draws ``noise_id``; :class:`NoiseMismatchError` for one this code cannot draw."""
        if noise_id == NOISE_ID:
            return cls("full")
        prefix, suffix = f"{NOISE_ID}+lowrank-r", f"/v{LOWRANK_VERSION}"
        if noise_id.startswith(prefix) and noise_id.endswith(suffix):
            rank = noise_id[len(prefix) : -len(suffix)]
            if rank.isdigit() and int(rank) >= 1:
                return cls("lowrank", int(rank))
        raise NoiseMismatchError(f"this code cannot draw the ES noise {noise_id!r}")


FULL = NoiseSpec("full")


def is_target(name: str, shape: Sequence[int]) -> bool:
    """Whether HF parameter ``name`` (of ``shape``) gets low-rank noise: a target projection's weight."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and len(shape) == 2 and module.rpartition(".")[2] in TARGET_MODULES


def target_names(
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: str = "model"
) -> list[str]:
    """The HF names of the target matrices, in the given order; ``ValueError`` when there are none."""
    items = params.items() if isinstance(params, Mapping) else params
    names = [name for name, t in items if is_target(name, tuple(t.shape))]
    if not names:
        raise ValueError(
            f"noise: lowrank perturbs Llama-style {'/'.join(TARGET_MODULES)} linear layers; {where} has none"
        )
    return names


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``rank`` (slots are zero-padded)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"noise_rank {rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def factors(
    member_seed: int, name: str, shape: Sequence[int], rank: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of member ``member_seed`` for matrix ``name`` of ``shape`` (out, in): A (out, r),
    B (in, r), fp32 standard normal, from streams ``"A"`` and ``"B"`` of the shared generator."""
    out_features, in_features = shape
    a = gaussian(member_seed, name, (out_features, rank), device, stream="A")
    b = gaussian(member_seed, name, (in_features, rank), device, stream="B")
    return a, b


def factor_table(
    seeds: Sequence[int],
    shapes: Mapping[str, Sequence[int]],
    rank: int,
    device: torch.device | str,
    max_elements: int = 1 << 22,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`factors` of every (seed, name) pair, drawn in as few generator calls as fit
    ``max_elements`` each (every element is keyed by itself, so the values are those of
    :func:`factors`); a small model's whole population is one call instead of thousands."""
    wanted = [(seed, name, stream, shape[0] if stream == "A" else shape[1])
              for seed in seeds for name, shape in shapes.items() for stream in ("A", "B")]  # fmt: skip
    drawn: dict[tuple[int, str, str], torch.Tensor] = {}
    start = 0
    while start < len(wanted):
        end, size = start, 0
        while end < len(wanted) and (end == start or size + wanted[end][3] * rank <= max_elements):
            size += wanted[end][3] * rank
            end += 1
        batch = wanted[start:end]
        flat = normal_segments([(noise_key(s, n, st), 0, rows * rank) for s, n, st, rows in batch], device)
        for (s, n, st, rows), part in zip(
            batch, flat.split([rows * rank for *_, rows in batch]), strict=True
        ):
            drawn[(s, n, st)] = part.view(rows, rank)
        start = end
    return {(s, n): (drawn[(s, n, "A")], drawn[(s, n, "B")]) for s in seeds for n in shapes}


def adapter_pair(
    a: torch.Tensor, b: torch.Tensor, sign: float, sigma: float, rank: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) of :func:`adapter_factors` from the member's factors (A, B)."""
    lora_b = a * f32(sign * sigma / math.sqrt(rank))
    return b.t().contiguous().to(dtype), lora_b.to(dtype)


def adapter_factors(
    member_seed: int,
    sign: float,
    sigma: float,
    name: str,
    shape: Sequence[int],
    rank: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA pair of a member in vLLM's layout: ``lora_a`` = Bᵀ (r, in), ``lora_b`` =
    fp32(sign·σ/√r)·A (out, r), so that x·lora_aᵀ·lora_bᵀ = sign·σ·(x·B)·Aᵀ/√r; cast to ``dtype``
    (one rounding, the same on both backends)."""
    return adapter_pair(*factors(member_seed, name, shape, rank, device), sign, sigma, rank, dtype)


class LowRankDirection:
    """Σ_i c_i·A_i·B_iᵀ/√r for any row-major slice of a target matrix, bit-identical on every device.

    ``direction(name, start, end, device)`` returns elements ``start .. end-1`` of the flattened
    (out × in) direction of ``name`` (fp32, 1-D), as :meth:`PerturbableParams.apply_direction`
    asks for them. Each element is computed on its own by the same operations in the same order
    (per member i in the given order and column j: acc += (A_i[:, j]·fp32(c_i/√r)) ⊗ B_i[:, j], a
    multiply then an add), so slicing, chunking and the device never change a bit. The factors of
    the matrix in hand are drawn once and reused for its other slices.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        coefficients: Sequence[float],
        rank: int,
        shapes: Mapping[str, Sequence[int]],
    ) -> None:
        if len(seeds) != len(coefficients):
            raise ValueError(f"{len(seeds)} seeds but {len(coefficients)} coefficients")
        self.terms = [(int(s), float(c)) for s, c in zip(seeds, coefficients, strict=True) if c != 0.0]
        self.rank, self.shapes = rank, shapes
        self._name: str | None = None
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _terms_of(self, name: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if name != self._name:
            table = factor_table(
                [seed for seed, _ in self.terms], {name: self.shapes[name]}, self.rank, device
            )
            scaled = []
            for seed, coef in self.terms:
                a, b = table[(seed, name)]
                scaled.append((a * f32(coef / math.sqrt(self.rank)), b))
            self._name, self._factors = name, scaled
        return self._factors

    def __call__(self, name: str, start: int, end: int, device: torch.device) -> torch.Tensor:
        in_features = self.shapes[name][1]
        r0, r1 = start // in_features, -(-end // in_features)
        acc = torch.zeros((r1 - r0, in_features), dtype=torch.float32, device=device)
        for a, b in self._terms_of(name, device):
            for j in range(self.rank):
                acc.add_(a[r0:r1, j : j + 1] * b[:, j])
        return acc.view(-1)[start - r0 * in_features : end - r0 * in_features]


def dense_perturbation(
    member_seed: int, sign: float, sigma: float, name: str, shape: Sequence[int], rank: int
) -> torch.Tensor:
    """sign·σ·A·Bᵀ/√r as a dense fp32 matrix (tests and debugging only: a matrix product)."""
    lora_a, lora_b = adapter_factors(member_seed, sign, sigma, name, shape, rank, "cpu")
    return lora_b @ lora_a


def apply_noise_update(
    params, seeds: Sequence[int], coefficients: Sequence[float], scale: float, noise: NoiseSpec
):
    """The ES update of ``noise``'s mode on :class:`alignment.es.weights.PerturbableParams`:
    full rank over every tensor, or low rank over the target matrices (the rest keep their bits).
    Returns the :class:`alignment.es.weights.UpdateStats`."""
    if not noise.lowrank:
        return params.apply_update(seeds, coefficients, scale)
    names = target_names(params.params)
    shapes = {name: tuple(params.params[name].shape) for name in names}
    return params.apply_direction(LowRankDirection(seeds, coefficients, noise.rank, shapes), scale, names)
