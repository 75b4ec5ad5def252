#!/usr/bin/env bash
# Rebuild Alpaca-7B from LLaMA-7B (HF format) and Stanford's weight diff, check the published
# parameter sum, save models/alpaca-7b (the POLICY_MODEL_PATH of slurm/train_accl_alignment_api.sh)
# and answer one test prompt. CPU only: streams tensor by tensor (~6 GB of RAM with 2 GiB output
# shards; the fp32 test generation loads the whole model, ~27 GB, as much as the float32 output
# takes on disk).
#
#   sbatch alignment/alpaca/recover_alpaca_full.sh
#   BASE_MODEL_PATH=/data/llama-7b-hf bash alignment/alpaca/recover_alpaca_full.sh --force
#
# Arguments are flags of `python -m alignment.alpaca.recover` (after EXTRA_ARGS, so they win).
# SLURM opens the --output file before the script runs: `mkdir -p logs` before submitting.
#
# Settings (environment variables, with their defaults):
#   BASE_MODEL_PATH=models/llama-7b-hf               LLaMA-7B converted to HF format (folder or hub id)
#   WDIFF_PATH=tatsu-lab/alpaca-7b-wdiff             the weight diff (folder, or hub id: downloaded)
#   OUTPUT_DIR=models/alpaca-7b                      created; must not exist (pass --force to replace)
#   SKIP_INTEGRITY_CHECK=0                           1: log the parameter sum instead of checking it
#                                                    (some LLaMA conversions differ slightly)
#   EXPECTED_SUM=""                                  "": the published 50637.1836 (tolerance 1e-2)
#   DTYPE=float32                                    saved precision: float32, bfloat16 or float16
#   EXTRA_ARGS=""                                    space-separated extra flags
#                                                    (e.g. "--no-test-generation --tokenizer base")
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=alpaca-recover
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/alpaca_recover_%j.out

set -euo pipefail

# sbatch runs a copy of this script from a spool folder: use the submit directory when it is the
# repository root, else the folder two levels above this script.
script_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]]; then
    repo_root="${SLURM_SUBMIT_DIR}"
else
    repo_root="${script_root}"
fi
cd "${repo_root}"
log_prefix=recover_alpaca_full
# shellcheck source=slurm/common.sh
source slurm/common.sh

BASE_MODEL_PATH="${BASE_MODEL_PATH:-models/llama-7b-hf}"
WDIFF_PATH="${WDIFF_PATH:-tatsu-lab/alpaca-7b-wdiff}"
OUTPUT_DIR="${OUTPUT_DIR:-models/alpaca-7b}"
SKIP_INTEGRITY_CHECK="${SKIP_INTEGRITY_CHECK:-0}"
EXPECTED_SUM="${EXPECTED_SUM:-}"
DTYPE="${DTYPE:-float32}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

if [[ "${SKIP_INTEGRITY_CHECK}" != 0 && "${SKIP_INTEGRITY_CHECK}" != 1 ]]; then
    log "SKIP_INTEGRITY_CHECK must be 0 or 1, got '${SKIP_INTEGRITY_CHECK}'"
    exit 2
fi

# The recovery is memory- and disk-bound; more threads than the job's CPUs only contend.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"

read -r -a extra <<<"${EXTRA_ARGS}"
args=(--base "${BASE_MODEL_PATH}" --diff "${WDIFF_PATH}" --output "${OUTPUT_DIR}" --dtype "${DTYPE}")
[[ -z "${EXPECTED_SUM}" ]] || args+=(--expected-sum "${EXPECTED_SUM}")
[[ "${SKIP_INTEGRITY_CHECK}" == 0 ]] || args+=(--skip-integrity-check)
args+=("${extra[@]}" "$@")
cmd=("${python_bin}" -m alignment.alpaca.recover "${args[@]}")
log "base=${BASE_MODEL_PATH} diff=${WDIFF_PATH} output=${OUTPUT_DIR} dtype=${DTYPE}" \
    "skip_integrity_check=${SKIP_INTEGRITY_CHECK}"
log "running: ${cmd[*]}"
exec "${cmd[@]}"
