"""Seeded weight noise for evolution strategies, the same on every device: a member is an integer seed.

The noise of one parameter tensor is a pure function of (member seed, canonical Hugging Face name,
element index): element ``i`` of the flattened tensor is computed from ``i`` alone by a
counter-based generator, so it is

- the same on every GPU model, on CPU, in any chunking and under ``torch.compile``;
- i.i.d. across tensors and members (every (seed, name) has its own 96-bit key);
- reproducible from (seed, name) alone: engines exchange seeds and coefficients, never weights
  (vLLM writes the q/k/v and gate/up noise into slices of its fused tensors by HF name).

Why not ``torch.randn`` with a seeded generator: PyTorch sizes the CUDA kernel's grid, and with it
which Philox offsets each element gets, from the card's multiprocessor count, so large tensors get
different values on an A100, an H100 or a MIG slice (PyTorch issues #143086, #196613).

How (implementation ``NOISE_ID``): ``blake2b(seed, name)`` gives three 32-bit key words; the
element index goes through three rounds of a multiply-xorshift hash (a bijection of 32-bit
integers), each round keyed by one word; the 32 output bits become a standard normal by an inverse
CDF: 1 sign bit, and 31 bits as a tail probability p = (2m + 1)·2⁻³³ that is located in its binary
octave (32 octaves, 256 sub-bins each) and interpolated linearly between exact quantiles stored in
fixed point (2⁻²⁴), in integer arithmetic that is exact on every device
(:mod:`alignment.es.noise_kernel`). So CPU and CUDA engines agree bit for bit by construction, and
:func:`self_check` proves it for a device at engine start (``bench/noise_devices.py`` compares
devices directly). Resolution: tails to |z| ≈ 6.3, values on a 2⁻²⁴ grid, quantile interpolation
error below 1e-6.

Speed (``bench/noise_devices.py``, which times the previous all-int64 formulation of the same values
beside it): eager on CPU ~11 ns/element, about 3x ``torch.randn``'s CPU time (the int64 formulation:
2-3x more, and 5x on a toy member's draw, whose temporaries were page-faulted in on every chunk;
eager CPU draws now compute in per-thread buffers); with ``torch.compile`` (one fused kernel,
identical results because every step is exact) ~6 ns/element on CPU after a compile of 15-60 s.
``ALIGNMENT_ES_NOISE_COMPILE``: ``auto`` (default: compile on CUDA), ``1`` (also on CPU), ``0``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from alignment.es.noise_kernel import (  # noqa: F401 - _MULTIPLIERS, _TABLE, hash_bits: the definition's parts, for tests
    _MULTIPLIERS,
    _TABLE,
    TABLE_SHA256,
    NoiseMismatchError,
    Workspace,
    _buf,
    _normal_kernel,
    _s32,
    bits_to_normal,
    constants,
    hash_bits,
    packed_table,
    workspace,
)

logger = logging.getLogger(__name__)

NOISE_NAME = "hash32x3-icdf256"
NOISE_VERSION = 1
NOISE_ID = f"{NOISE_NAME}/v{NOISE_VERSION}"

_MAX_NUMEL = 1 << 32  # element indices are 32-bit counters
PROBE_SHA256 = "f721ab2daaa1b27b73984ed2ccabae751f0911737207256bc8e307ca8328c1cd"


def noise_key(member_seed: int, name: str, stream: str = "") -> tuple[int, int, int]:
    """Three 32-bit key words for (member seed, HF parameter name[, stream]); stable across runs.

    ``stream`` separates several draws for one parameter (e.g. low-rank factors ``"A"``/``"B"``);
    the empty stream is the full-rank noise.
    """
    text = f"{int(member_seed)}\x00{name}" + (f"\x00{stream}" if stream else "")
    digest = hashlib.blake2b(text.encode(), digest_size=12).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


COMPILE_ENV = "ALIGNMENT_ES_NOISE_COMPILE"


class _DeviceState:
    """The quantile table on one device and the kernel used there (eager, or compiled once)."""

    def __init__(self, device: torch.device) -> None:
        self.table = packed_table().to(device)
        self.constants = constants(device)
        mode = os.environ.get(COMPILE_ENV, "auto").lower()
        self.compiled = mode in {"1", "true", "on"} or (mode == "auto" and device.type == "cuda")
        # compiled kernels have one fixed shape (the last chunk is computed whole and cut)
        self.chunk = (1 << 22) if device.type == "cuda" else (1 << 16)
        self.offsets = torch.arange(self.chunk, dtype=torch.int32, device=device)
        self.kernel = _normal_kernel
        self._local = threading.local()  # per-thread workspace (eager CPU kernels)
        if self.compiled:
            try:
                self.kernel = torch.compile(_normal_kernel, dynamic=False, fullgraph=True)
            except Exception as exc:  # noqa: BLE001 - same numbers either way, only slower
                logger.warning("torch.compile unavailable for ES noise on %s (%s); eager", device, exc)
                self.compiled = False

    def workspace(self) -> Workspace | None:
        """This thread's buffers for the eager kernel on a CPU; None elsewhere (a compiled kernel has
        no temporaries to keep, and CUDA's caching allocator already reuses them)."""
        if self.compiled or self.offsets.device.type != "cpu":
            return None
        ws = getattr(self._local, "ws", None)
        if ws is None or ws["x"].numel() < self.chunk:
            ws = self._local.ws = workspace(self.chunk)
        return ws


