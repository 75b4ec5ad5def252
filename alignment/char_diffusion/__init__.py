"""Masked character diffusion with GRPO fill-in against a frozen judge.

    python -m alignment.char_diffusion.prepare --input input.txt --out models/char_diffusion/gpu/data
    python -m alignment.char_diffusion.train --config alignment/char_diffusion/train.yaml
    python -m alignment.char_diffusion.train_judge --config alignment/char_diffusion/judge.yaml
    python -m alignment.char_diffusion.train_grpo --config alignment/char_diffusion/grpo.yaml

Modules: :mod:`.prepare` and :mod:`.data` (token files, vocabulary, line-aligned blocks),
:mod:`.masking`, :mod:`.model` (generator and judge), :mod:`.sampling` (k fills from one forward),
:mod:`.judge` (targets and rewards), :mod:`.grpo` (the pure step, on :mod:`alignment.pg`),
:mod:`.checkpoint`, :mod:`.config`, :mod:`.runtime` (autocast, optimiser, schedule, seeds; the
torchrun process group, device and DDP wrapping come from :mod:`alignment.distributed`),
:mod:`.loop` (supervised loop), :mod:`.synthetic` + :mod:`.build` + :mod:`.demo` (the small pipeline
of ``make demo``). Imports only ``alignment.{config, atomic, data, distributed, pg, rng, tracking}``
of the project.
"""
