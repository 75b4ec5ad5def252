"""ES noise across devices: bit-equal on CPU and every GPU, and its speed beside ``torch.randn``.

    python bench/noise_devices.py                  # CPU only (equality across devices NOT checked)
    python bench/noise_devices.py --compile        # also the torch.compile'd kernel on CPU (~1 min)
    python bench/noise_devices.py --sizes 45088768  # on a GPU machine: CPU vs every cuda:k

For Llama-7B shaped tensors (and odd shapes that end inside a chunk), the noise of
(seed, HF name) is drawn on the CPU (eager, the reference) and on every CUDA device, eager and
compiled, and compared bit for bit; the self-check probe (noise plus the perturbation and update
arithmetic) must give the reference digest everywhere. Then ns per element of our noise and of
``torch.randn`` on each device (on a GPU wall time, on the CPU the process's CPU time: a draw of a
few milliseconds on a shared machine is otherwise charged the time slices it waits), and on the CPU
of the previous all-int64 formulation of the same values (``bench/noise_int64.py``, checked
bit-equal first), interleaved over ``--repeat`` rounds (median). The last line prints whether all devices agreed, per device our time over
``torch.randn``'s, and on the CPU the int64 formulation's time over ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("alignment") is None:  # `python bench/noise_devices.py`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import noise_int64  # noqa: E402 - bench/ is on sys.path: this script's own folder
import torch

from alignment.doctor.checks.noise import SHAPES, draw, ns_per_element
from alignment.es import noise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[139_712, 1 << 22],
        help="elements per timed draw, comma-separated (139,712: a toy policy member, as ES draws it)",
    )
    p.add_argument("--repeat", type=int, default=7, help="timed rounds (median)")
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
    noise_int64.check_equal()
    for size in args.sizes:
        print(f"  draws of {size:,} elements (median of {args.repeat}, interleaved):")
        for device, device_modes in modes.items():
            gen = torch.Generator(device=device).manual_seed(0)
            for mode in device_modes:
                noise.set_compile_mode(mode)
                label = f"{device}/{'compiled' if mode == '1' else 'eager'}"
                fns = {
                    "ours": lambda d=device, n=size: noise.normal_range(key, 0, n, d),
                    "randn": lambda d=device, g=gen, n=size: torch.randn(n, generator=g, device=d),
                }
                if device == "cpu" and mode == "0":
                    fns["int64"] = lambda n=size: noise_int64.normal_range(key, 0, n, "cpu")
                t = ns_per_element(fns, size, device, args.repeat)
                print(f"    {label:<18} {t['ours']:8.2f} ns/element   torch.randn {t['randn']:8.2f}   "
                      f"ratio {t['ours'] / t['randn']:6.2f}x")  # fmt: skip
                ratios.append(f"{label}@{size}={t['ours'] / t['randn']:.2f}x")
                if "int64" in t:
                    print(f"    {'cpu/eager int64':<18} {t['int64']:8.2f} ns/element   (the previous formulation: "
                          f"{t['int64'] / t['ours']:.2f}x ours)")  # fmt: skip
                    ratios.append(f"int64_over_ours@{size}={t['int64'] / t['ours']:.2f}x")
    all_agree = len(agree) == sum(len(m) for m in modes.values())
    print(f"noise_devices: devices_equal={'yes' if all_agree else 'NO'} ({len(devices)} device(s)) "
          f"ours_over_randn {' '.join(ratios)}")  # fmt: skip
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