_STATES: dict[torch.device, _DeviceState] = {}
_STATES_LOCK = threading.Lock()


def _state(device: torch.device) -> _DeviceState:
    with _STATES_LOCK:
        if device not in _STATES:
            _STATES[device] = _DeviceState(device)
        return _STATES[device]


def set_compile_mode(mode: str) -> None:
    """``auto`` (compile on CUDA), ``1`` (everywhere) or ``0``: for this process, from the next draw on
    (the numbers are the same in every mode; only the speed differs)."""
    if mode not in {"auto", "1", "0"}:
        raise ValueError(f"compile mode must be auto, 1 or 0, got {mode!r}")
    os.environ[COMPILE_ENV] = mode
    with _STATES_LOCK:
        _STATES.clear()


def compiled_on(device: torch.device | str) -> bool:
    """Whether draws on ``device`` use the compiled kernel."""
    return _state(torch.device(device)).compiled


def _run(st: _DeviceState, device: torch.device, out: torch.Tensor, *args: torch.Tensor) -> None:
    """``out`` ← the kernel on ``args`` (out's length: the chunk's, a compiled kernel's result is cut)."""
    if not st.compiled:
        _normal_kernel(*args, st.table, st.constants, st.workspace(), out)
        return
    try:
        out.copy_(st.kernel(*args, st.table, st.constants)[: out.numel()])
    except Exception as exc:  # noqa: BLE001 - a failed compilation: same numbers, eager
        logger.warning("compiled ES noise failed on %s (%s); using eager kernels", device, exc)
        st.kernel, st.compiled = _normal_kernel, False
        _run(st, device, out, *args)


