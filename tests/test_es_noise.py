"""Device-independent counter-based noise: a pure function of (seed, name, element index), normal.

The statistical thresholds below are deterministic checks: the noise is bit-exact by construction
on every machine, so each assertion either always holds or never does.
"""

from __future__ import annotations

import math
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest
import torch

from alignment.es import noise
from alignment.es.noise import (
    NOISE_ID,
    NoiseMismatchError,
    bits_to_normal,
    combined_noise,
    gaussian,
    noise_key,
    normal_range,
    normal_segments,
    require_noise,
    self_check,
)

LARGE = 1 << 22


def cpu_state():
    return noise._state(torch.device("cpu"))


def test_noise_depends_on_seed_name_and_stream_only():
    a = gaussian(3, "model.layers.0.mlp.up_proj.weight", (4, 5), "cpu")
    assert a.dtype == torch.float32 and a.shape == (4, 5)
    assert torch.equal(a, gaussian(3, "model.layers.0.mlp.up_proj.weight", (4, 5), "cpu"))
    assert not torch.equal(a, gaussian(4, "model.layers.0.mlp.up_proj.weight", (4, 5), "cpu"))
    assert not torch.equal(a, gaussian(3, "model.layers.1.mlp.up_proj.weight", (4, 5), "cpu"))
    assert not torch.equal(a, gaussian(3, "model.layers.0.mlp.up_proj.weight", (4, 5), "cpu", stream="A"))
    # the shape only decides how many elements are read: element i is element i
    assert torch.equal(gaussian(3, "model.layers.0.mlp.up_proj.weight", (20,), "cpu"), a.view(-1))
    assert noise_key(3, "x") != noise_key(3, "y") and all(0 <= w < 2**32 for w in noise_key(3, "x"))


def test_noise_is_stable_across_processes():
    code = "from alignment.es.noise import gaussian; print(gaussian(11, 'w', (3,), 'cpu').tolist())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )  # fmt: skip
    assert eval(out.stdout) == gaussian(11, "w", (3,), "cpu").tolist()


def test_any_chunking_gives_the_same_elements(monkeypatch):
    key = noise_key(5, "model.embed_tokens.weight")
    whole = normal_range(key, 0, 200_003, "cpu")
    for start, count in [(0, 1), (1, 7), (65_535, 3), (65_536, 70_000), (123_457, 76_546)]:
        assert torch.equal(normal_range(key, start, count, "cpu"), whole[start : start + count])
    monkeypatch.setattr(cpu_state(), "chunk", 997)  # another internal chunk size
    assert torch.equal(normal_range(key, 0, 200_003, "cpu"), whole)


def test_many_segments_in_one_draw_equal_separate_draws(monkeypatch):
    segments = [(noise_key(1, "a"), 0, 5), (noise_key(2, "b"), 70_000, 3), (noise_key(1, "c"), 0, 100_000)]
    separate = torch.cat([normal_range(k, s, n, "cpu") for k, s, n in segments])
    assert torch.equal(normal_segments(segments, "cpu"), separate)
    monkeypatch.setattr(cpu_state(), "chunk", 1021)
    assert torch.equal(normal_segments(segments, "cpu"), separate)


def test_inverse_cdf_matches_exact_quantiles():
    """Every output is the normal quantile of its 32 bits (p = (2m+1)·2^-33, sign bit) to < 1e-6."""
    gen = torch.Generator().manual_seed(1)
    edges = torch.tensor([0, 1, 255, 256, 257, 2**20, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1])
    bits = torch.cat([torch.randint(0, 2**32, (20_000,), generator=gen, dtype=torch.int64), edges])
    st = cpu_state()
    as_int32 = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # the same 32-bit patterns
    z = bits_to_normal(as_int32, st.table, st.constants).double()
    m = (bits & 0x7FFFFFFF).tolist()
    exact = torch.tensor([-NormalDist().inv_cdf((2 * v + 1) * 2.0**-33) for v in m], dtype=torch.float64)
    exact = torch.where((bits >> 31) == 1, -exact, exact)
    assert (z - exact).abs().max() < 1e-6
    assert 6.2 < z.abs().max() < 6.4  # the tails reach p = 2^-33


def spec_normal(key: tuple[int, int, int], index: int) -> float:
    """The noise definition in plain Python integers: the kernels (int32 tensors) must equal it."""
    mask = 2**32 - 1
    x = index
    for word, (c1, c2) in zip(
        key, zip(noise._MULTIPLIERS[::2], noise._MULTIPLIERS[1::2], strict=True), strict=True
    ):
        x ^= word
        x ^= x >> 16
        x = (x * c1) & mask
        x ^= x >> 15
        x = (x * c2) & mask
        x ^= x >> 16
    v = 2 * (x & 0x7FFFFFFF) + 1  # p = v * 2**-33
    octave = v.bit_length() - 1
    rest = (v - (1 << octave)) << (31 - octave)  # the bits below the leading one, 31 of them
    idx, frac = octave * 256 + (rest >> 23), rest & (2**23 - 1)
    table = noise._TABLE
    z = int(table[idx]) - ((int(table[idx] - table[idx + 1]) * frac) >> 23)
    z = -z if x >> 31 else z
    return float(np.float32(z)) * 2.0**-24


