"""The weights ES perturbs and updates: exact (master) weights plus the live tensors an engine uses.

bf16 cannot hold an ES update: with α = 5e-4 and N = 30 an update entry is ~1e-4, half a bf16 ulp of
a weight of 0.02, so rounding each update into bf16 weights loses a third of the entries every
iteration, and an entry whose update stays below half an ulp never moves. :class:`PerturbableParams`
therefore keeps the exact weights in fp32 (``master_dtype="fp32"``, the default) and only rounds
them into the live tensors:

- ``perturb(seed, σ, sign)``:  live ← round(master + ε·(sign·σ));
- ``restore()``:               live ← round(master), bit for bit what it was before;
- ``apply_update(seeds, c, s)``: master ← master + (Σ ε·cᵢ)·s; live ← round(master).
- ``apply_direction(d, s, names)``: the same with another fp32 direction d for some tensors (the
  low-rank update of :mod:`alignment.es.lowrank`).

Bytes per parameter beside the live weights: 4 (fp32 master) on ``keep_on`` (the live device, or
the CPU). ``master_dtype="model"`` keeps the master in the live dtype (2 bytes for bf16; the update
is then rounded to bf16 every iteration, as before) for comparison or when memory is short. Every
step is a fixed sequence of elementwise IEEE operations (each one rounding, never fused), done in
blocks of the flattened tensors (:func:`plan_blocks`), so two engines that apply the same calls hold
the same bits whatever their blocks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Literal

import torch

from alignment.es.member_noise import MemberNoise
from alignment.es.noise import (
    add_scaled_,
    compiled_on,
    f32,
    noise_key,
    normal_indexed,
    normal_range,
    segment_index,
)

MasterDtype = Literal["fp32", "model"]
DirectionFn = Callable[
    [str, int, int, torch.device], torch.Tensor
]  # (name, start, end, device) -> fp32 (end-start,)
CHUNK = 1 << 22  # elements per step: bounds the temporaries (fp32) beside a large embedding


def tensor_checksum(tensor: torch.Tensor) -> tuple[int, int]:
    """Two exact integer sums of a tensor's bit patterns: equal tensors give equal pairs.

    Computed on the tensor's device in int64, so no weights leave the device to compare engines.
    """
    flat = tensor.detach().contiguous().view(-1)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    ints = flat.view(bits).to(torch.int64)
    weights = torch.arange(1, ints.numel() + 1, device=ints.device, dtype=torch.int64) % 65521
    return int(ints.sum().item()), int((ints * weights).sum().item())


def weights_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hex digest of named tensors (order-independent over names)."""
    h = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        s1, s2 = tensor_checksum(tensor)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{s1}:{s2};".encode())
    return h.hexdigest()[:16]