def _padded(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` (1-D) zero-padded to ``size``: a compiled kernel has one shape."""
    return t if t.numel() == size else torch.cat([t, t.new_zeros(size - t.numel())])


def normal_range(key: Sequence[int], start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Elements ``start .. start+count-1`` of the stream ``key`` as a fp32 tensor of shape (count,)."""
    device = torch.device(device)
    if start < 0 or start + count > _MAX_NUMEL:
        raise ValueError(f"noise elements {start}..{start + count} outside [0, 2**32)")
    st = _state(device)
    k0, k1, k2 = (torch.tensor(_s32(w), dtype=torch.int32, device=device) for w in key)
    out = torch.empty(count, dtype=torch.float32, device=device)
    for a in range(0, count, st.chunk):
        b = min(a + st.chunk, count)
        offsets = st.offsets if st.compiled else st.offsets[: b - a]
        # int32 addition wraps past 2³¹ like the multiplications: the counter's 32-bit pattern
        begin = torch.tensor(_s32(start + a), dtype=torch.int32, device=device)
        _run(st, device, out[a:b], begin, offsets, k0, k1, k2)
    return out


class Layout(NamedTuple):
    """Where the elements of a concatenation of segments come from (:func:`segment_index`)."""

    counter: torch.Tensor  # (n,) int32: element e is element counter[e] of its segment's stream
    which: torch.Tensor  # (n,) int64: the segment of element e
    bounds: tuple[tuple[int, int], ...]  # (first, end) of each segment within the concatenation


def segment_index(segments: Sequence[tuple[int, int]], device: torch.device | str) -> Layout:
    """The :class:`Layout` of the concatenation of segments (start, count) for :func:`normal_indexed`.
    Independent of the keys, so a caller drawing the same layout for many members builds it once."""
    counts = [count for _, count in segments]
    if any(start < 0 or start + count > _MAX_NUMEL for start, count in segments):
        raise ValueError("noise elements outside [0, 2**32)")
    which = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(counts))
    firsts = torch.tensor([0, *counts[:-1]], dtype=torch.int64).cumsum(0)
    shift = torch.tensor([start for start, _ in segments], dtype=torch.int64) - firsts
    counter = torch.arange(sum(counts), dtype=torch.int64) + shift[which]
    counter = torch.where(counter >= 1 << 31, counter - (1 << 32), counter).to(torch.int32)  # 32-bit patterns
    ends = list(itertools.accumulate(counts))
    bounds = tuple((end - count, end) for end, count in zip(ends, counts, strict=True))
    return Layout(counter.to(device), which.to(device), bounds)


def normal_indexed(layout: Layout, keys: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """Noise of element ``layout.counter[e]`` of the stream ``keys[layout.which[e]]`` for every e (fp32, 1-D).

    Eagerly each segment's key words are applied to its slice of a chunk (a few in-place ops per
    segment); a compiled kernel (one fixed shape) gets them gathered per element instead.
    """
    device = torch.device(device)
    st = _state(device)
    words = torch.tensor([[_s32(w) for w in k] for k in keys], dtype=torch.int32, device=device)
    n = layout.counter.numel()
    out = torch.empty(n, dtype=torch.float32, device=device)
    if st.compiled:
        columns = [words[:, j].contiguous() for j in range(3)]
        zero = torch.zeros((), dtype=torch.int32, device=device)
        for a in range(0, n, st.chunk):
            b = min(a + st.chunk, n)
            parts = [layout.counter[a:b], *(c.index_select(0, layout.which[a:b]) for c in columns)]
            _run(st, device, out[a:b], zero, *(_padded(t, st.chunk) for t in parts))
        return out
    rows = list(zip(*(words[:, j].unbind() for j in range(3)), strict=True))  # 0-d words per segment
    for a in range(0, n, st.chunk):
        b = min(a + st.chunk, n)
        here = [
            (max(f, a) - a, min(e, b) - a, rows[i])
            for i, (f, e) in enumerate(layout.bounds)
            if f < b and e > a
        ]
        ws = st.workspace()
        bits_to_normal(
            hash_bits(layout.counter[a:b], here, st.constants, ws), st.table, st.constants, ws, out[a:b]
        )
    return out


def normal_segments(
    segments: Sequence[tuple[Sequence[int], int, int]], device: torch.device | str
) -> torch.Tensor:
    """``cat([normal_range(key, start, count) for key, start, count in segments])`` in one pass.

    Many small tensors (norms, biases, a small model's matrices) then cost one kernel call instead
    of one each: every element carries its own key and counter, so the values are the same.
    """
    if len(segments) == 1:
        return normal_range(*segments[0], device)
    layout = segment_index([(start, count) for _, start, count in segments], device)
    return normal_indexed(layout, [key for key, _, _ in segments], device)


def gaussian(
    member_seed: int,
    name: str,
    shape: Sequence[int] | torch.Size,
    device: torch.device | str,
    stream: str = "",
) -> torch.Tensor:
    """Standard normal noise (fp32) of ``shape`` for parameter ``name`` of member ``member_seed``."""
    shape = tuple(shape)
    return normal_range(noise_key(member_seed, name, stream), 0, math.prod(shape), device).view(shape)


def f32(x: float) -> float:
    """``x`` rounded to fp32: the scalar every device multiplies fp32 noise by."""
    return float(np.float32(x))


def add_scaled_(acc: torch.Tensor, noise: torch.Tensor, coef: float) -> torch.Tensor:
    """acc += noise · fp32(coef), as a multiplication then an addition: two IEEE roundings on every
    device (``add_(x, alpha=c)`` may become one fused multiply-add on one device and not another)."""
    return acc.add_(noise * f32(coef))


def combined_noise(
    seeds: Sequence[int],
    coefficients: Sequence[float],
    name: str,
    shape: Sequence[int] | torch.Size,
    device: torch.device | str,
) -> torch.Tensor:
    """Σ cᵢ εᵢ(name) in fp32, summed in the order given: the direction of one ES update for one tensor."""
    if len(seeds) != len(coefficients):
        raise ValueError(f"{len(seeds)} seeds but {len(coefficients)} coefficients")
    acc = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    for seed, coef in zip(seeds, coefficients, strict=True):
        if coef != 0.0:
            add_scaled_(acc, gaussian(seed, name, shape, device), coef)
    return acc


def _probe_digest(device: torch.device | str) -> str:
    """Digest of noise and of the update/perturbation arithmetic on ``device`` (several chunks)."""
    h = hashlib.sha256()
    shape = (3, 70001)
    eps = gaussian(12345, "model.probe.weight", shape, device)
    direction = combined_noise([1, 2, 3], [0.5, -1.25, 2.0], "model.layers.0.probe.weight", shape, device)
    master = eps * f32(0.02)
    moved = master + direction * f32(1.7e-5)
    live = (master + eps * f32(-1e-3)).to(torch.bfloat16)
    for t in (eps, direction, moved, live):
        h.update(t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def self_check(device: torch.device | str) -> str:
    """``NOISE_ID`` if ``device`` computes exactly the reference noise and update arithmetic, else
    :class:`NoiseMismatchError`. Engines call it at start, so a device that would differ never joins."""
    digest = _probe_digest(device)
    st = _state(torch.device(device))
    if digest != PROBE_SHA256 and st.compiled:  # the compiled kernel is wrong here: try eager
        st.kernel, st.compiled = _normal_kernel, False
        digest = _probe_digest(device)
        if digest == PROBE_SHA256:
            logger.warning("compiled ES noise differs from the reference on %s; using eager kernels", device)
    if digest != PROBE_SHA256:
        raise NoiseMismatchError(
            f"ES noise on {device} differs from the reference ({NOISE_ID}: probe sha256 {digest}, "
            f"expected {PROBE_SHA256}); an engine there would perturb and update with other noise"
        )
    return NOISE_ID


def require_noise(found: dict[str, str], expected: str = NOISE_ID) -> None:
    """Refuse a run whose engines (or whose replay log / checkpoint) use another noise: ``found``
    maps where each noise id came from (e.g. ``"engine 2"``) to the id."""
    wrong = {where: nid for where, nid in found.items() if nid != expected}
    if wrong:
        detail = ", ".join(f"{where}: {nid!r}" for where, nid in wrong.items())
        raise NoiseMismatchError(
            f"ES noise mismatch: this code draws {expected!r} but {detail}. Updates from other noise "
            "cannot be replayed or combined; use the code version that wrote them, or start a new run"
        )
