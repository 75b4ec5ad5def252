"""The arithmetic of the ES noise (:mod:`alignment.es.noise` draws with it): a 32-bit hash of (key,
element index) and a fixed-point inverse CDF, on int32/int64 tensors, the same bits on every device.

Every step is integer arithmetic, or floating-point arithmetic on integers below 2⁵³ (exact), except
one int → fp32 conversion (round to nearest, IEEE) times a power of two. The hash runs on int32
tensors holding the 32-bit patterns: its products wrap modulo 2³² (the low 32 bits, all the hash
keeps) and right shifts are masked to be logical; the table step is int64 (products below 2⁵⁰).
Transcendental functions, whose last bits differ between libraries and SIMD widths, are never
evaluated on a tensor: the quantile table is built once per process in double precision and checked
against ``TABLE_SHA256``. :func:`alignment.es.noise.self_check` proves a device computes it.
"""

from __future__ import annotations

import hashlib
import math
from statistics import NormalDist

import numpy as np
import torch


class NoiseMismatchError(RuntimeError):
    """Noise, or the arithmetic on it, would differ from what the rest of the run uses."""


_M32 = 0xFFFFFFFF
# odd multipliers below 2**31 (0-d int32 constants; an int64 formulation kept the products below 2**63)
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39, 0x21F0AAAD, 0x5BD1E995, 0x1B873593)
_SUB_BITS = 8  # 256 sub-bins per octave of the tail probability
_FIXED_BITS = 24  # quantiles in units of 2**-24
TABLE_SHA256 = "b29f3ef23898a4e2a9586d346b3b1177c97fb1f5f21da4d1bb2d9922f3f438ae"


def _quantile(p: float) -> float:
    """-Φ⁻¹(p): the standard normal z with tail probability p."""
    return -NormalDist().inv_cdf(p)


def _build_table() -> np.ndarray:
    """Fixed-point quantiles at p = 2^(k-33)·(1 + j/256), k = 0..31, j = 0..255, and p = 0.5 last.

    Built in double precision; each entry must lie well away from a rounding boundary so that any
    libm (whose last-bit errors are ~1e-16 relative) rounds it the same way.
    """
    sub = 1 << _SUB_BITS
    out = np.empty(32 * sub + 1, dtype=np.int64)
    for n in range(32 * sub + 1):
        k, j = divmod(n, sub)
        scaled = _quantile(math.ldexp(1.0 + j / sub, k - 33)) * (1 << _FIXED_BITS)
        if abs(scaled - math.floor(scaled) - 0.5) < 1e-6:
            raise NoiseMismatchError(f"noise table entry {n} is too close to a rounding boundary")
        out[n] = round(scaled)
    return out


_TABLE = _build_table()
if hashlib.sha256(_TABLE.tobytes()).hexdigest() != TABLE_SHA256:
    raise NoiseMismatchError(
        f"this platform builds the noise quantile table differently (sha256 "
        f"{hashlib.sha256(_TABLE.tobytes()).hexdigest()}, expected {TABLE_SHA256}); its ES noise "
        "would differ from other machines'"
    )


def _s32(word: int) -> int:
    """The 32-bit pattern ``word`` (0 <= word < 2³²) as the int32 value with the same bits."""
    return word - (1 << 32) if word >= 1 << 31 else word


# Every constant of the kernel, as 0-d tensors on the kernel's device: an eager op with a Python
# scalar wraps it into a tensor first, which on CPU costs as much as the op on a 64K-element chunk.
_INT32_CONSTANTS = {
    **{f"c{i}": c for i, c in enumerate(_MULTIPLIERS)},
    "s15": 15, "s16": 16, "s31": 31, "m15": (1 << 17) - 1, "m16": (1 << 16) - 1, "m31": 0x7FFFFFFF,
}  # fmt: skip
_INT64_CONSTANTS = {
    "s_idx": 52 - _SUB_BITS, "s_frac": 52 - _SUB_BITS - 23, "bias": 1023 << _SUB_BITS,
    "m23": (1 << 23) - 1, "s23": 23, "s32": 32, "m32": _M32,
}  # fmt: skip
_FLOAT_CONSTANTS = {"two": (2.0, torch.float64), "one": (1.0, torch.float64),
                    "unit": (2.0**-_FIXED_BITS, torch.float32)}  # fmt: skip
