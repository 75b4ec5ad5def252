"""``python -m alignment.doctor``: prove in minutes that a node, the install and the models will work,
and measure the GPU paths against their targets, before a long job (``make doctor``; docs/doctor.md).

Modules: :mod:`.run` (the order of the checks, the shared scorer), :mod:`.runner` (one process and
one time limit per check), :mod:`.checks` (environment, models, noise, scorer, es, grpo, persona,
char_diffusion), :mod:`.report` (statuses, figures and targets, the table and the JSON),
:mod:`.scorer_load` (the scorer's throughput workloads, shared with ``bench/scorer_throughput.py``).
"""
