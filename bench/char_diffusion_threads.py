"""Character diffusion on a CPU: OpenMP threads and how they wait, with and without a competing process.

    python bench/char_diffusion_threads.py [--rounds 5] [--steps 3]

Times one pretraining step of the CPU recipe's generator (alignment/char_diffusion/cpu/train.yaml:
4 layers × 128, 64 blocks of 64 characters; forward, backward, AdamW) in a fresh process per
setting, since OpenMP reads its settings once, when torch loads it:

- ``1 thread``;
- ``2 threads`` with OpenMP's default wait policy (libgomp spins for a while at the end of every
  parallel region before it sleeps);
- ``2 threads passive`` (``OMP_WAIT_POLICY=PASSIVE``: a thread with nothing to do sleeps at once).

Each setting runs alone and then beside a competing process (one thread of matrix products; what a
second job, a test run or a TensorBoard server does to a 2-core machine). The settings alternate
for ``--rounds`` rounds so that a load that drifts during the run weighs on each alike; medians are
printed. The last line holds the side-by-side ratios. Use 2 cores (``taskset -c 0,1``) to measure
the recipe's machine; timings on a shared machine are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the children import alignment from here, installed or not
SETTINGS = {"1 thread": {"OMP_NUM_THREADS": "1"}, "2 threads": {"OMP_NUM_THREADS": "2"},
            "2 threads passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}}  # fmt: skip

STEP = """
import sys, time, torch
from alignment.char_diffusion.model import Generator, ModelArgs
torch.manual_seed(0)
gen = Generator(ModelArgs("generator", 68, 64, 4, 4, 128))
opt = torch.optim.AdamW(gen.parameters(), 1e-3)
x = torch.randint(0, 65, (64, 64))
def step():
    loss = gen(x).float().logsumexp(-1).mean()
    loss.backward(); opt.step(); opt.zero_grad()
step()
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print((time.perf_counter() - t) / int(sys.argv[1]))
"""

BUSY = """
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a.T / 16)
"""


def time_setting(env: dict[str, str], steps: int) -> float:
    proc = subprocess.run([sys.executable, "-c", STEP, str(steps)], env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                          capture_output=True,
                          text=True, check=True, timeout=900)  # fmt: skip
    return float(proc.stdout.strip().splitlines()[-1])


def measure(rounds: int, steps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, env in SETTINGS.items():
            times[name].append(time_setting(env, steps))
    return {name: statistics.median(v) * 1000 for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    a = p.parse_args()
    print(f"cores this process may use: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()}")
    results = {"alone": measure(a.rounds, a.steps)}
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        time.sleep(2)
        results["beside a busy process"] = measure(a.rounds, a.steps)
    finally:
        busy.terminate()
        busy.wait(timeout=30)
    for where, ms in results.items():
        print(f"{where:24}" + "  ".join(f"{name} {v:7.0f} ms" for name, v in ms.items()))
    last = []
    for where, ms in results.items():
        one = ms["1 thread"]
        last.append(f"{where}: 2 threads {ms['2 threads'] / one:.2f}x, 2 threads passive "
                    f"{ms['2 threads passive'] / one:.2f}x the time of 1 thread")  # fmt: skip
    print("; ".join(last))


if __name__ == "__main__":
    main()