Constants = dict[str, torch.Tensor]


def constants(device: torch.device | str) -> Constants:
    """The kernel's constants on ``device`` (what :func:`hash_bits` and :func:`bits_to_normal` take)."""
    out = {k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in _INT32_CONSTANTS.items()}
    out.update({k: torch.tensor(v, dtype=torch.int64, device=device) for k, v in _INT64_CONSTANTS.items()})
    out.update({k: torch.tensor(v, dtype=dt, device=device) for k, (v, dt) in _FLOAT_CONSTANTS.items()})
    return out


Workspace = dict[str, torch.Tensor]  # eager CPU kernels: buffers of one chunk, reused by every draw
_WORKSPACE = {"x": torch.int32, "tmp": torch.int32, "sign": torch.int32, "f64": torch.float64,
              "idx": torch.int64, "frac": torch.int64, "entry": torch.int64, "step": torch.int64}  # fmt: skip


def workspace(size: int, device: torch.device | str = "cpu") -> Workspace:
    """Buffers for :func:`_normal_kernel` on chunks of up to ``size`` elements (~60 bytes each).

    Why on CPU: a fresh temporary of a 64K-element chunk is above glibc's mmap/trim thresholds, so
    the kernel's ~10 temporaries were handed back to the OS and page-faulted in again on every chunk
    (~15 faults per thousand elements; three quarters of the eager kernel's time). Reused buffers
    fault once. Each thread gets its own (engines may draw from several threads at once).
    """
    return {name: torch.empty(size, dtype=dt, device=device) for name, dt in _WORKSPACE.items()}


def _buf(ws: Workspace | None, name: str, n: int) -> torch.Tensor | None:
    return None if ws is None else ws[name][:n]


def _lsr(x: torch.Tensor, k: Constants, shift: int, tmp: torch.Tensor | None) -> torch.Tensor:
    """Logical right shift of 32-bit patterns held in int32 (``>>`` copies the sign bit: mask it off)."""
    return torch.bitwise_right_shift(x, k[f"s{shift}"], out=tmp).bitwise_and_(k[f"m{shift}"])


