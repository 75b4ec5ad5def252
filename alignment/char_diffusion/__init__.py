"""Masked character diffusion with GRPO fill-in against a frozen judge.

    python -m alignment.char_diffusion.recipe          # the CPU recipe on Tiny Shakespeare, end to end
    python -m alignment.char_diffusion.prepare --input input.txt --out models/char_diffusion/gpu/data
    python -m alignment.char_diffusion.train --config alignment/char_diffusion/train.yaml
    python -m alignment.char_diffusion.train_judge --config alignment/char_diffusion/judge.yaml
    python -m alignment.char_diffusion.train_grpo --config alignment/char_diffusion/grpo.yaml

Modules: :mod:`.prepare` and :mod:`.data` (token files, vocabulary, line-aligned blocks),
:mod:`.masking`, :mod:`.model` (generator and judge), :mod:`.sampling` (k fills from one forward),
:mod:`.judge` (targets and rewards), :mod:`.grpo` (the pure step, on :mod:`alignment.pg`),
:mod:`.evaluate` (held-out figures) and :mod:`.monitor` (judge ranking, judge-hacking watch, best
policy), :mod:`.checkpoint`, :mod:`.config`, :mod:`.runtime` (autocast, optimiser, schedule, seeds;
the torchrun process group, device and DDP wrapping come from :mod:`alignment.distributed`),
:mod:`.loop` (supervised loop), :mod:`.recipe` (a recipe folder such as ``cpu/``, end to end),
:mod:`.synthetic` + :mod:`.build` + :mod:`.demo` (the small pipeline of ``make demo``). Imports only
``alignment.{cli, config, atomic, data, distributed, pg, rng, tracking}`` of the project.

Importing this package before torch sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: torch's
OpenMP (libgomp) otherwise spins at the end of every parallel region, and on a machine where
another process wants the same cores that spinning made 2 threads about 4x slower than 1
(``bench/char_diffusion_threads.py``; docs/char_diffusion.md, "Threads"). OpenMP reads the
variable once, when torch loads it, so it has no effect on a process that imported torch first.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