class UpdateStats:
    """What one update did, summed over tensors: accumulated on the device, read once at the end."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # float64 (4,): intended², live², master², changed
        self.numel = 0

    def add(self, intended: torch.Tensor, live_delta: torch.Tensor, master_delta: torch.Tensor) -> None:
        """``intended``: s·Σ cᵢεᵢ; ``live_delta``/``master_delta``: after − before (all fp32, same shape)."""
        part = torch.stack([
            intended.double().square().sum(), live_delta.double().square().sum(),
            master_delta.double().square().sum(), torch.count_nonzero(live_delta).double(),
        ])  # fmt: skip
        self._sums = part if self._sums is None else self._sums + part.to(self._sums.device)
        self.numel += live_delta.numel()

    def metrics(self) -> dict[str, float]:
        """Norms and ratios for the training metrics (``update/...``)."""
        intended_sq, live_sq, master_sq, changed = (
            self._sums.tolist() if self._sums is not None else [0.0, 0.0, 0.0, 0.0]
        )
        norm = math.sqrt(intended_sq)
        return {
            "update/intended_norm": norm,
            "update/realised_norm": math.sqrt(live_sq),
            "update/realised_intended_ratio": math.sqrt(live_sq) / norm if norm else float("nan"),
            "update/master_intended_ratio": math.sqrt(master_sq) / norm if norm else float("nan"),
            "update/fraction_changed": changed / self.numel if self.numel else 0.0,
        }


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("ES parameters must be contiguous (a strided view would not receive the noise)")
    return t.view(-1)


def _master_dtype(live: torch.Tensor, master_dtype: MasterDtype) -> torch.dtype:
    if master_dtype == "fp32":
        return torch.float32
    if master_dtype == "model":
        return live.dtype
    raise ValueError(f"unknown master_dtype {master_dtype!r}; use fp32 or model")


Slice = tuple[str, int, int]  # (HF name, first element, end) of a flattened tensor


def plan_blocks(params: Mapping[str, torch.Tensor], size: int) -> list[list[Slice]]:
    """Tensors grouped into blocks of at most ``size`` elements, each one noise draw: a large tensor
    is cut into pieces, small ones on the same device share a block (one kernel call for all the
    norms of a model, or for all of a small model)."""
    blocks: list[list[Slice]] = []
    current: list[Slice] = []
    used, device = 0, None
    for name, t in params.items():
        n = t.numel()
        if n >= size:
            blocks.extend([(name, a, min(a + size, n))] for a in range(0, n, size))
            continue
        if current and (used + n > size or t.device != device):
            blocks.append(current)
            current, used = [], 0
        current.append((name, 0, n))
        used, device = used + n, t.device
    if current:
        blocks.append(current)
    return blocks


class PerturbableParams:
    """Live parameter tensors plus their exact (master) values.

    ``params`` maps canonical HF names to the tensors an engine computes with (vLLM: views into
    its fused tensors). ``keep_on``: device of the master copy (None: beside each live tensor;
    ``"cpu"`` frees the GPU of it at the cost of a host-to-device copy per perturb and restore).
    ``cache_bytes``: a small model's member noise is kept from :meth:`perturb` until the next
    :meth:`apply_update` (which needs it again, as does the antithetic twin) while all of one
    member fits in this many bytes; a large model's never is. The values are the same either way.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        keep_on: str | torch.device | None = None,
        master_dtype: MasterDtype = "fp32",
        cache_bytes: int = 128 * 2**20,
    ) -> None:
        if not params:
            raise ValueError("no parameters to perturb")
        self.params = params
        self.master_dtype = master_dtype
        self.master = {
            name: t.detach().to(
                keep_on if keep_on is not None else t.device, _master_dtype(t, master_dtype), copy=True
            )
            for name, t in params.items()
        }
        for live in params.values():
            _flat(live)  # refuse strided views now, not at the first perturbation
        self.blocks = plan_blocks(params, CHUNK)
        self._index = {  # the element layout of each block of several tensors, built once
            i: segment_index([(a, b - a) for _, a, b in block], params[block[0][0]].device)
            for i, block in enumerate(self.blocks)
            if len(block) > 1
        }
        self.perturbed_by: tuple[int, float] | None = None
        self._member_bytes = 4 * sum(t.numel() for t in params.values())
        self._cache = MemberNoise(self._draw_member, cache_bytes // self._member_bytes)

    def _draw_member(self, member_seed: int) -> list[torch.Tensor]:
        return [
            self._noise(i, member_seed, self.params[block[0][0]].device)
            for i, block in enumerate(self.blocks)
        ]

    def _member_noise(self, member_seed: int, keep: bool) -> list[torch.Tensor] | None:
        """The cached noise blocks of ``member_seed``; with ``keep``, drawn and cached if there is room."""
        return self._cache.get(member_seed, keep)

    def prefetch(self, member_seeds: Sequence[int]) -> None:
        """Draw these members' noise ahead, in a background thread, while the engine generates: CPU
        weights drawn eagerly, a model whose member noise fits the cache (a no-op otherwise)."""
        devices = {t.device for t in self.params.values()}
        if devices == {torch.device("cpu")} and not compiled_on("cpu"):
            self._cache.prefetch(member_seeds)

    def _views(self, block: list[Slice]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live, master) 1-D views of each slice of ``block``."""
        return [(_flat(self.params[n])[a:b], self.master[n].view(-1)[a:b]) for n, a, b in block]

    def _noise(self, i: int, member_seed: int, device: torch.device) -> torch.Tensor:
        """ε(member_seed) of every slice of block ``i``, concatenated (fp32, 1-D)."""
        block = self.blocks[i]
        if len(block) == 1:
            name, a, b = block[0]
            return normal_range(noise_key(member_seed, name), a, b - a, device)
        return normal_indexed(self._index[i], [noise_key(member_seed, n) for n, _, _ in block], device)

    @torch.no_grad()
    def perturb(self, member_seed: int, sigma: float, sign: float = 1.0) -> None:
        """Live weights ← round(master + ε(member_seed)·(sign·σ))."""
        if self.perturbed_by is not None:
            raise RuntimeError(f"already perturbed by {self.perturbed_by}; restore() first")
        s = f32(sign * sigma)
        cached = self._member_noise(member_seed, keep=True)
        for i, block in enumerate(self.blocks):
            device = self.params[block[0][0]].device
            noise = cached[i] if cached is not None else self._noise(i, member_seed, device)
            step = noise * s  # the block's ε·s in one op (elementwise: the same products slice by slice)
            off = 0
            for live, master in self._views(block):
                part = step[off : off + live.numel()]
                if live.dtype == master.dtype == torch.float32 and master.device == live.device:
                    torch.add(master, part, out=live)  # an fp32 engine: the sum is the live value
                else:
                    live.copy_(master.to(device, torch.float32) + part)
                off += live.numel()
        self.perturbed_by = (member_seed, sign)

    @torch.no_grad()
    def restore(self) -> None:
        """Live weights ← round(master), bit for bit the weights before :meth:`perturb`."""
        for block in self.blocks:  # block by block: no full-size temporary of a large tensor
            for live, master in self._views(block):
                live.copy_(master)
        self.perturbed_by = None

    @torch.no_grad()
    def apply_update(self, seeds: Sequence[int], coefficients: Sequence[float], scale: float) -> UpdateStats:
        """master ← master + (Σ ε(seedᵢ)·cᵢ)·scale (fp32, in the order given); live ← round(master).

        ES calls it with ``scale = α / N`` and ``cᵢ`` the normalised fitness (times the antithetic
        sign), so every engine that applies the same call reaches the same weights.
        """
        if self.perturbed_by is not None:
            raise RuntimeError("apply_update() on perturbed weights; restore() first")
        if len(seeds) != len(coefficients):
            raise ValueError(f"{len(seeds)} seeds but {len(coefficients)} coefficients")
        terms = [
            (s, c, self._member_noise(s, keep=False)) for s, c in zip(seeds, coefficients, strict=True) if c
        ]
        stats = UpdateStats()
        for i, block in enumerate(self.blocks):
            device = self.params[block[0][0]].device
            views = self._views(block)
            direction = torch.zeros(sum(v.numel() for v, _ in views), dtype=torch.float32, device=device)
            for seed, coef, cached in terms:
                add_scaled_(
                    direction, cached[i] if cached is not None else self._noise(i, seed, device), coef
                )
            self._commit(views, direction * f32(scale), device, stats)
        self._cache.clear()  # the next iteration draws other members
        return stats

    @torch.no_grad()
    def apply_direction(self, direction: DirectionFn, scale: float, names: Collection[str]) -> UpdateStats:
        """master ← master + direction·scale for the tensors in ``names`` (the others keep their
        bits); live ← round(master). ``direction(name, start, end, device)`` gives elements
        start..end-1 of a flattened tensor's fp32 direction (e.g. a low-rank sum,
        :class:`alignment.es.lowrank.LowRankDirection`); it is asked slice by slice, in block order.
        """
        if self.perturbed_by is not None:
            raise RuntimeError("apply_direction() on perturbed weights; restore() first")
        unknown = sorted(set(names) - set(self.params))
        if unknown:
            raise KeyError(f"no such ES tensors: {unknown[:3]}")
        stats = UpdateStats()
        for block in self.blocks:
            for name, a, b in block:
                if name in names:
                    device = self.params[name].device
                    step = direction(name, a, b, device) * f32(scale)
                    self._commit(self._views([(name, a, b)]), step, device, stats)
        self._cache.clear()
        return stats

    @staticmethod
    def _commit(
        views: list[tuple[torch.Tensor, torch.Tensor]],
        step: torch.Tensor,
        device: torch.device,
        stats: UpdateStats,
    ) -> None:
        """master ← master + step (fp32, one rounding per element), live ← round(master), slice by slice."""
        old_master = torch.cat([m.to(device, torch.float32) for _, m in views])
        old_live = torch.cat([v.to(torch.float32) for v, _ in views])
        off = 0
        for live, master in views:
            n = live.numel()
            master.copy_(old_master[off : off + n] + step[off : off + n])
            live.copy_(master)
            off += n
        new_master = torch.cat([m.to(device, torch.float32) for _, m in views])
        new_live = torch.cat([v.to(torch.float32) for v, _ in views])
        stats.add(step, new_live - old_live, new_master - old_master)

    def checksum(self) -> str:
        """Checksum of the exact (master) weights."""
        return weights_checksum(self.master.items())

    def live_checksum(self) -> str:
        """Checksum of the live (possibly perturbed) weights."""
        return weights_checksum(self.params.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact weights by HF name, on CPU (checkpoints and repair)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.master.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Master ← ``state`` (converted to the master dtype), live ← round(master)."""
        missing = sorted(set(self.master) - set(state))
        if missing:
            raise KeyError(f"state is missing {len(missing)} tensors, e.g. {missing[:3]}")
        wrong = [k for k in self.master if tuple(state[k].shape) != tuple(self.master[k].shape)]
        if wrong:
            raise ValueError(f"state has other shapes for {len(wrong)} tensors, e.g. {wrong[:3]}")
        self.restore()
        for name, master in self.master.items():
            master.copy_(state[name])
        self.restore()
