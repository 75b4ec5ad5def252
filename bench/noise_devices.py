"""ES noise across devices: bit-equal on CPU and every GPU, and its speed beside ``torch.randn``.

    python bench/noise_devices.py                  # CPU only (equality across devices NOT checked)
    python bench/noise_devices.py --compile        # also the torch.compile'd kernel on CPU (~1 min)
    python bench/noise_devices.py --size 45088768  # on a GPU machine: CPU vs every cuda:k

For Llama-7B shaped tensors (and odd shapes that end inside a chunk), the noise of
(seed, HF name) is drawn on the CPU (eager, the reference) and on every CUDA device, eager and
compiled, and compared bit for bit; the self-check probe (noise plus the perturbation and update
arithmetic) must give the reference digest everywhere. Then ns per element of our noise and of
``torch.randn`` on each device. The last line prints whether all devices agreed and, per device,
our time over ``torch.randn``'s.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/noise_devices.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alignment.es import noise

SHAPES = {  # HF name -> shape (Llama-7B layer 0, a norm, and awkward sizes)
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.mlp.up_proj.weight": (11008, 4096),
    "model.layers.0.input_layernorm.weight": (4096,),
    "model.odd.weight": (3, 1_398_107),
}


def draw(device: str, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    out = {name: noise.gaussian(seed, name, shape, device).cpu() for name, shape in shapes.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def ns_per_element(fn, n: int, device: str, repeat: int) -> float:
    fn()  # warm-up (and compilation)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat / n * 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1 << 22, help="elements per timed draw")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the compiled kernel on CPU")
    p.add_argument("--seed", type=int, default=20261203)
    args = p.parse_args(argv)

    devices = ["cpu"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    print(f"noise {noise.NOISE_ID}; torch {torch.__version__}; devices: {', '.join(devices)}")
    noise.set_compile_mode("0")
    reference = draw("cpu", SHAPES, args.seed)
    modes = {"cpu": ["0", "1"] if args.compile else ["0"]}
    modes.update({d: ["0", "1"] for d in devices[1:]})
    agree: list[str] = []
    for device, device_modes in modes.items():
        for mode in device_modes:
            noise.set_compile_mode(mode)
            label = f"{device}/{'compiled' if mode == '1' else 'eager'}"
            got = draw(device, SHAPES, args.seed)
            same = all(torch.equal(got[n], reference[n]) for n in SHAPES)
            probe = noise._probe_digest(device) == noise.PROBE_SHA256
            if same and probe:
                agree.append(label)
            compiled = noise.compiled_on(device)
            print(f"  {label:<20} noise {'bit-equal' if same else 'DIFFERS'} to cpu/eager; update arithmetic "
                  f"{'= reference' if probe else 'DIFFERS'}{'' if compiled == (mode == '1') else ' (fell back to eager)'}")  # fmt: skip
    if len(devices) == 1:
        print("  no CUDA device here: equality across devices is NOT checked by this run")

    ratios = []
    key = noise.noise_key(args.seed, "model.embed_tokens.weight")
    for device, device_modes in modes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        randn = ns_per_element(
            lambda d=device, g=gen: torch.randn(args.size, generator=g, device=d),
            args.size,
            device,
            args.repeat,
        )
        for mode in device_modes:
            noise.set_compile_mode(mode)
            ours = ns_per_element(lambda d=device: noise.normal_range(key, 0, args.size, d), args.size, device,
                                  args.repeat)  # fmt: skip
            label = f"{device}/{'compiled' if mode == '1' else 'eager'}"
            print(
                f"  {label:<20} {ours:8.2f} ns/element   torch.randn {randn:8.2f}   ratio {ours / randn:6.2f}x"
            )
            ratios.append(f"{label}={ours / randn:.2f}x")
    all_agree = len(agree) == sum(len(m) for m in modes.values())
    print(f"noise_devices: devices_equal={'yes' if all_agree else 'NO'} ({len(devices)} device(s)) "
          f"ours_over_randn {' '.join(ratios)}")  # fmt: skip
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