def test_kernel_equals_the_plain_integer_definition_at_every_boundary():
    """Counters at the int32 sign boundary and the end of the 32-bit range, chunk edges, both paths."""
    key = noise_key(9, "model.layers.0.mlp.down_proj.weight")
    for start in (0, 65_530, 2**31 - 5, 2**32 - 9):
        got = normal_range(key, start, 9, "cpu").tolist()
        assert got == [spec_normal(key, start + i) for i in range(9)], start
    segments = [(noise_key(1, "a"), 2**31 - 2, 4), (noise_key(2, "b"), 2**32 - 3, 3), (key, 0, 2)]
    expected = [spec_normal(k, s + i) for k, s, n in segments for i in range(n)]
    assert normal_segments(segments, "cpu").tolist() == expected


def test_large_draws_are_standard_normal():
    z = gaussian(7, "model.layers.3.mlp.down_proj.weight", (LARGE,), "cpu").double()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.std() - 1) < 4 / math.sqrt(2 * n)
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 4 * math.sqrt(24 / n)
    for t in (1.0, 2.0, 3.0):  # tail masses
        p = 2 * (1 - NormalDist().cdf(t))
        assert abs((z.abs() > t).double().mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    s, _ = z.sort()
    cdf = torch.special.ndtr(s)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = max((ranks - cdf).abs().max().item(), (cdf - ranks + 1 / n).abs().max().item())
    assert ks < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov, 1 % level


def test_streams_are_uncorrelated_across_names_seeds_and_neighbours():
    n = 1 << 20
    bound = 4 / math.sqrt(n)
    base = gaussian(1, "model.layers.0.self_attn.q_proj.weight", (n,), "cpu").double()
    others = [
        gaussian(2, "model.layers.0.self_attn.q_proj.weight", (n,), "cpu"),
        gaussian(1, "model.layers.0.self_attn.k_proj.weight", (n,), "cpu"),
        gaussian(1, "model.layers.1.self_attn.q_proj.weight", (n,), "cpu"),
        gaussian(1, "model.layers.0.self_attn.q_proj.weight", (n,), "cpu", stream="A"),
    ]
    for other in others:
        assert abs(torch.corrcoef(torch.stack([base, other.double()]))[0, 1]) < bound
    for lag in (1, 2, 64, 65_536):
        assert abs(torch.corrcoef(torch.stack([base[:-lag], base[lag:]]))[0, 1]) < 4 / math.sqrt(n - lag)
    sq = base.square()  # no dependence in magnitude either
    assert abs(torch.corrcoef(torch.stack([sq[:-1], sq[1:]]))[0, 1]) < bound


def test_combined_noise_is_the_sum_of_rounded_products_in_order():
    seeds, coefs = [1, 2, 3], [0.5, -1.25, 1e-3]
    out = combined_noise(seeds, coefs, "w", (5, 7), "cpu")
    expected = torch.zeros(5, 7)
    for s, c in zip(seeds, coefs, strict=True):  # the same two roundings per term, not a fused add
        expected = expected + gaussian(s, "w", (5, 7), "cpu") * noise.f32(c)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="2 seeds but 1"):
        combined_noise([1, 2], [1.0], "w", (2,), "cpu")


def test_self_check_accepts_this_device_and_refuses_other_noise(monkeypatch):
    assert self_check("cpu") == NOISE_ID
    monkeypatch.setattr(noise, "PROBE_SHA256", "0" * 64)  # as if the device computed other noise
    with pytest.raises(NoiseMismatchError, match="differs from the reference"):
        self_check("cpu")


def test_a_compiled_kernel_that_differs_falls_back_to_eager(monkeypatch, caplog):
    st = cpu_state()
    monkeypatch.setattr(st, "compiled", True)
    monkeypatch.setattr(st, "kernel", lambda *args: noise._normal_kernel(*args) + 1.0)  # a wrong kernel
    assert self_check("cpu") == NOISE_ID
    assert not st.compiled and st.kernel is noise._normal_kernel
    assert "differs from the reference" in caplog.text


def test_require_noise_names_the_source_that_differs():
    require_noise({"engine 0": NOISE_ID, "engine 1": NOISE_ID})
    with pytest.raises(NoiseMismatchError, match=r"engine 1: 'torch.randn/v0'"):
        require_noise({"engine 0": NOISE_ID, "engine 1": "torch.randn/v0"})


def test_counters_beyond_32_bits_are_refused():
    with pytest.raises(ValueError, match="outside"):
        normal_range(noise_key(1, "w"), 2**32 - 2, 4, "cpu")
