"""The ES noise's previous eager formulation (int64 arithmetic), kept as the benchmarks' baseline.

Until issue 22 :mod:`alignment.es.noise` computed the same values with every step on int64 tensors
(a 32-bit hash held in int64, masked after each multiplication; two table gathers; Python scalars
in every op). ``bench/noise_devices.py`` and ``bench/es_iteration.py --compare-noise`` time it
beside the current int32 formulation in the same run; :func:`check_equal` proves both give the same
bits first, so the comparison is of speed alone. Not used by the package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from alignment.es import noise, weights

_M32 = 0xFFFFFFFF
_TABLE = torch.from_numpy(noise._TABLE)
_DIFFS = _TABLE[:-1] - _TABLE[1:]
CHUNK = 1 << 16  # what the int64 kernel used on CPU


def _mix_(x: torch.Tensor, c1: int, c2: int) -> torch.Tensor:
    x.bitwise_xor_(x >> 16)
    x.mul_(c1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(c2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _kernel(counter: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    c = noise._MULTIPLIERS
    x = _mix_(counter ^ k0, c[0], c[1])
    x = _mix_(x.bitwise_xor_(k1), c[2], c[3])
    bits = _mix_(x.bitwise_xor_(k2), c[4], c[5])
    sign = bits >> 31
    f64 = (((bits & 0x7FFFFFFF) << 1) | 1).to(torch.float64).view(torch.int64)
    idx = (f64 >> 44) - (1023 << 8)
    frac = (f64 >> 21) & ((1 << 23) - 1)
    table, diffs = _TABLE.to(counter.device), _DIFFS.to(counter.device)
    z = table.index_select(0, idx) - ((diffs.index_select(0, idx) * frac) >> 23)
    z = (z ^ -sign) + sign
    return z.to(torch.float32) * (2.0**-24)


def normal_range(key: Sequence[int], start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """As :func:`alignment.es.noise.normal_range`, eagerly in int64."""
    k0, k1, k2 = (torch.tensor(w, dtype=torch.int64, device=device) for w in key)
    offsets = torch.arange(CHUNK, dtype=torch.int64, device=device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    for a in range(0, count, CHUNK):
        b = min(a + CHUNK, count)
        out[a:b] = _kernel(offsets[: b - a] + (start + a), k0, k1, k2)
    return out


def segment_index(
    segments: Sequence[tuple[int, int]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`alignment.es.noise.segment_index`, as (int64 counters, segment of each element)."""
    layout = noise.segment_index(segments, device)
    return layout.counter.to(torch.int64) & _M32, layout.which


def normal_indexed(
    layout: tuple[torch.Tensor, torch.Tensor], keys: Sequence[Sequence[int]], device: torch.device | str
) -> torch.Tensor:
    """As :func:`alignment.es.noise.normal_indexed`, eagerly in int64."""
    counter, which = layout
    words = torch.tensor([list(k) for k in keys], dtype=torch.int64, device=device)
    per_element = [words[:, j].contiguous().index_select(0, which) for j in range(3)]
    out = torch.empty(counter.numel(), dtype=torch.float32, device=device)
    for a in range(0, counter.numel(), CHUNK):
        b = min(a + CHUNK, counter.numel())
        out[a:b] = _kernel(counter[a:b], *(t[a:b] for t in per_element))
    return out


def check_equal() -> None:
    """Both formulations give the same bits (a range across chunks, and segments); else AssertionError."""
    key = noise.noise_key(20261204, "model.embed_tokens.weight")
    if not torch.equal(normal_range(key, 123, 200_003, "cpu"), noise.normal_range(key, 123, 200_003, "cpu")):
        raise AssertionError("the int64 baseline and alignment.es.noise differ")
    layout = [(0, 5), (70_000, 3), (0, 100_000)]
    keys = [noise.noise_key(i, n) for i, n in enumerate("abc")]
    mine = normal_indexed(segment_index(layout, "cpu"), keys, "cpu")
    if not torch.equal(mine, noise.normal_indexed(noise.segment_index(layout, "cpu"), keys, "cpu")):
        raise AssertionError("the int64 baseline and alignment.es.noise differ on segments")


@contextlib.contextmanager
def in_es_weights() -> Iterator[None]:
    """ES engines built inside the block draw their full-rank noise with this formulation."""
    saved = weights.normal_range, weights.normal_indexed, weights.segment_index
    weights.normal_range, weights.normal_indexed, weights.segment_index = (
        normal_range,
        normal_indexed,
        segment_index,
    )
    try:
        yield
    finally:
        weights.normal_range, weights.normal_indexed, weights.segment_index = saved
