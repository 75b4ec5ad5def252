"""ES noise: the self-check, the noise of every GPU (eager and compiled) bit for bit against the CPU's,
and its speed beside ``torch.randn`` (``bench/noise_devices.py`` uses the same functions).

The CPU draw (eager) is the reference. For each ``cuda:k`` the noise of Llama-7B-shaped tensors
(and sizes that end inside a chunk) is drawn eagerly and with the compiled kernel and compared with
``torch.equal``; the self-check probe (noise plus the perturbation and update arithmetic) must give
the reference digest there too. On a machine without a GPU those comparisons are reported as not
run: equal by construction is not equal by measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from alignment.doctor.context import Context
from alignment.doctor.report import NO_GPU, CheckResult, Figure, not_run
from alignment.es import noise

TITLE = "ES noise: self-check, CPU vs every GPU bit for bit, speed"
SHAPES = {  # HF name -> shape (Llama-7B layer 0, a norm, and awkward sizes)
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.mlp.up_proj.weight": (11008, 4096),
    "model.layers.0.input_layernorm.weight": (4096,),
    "model.odd.weight": (3, 1_398_107),
}
QUICK_SHAPES = {"model.layers.0.self_attn.q_proj.weight": (1024, 4096), "model.layers.0.input_layernorm.weight": (4096,),
                "model.odd.weight": (3, 1_398_107)}  # fmt: skip
SEED = 20261203


def draw(device: str, shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """The noise of every (name, shape) for ``seed`` drawn on ``device``, moved to the CPU."""
    out = {name: noise.gaussian(seed, name, shape, device).cpu() for name, shape in shapes.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def ns_per_element(
    fns: dict[str, Callable[[], object]], n: int, device: str, repeat: int
) -> dict[str, float]:
    """Median ns per element of each function, timed in turn ``repeat`` times (interleaved, so that
    load on a shared machine hits all alike); each is called once first (warm-up, compilation).

    On a GPU: wall time between synchronisations. On a CPU: the process's CPU time, because on a
    shared machine a draw of a few milliseconds is preempted for whole time slices, which wall time
    would charge to the draw.
    """
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for label, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[label].append((clock() - t0) / n * 1e9)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_device(
    device: str, mode: str, reference: dict[str, torch.Tensor], shapes: dict
) -> tuple[bool, bool, bool]:
    """(noise equal to ``reference``, probe digest equal to the reference, compiled as asked) on
    ``device`` with compile mode ``mode`` (``"0"`` eager, ``"1"`` compiled)."""
    noise.set_compile_mode(mode)
    got = draw(device, shapes)
    same = all(torch.equal(got[n], reference[n]) for n in shapes)
    probe = noise._probe_digest(device) == noise.PROBE_SHA256
    return same, probe, noise.compiled_on(device) == (mode == "1")


def run_noise(ctx: Context) -> CheckResult:
    shapes = QUICK_SHAPES if ctx.quick else SHAPES
    size, repeat = (1 << 20, 3) if ctx.quick else (1 << 22, 5)
    figures: list[Figure] = []
    noise.set_compile_mode("0")
    try:
        figures.append(
            Figure("self-check cpu (eager)", noise.self_check("cpu"), target=noise.NOISE_ID, verdict="met")
        )
    except noise.NoiseMismatchError as exc:
        figures.append(
            Figure(
                "self-check cpu (eager)", "DIFFERS", target=noise.NOISE_ID, verdict="missed", note=str(exc)
            )
        )
    reference = draw("cpu", shapes)
    elements = sum(t.numel() for t in reference.values())
    gpus = [f"cuda:{k}" for k in range(torch.cuda.device_count())] if ctx.on_gpu else []
    for device in gpus:
        for mode, label in (("0", "eager"), ("1", "compiled")):
            same, probe, as_asked = compare_device(device, mode, reference, shapes)
            ok = same and probe
            note = (f"{elements / 1e6:.1f}M elements of Llama-shaped tensors; update/perturbation arithmetic "
                    f"{'= reference' if probe else 'DIFFERS'}"
                    + ("" if as_asked else "; the compiled kernel fell back to eager"))  # fmt: skip
            figures.append(Figure(f"{device} ({label}) vs cpu", "bit-equal" if ok else "DIFFERS",
                                  target="bit-equal", verdict="met" if ok else "missed", note=note))  # fmt: skip
    if not gpus:
        figures.append(
            not_run(
                "CPU vs GPU bit-equality (eager, compiled)", f"{NO_GPU}: equal by construction, not measured"
            )
        )
    figures.append(
        not_run(
            "cpu (compiled) vs cpu (eager)",
            "CPU engines draw eagerly; bench/noise_devices.py --compile measures it",
        )
    )
    key = noise.noise_key(SEED, "model.embed_tokens.weight")
    for device in ["cpu", *gpus]:
        for mode in ("0",) if device == "cpu" else ("0", "1"):
            noise.set_compile_mode(mode)
            gen = torch.Generator(device=device).manual_seed(0)
            t = ns_per_element({
                "ours": lambda d=device: noise.normal_range(key, 0, size, d),
                "randn": lambda d=device, g=gen: torch.randn(size, generator=g, device=d),
            }, size, device, repeat)  # fmt: skip
            label = f"{device} ({'compiled' if mode == '1' else 'eager'})"
            figures.append(Figure(f"noise speed {label}", t["ours"], "ns/element",
                                  note=f"torch.randn {t['randn']:.3g} ns/element: {t['ours'] / t['randn']:.2f}x; "
                                  f"median of {repeat} draws of {size:,}{'' if device.startswith('cuda') else ', CPU time'}"))  # fmt: skip
    noise.set_compile_mode("auto")
    return CheckResult.from_figures("noise", TITLE, figures)
