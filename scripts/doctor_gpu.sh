#!/usr/bin/env bash
# The GPU acceptance run (docs/doctor.md, "Measured on a GPU"): the doctor on a GPU machine that is
# lent for a few minutes and has no network. Prepared on a CPU machine:
#   - the toy models built into models/toy (python -m alignment.toy.build), carried with the tree;
#   - the small wheels the GPU image lacks in .whl/ (the list and the download command are in the
#     shared stack notes); vLLM's CUDA wheel is too large to carry: its engine is reported not run.
# Usage: OUT=<folder> [SHAPE=1b] [DOCTOR_ARGS="--quick"] bash scripts/doctor_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-logs/doctor-gpu}
shape=${SHAPE:-1b}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target /tmp/doctor-site .whl/*.whl
    export PYTHONPATH="/tmp/doctor-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" || true
# shellcheck disable=SC2086  # DOCTOR_ARGS is a list of flags
python -m alignment.doctor --device cuda --policy-shape "$shape" --models-dir models/toy \
    --out-dir "$out/logs-$shape" --json "$out/doctor-$shape.json" ${DOCTOR_ARGS:-} | tee "$out/doctor-$shape.txt"