def _mix_(x: torch.Tensor, k: Constants, c1: str, c2: str, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """One round of a multiply-xorshift hash of 32-bit patterns in int32 (a bijection), in place
    (``tmp``: a buffer shaped like ``x`` for the shifted copy, or None to allocate one).

    The products wrap modulo 2³², as int32 multiplication does on every torch backend (two's
    complement hardware multiplies, SIMD or scalar; CUDA ``mul.lo``): the low 32 bits of the
    product, which is all the hash keeps. :func:`self_check` proves it for a device and kernel.
    """
    x.bitwise_xor_(_lsr(x, k, 16, tmp))
    x.mul_(k[c1])
    x.bitwise_xor_(_lsr(x, k, 15, tmp))
    x.mul_(k[c2])
    return x.bitwise_xor_(_lsr(x, k, 16, tmp))


Keys = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | list[tuple[int, int, tuple[torch.Tensor, ...]]]


def _xor_key_(x: torch.Tensor, keys: Keys, j: int) -> torch.Tensor:
    """x ^= key word ``j``, in place: ``keys`` is three int32 tensors (0-d, or one key per element),
    or (eager) a list of (first, end, three 0-d words): one in-place op per segment of ``x``."""
    if isinstance(keys, tuple):
        return x.bitwise_xor_(keys[j])
    for first, end, words in keys:
        x[first:end].bitwise_xor_(words[j])
    return x


def hash_bits(counter: torch.Tensor, keys: Keys, k: Constants, ws: Workspace | None = None) -> torch.Tensor:
    """32 random bits per element of the int32 ``counter`` (element indices as 32-bit patterns), as
    int32, under the int32 key words ``keys`` (:func:`_xor_key_`; :func:`_s32` turns a word into
    one). ``ws``: buffers to compute in (:func:`workspace`)."""
    n = counter.numel()
    tmp, x = _buf(ws, "tmp", n), _buf(ws, "x", n)
    if isinstance(keys, tuple):
        x = torch.bitwise_xor(counter, keys[0], out=x)
    else:
        x = _xor_key_(counter.clone() if x is None else x.copy_(counter), keys, 0)
    x = _mix_(x, k, "c0", "c1", tmp)
    x = _mix_(_xor_key_(x, keys, 1), k, "c2", "c3", tmp)
    return _mix_(_xor_key_(x, keys, 2), k, "c4", "c5", tmp)


def bits_to_normal(
    bits: torch.Tensor, table: torch.Tensor, k: Constants, ws: Workspace | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Standard normal fp32 values from 32-bit patterns (int32 tensor), by the fixed-point inverse CDF.

    v = 2m + 1 (odd, p = v·2⁻³³) is exact in float64, whose bits are then read as integers: the
    exponent is v's octave, the top 8 mantissa bits its sub-bin (together the table index), the
    next 23 bits the position inside the sub-bin (the bits below are zero: v has at most 32).
    ``table`` packs each sub-bin's quantile (high 32 bits) and its step to the next (low 32 bits) in
    one int64 (:func:`packed_table`), so one gather reads both. |z| < 2²⁷ (2⁻²⁴ units), so the
    sign is applied in int32 (an exact two's complement negation, never a float ``-0.0``).
    ``ws``/``out``: buffers to compute in and the fp32 tensor to write (None: allocated).
    """
    n = bits.numel()
    sign = torch.bitwise_right_shift(bits, k["s31"], out=_buf(ws, "sign", n))  # -1 where the sign bit is set
    m = torch.bitwise_and(bits, k["m31"], out=_buf(ws, "tmp", n))
    f64 = m.to(torch.float64) if ws is None else ws["f64"][:n].copy_(m)
    f64 = f64.mul_(k["two"]).add_(k["one"]).view(torch.int64)
    idx = torch.bitwise_right_shift(f64, k["s_idx"], out=_buf(ws, "idx", n)).sub_(k["bias"])
    frac = torch.bitwise_right_shift(f64, k["s_frac"], out=_buf(ws, "frac", n)).bitwise_and_(k["m23"])
    entry = torch.index_select(table, 0, idx, out=_buf(ws, "entry", n))
    step = (
        torch.bitwise_and(entry, k["m32"], out=_buf(ws, "step", n)).mul_(frac).bitwise_right_shift_(k["s23"])
    )
    z64 = entry.bitwise_right_shift_(k["s32"]).sub_(step)
    z = z64.to(torch.int32) if ws is None else ws["tmp"][:n].copy_(z64)
    z = z.bitwise_xor_(sign).sub_(sign)  # two's complement: -z where the sign bit is set
    z = z.to(torch.float32) if out is None else out.copy_(z)
    return z.mul_(k["unit"])


def packed_table() -> torch.Tensor:
    """The quantile table as int64 entries ``quantile << 32 | (quantile - next quantile)``, (8192,)."""
    table = torch.from_numpy(_TABLE)
    return (table[:-1] << 32) | (table[:-1] - table[1:])


def _normal_kernel(
    start: torch.Tensor,
    offsets: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    table: torch.Tensor,
    k: Constants,
    ws: Workspace | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    counter = torch.add(offsets, start, out=_buf(ws, "x", offsets.numel()))
    return bits_to_normal(hash_bits(counter, (k0, k1, k2), k, ws), table, k, ws, out)
