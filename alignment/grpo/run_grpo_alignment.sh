#!/usr/bin/env bash
# GRPO safety alignment on TRL, one β per job: waits for the scorer service, then trains.
#
#   sbatch alignment/grpo/run_grpo_alignment.sh                     # 4 GPUs, first β
#   sbatch --array=0-3 alignment/grpo/run_grpo_alignment.sh         # one job per β in BETAS
#   bash alignment/grpo/run_grpo_alignment.sh max_steps=2           # one process, here and now
#
# Start the scorer first (its own job); it writes SCORER_ADDRESS_FILE once it listens. Arguments
# are key=value overrides of the recipe (after EXTRA_OVERRIDES, so they win). SLURM opens the
# --output file before the script runs: create logs/ once (`mkdir -p logs`) before submitting.
#
# Settings (environment variables, with their defaults):
#   CONFIG=alignment/grpo/grpo_alignment.yaml        recipe YAML
#   BETAS="0.01 0.05 0.1 0.15"                       KL coefficients; SLURM_ARRAY_TASK_ID picks one,
#                                                    the first is used outside an array
#   NUM_PROCESSES=<GPUs visible, else 1>             > 1: accelerate launch; 1: plain python
#   ACCELERATE_CONFIG=alignment/grpo/accelerate_zero2.yaml
#   SCORER_ADDRESS_FILE=logs/scorers/                written by the scorer service
#                                                    (the replicas' address directory, or one address file)
#   SCORER_WAIT_S=1800                               how long to wait for a healthy scorer
#   OUTPUT_ROOT=logs/grpo                            runs go to $OUTPUT_ROOT/beta$BETA
#   EXTRA_OVERRIDES=""                               space-separated key=value overrides
#   PYTHON=.venv/bin/python (else python3)           interpreter for the one-process path
#   ACCELERATE=.venv/bin/accelerate (else accelerate on PATH)
#
#SBATCH --job-name=grpo-align
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --output=logs/grpo_%A_%a.out

set -euo pipefail

# sbatch runs a copy of this script from a spool folder, so $0 does not point into the repository
# there; the submit directory does (submit from the repository root).
script_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]]; then
    repo_root="${SLURM_SUBMIT_DIR}"
else
    repo_root="${script_root}"
fi
cd "${repo_root}"
log_prefix=run_grpo_alignment
# shellcheck source=slurm/common.sh
source slurm/common.sh

CONFIG="${CONFIG:-alignment/grpo/grpo_alignment.yaml}"
BETAS="${BETAS:-0.01 0.05 0.1 0.15}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-alignment/grpo/accelerate_zero2.yaml}"
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorers/}"
SCORER_WAIT_S="${SCORER_WAIT_S:-1800}"
OUTPUT_ROOT="${OUTPUT_ROOT:-logs/grpo}"
EXTRA_OVERRIDES="${EXTRA_OVERRIDES:-}"

if [[ -n "${ACCELERATE:-}" ]]; then
    accelerate_bin="${ACCELERATE}"
elif [[ -x .venv/bin/accelerate ]]; then
    accelerate_bin=".venv/bin/accelerate"
else
    accelerate_bin="accelerate"
fi

process_count NUM_PROCESSES

read -r -a betas <<<"${BETAS}"
if ((${#betas[@]} == 0)); then
    log "BETAS is empty"
    exit 2
fi
task="${SLURM_ARRAY_TASK_ID:-0}"
if ! [[ "${task}" =~ ^[0-9]+$ ]] || ((task >= ${#betas[@]})); then
    log "SLURM_ARRAY_TASK_ID=${task} is outside BETAS (${#betas[@]} values: ${BETAS})"
    exit 2
fi
BETA="${betas[task]}"

wait_for_scorer "${SCORER_ADDRESS_FILE}" "${SCORER_WAIT_S}"

read -r -a extra <<<"${EXTRA_OVERRIDES}"
train_args=(
    alignment/grpo/train_grpo_alignment.py --config "${CONFIG}"
    "beta=${BETA}" "output_dir=${OUTPUT_ROOT}/beta${BETA}" "scorer_address_file=${SCORER_ADDRESS_FILE}"
    "${extra[@]}" "$@"
)
mkdir -p "${OUTPUT_ROOT}"
log "beta=${BETA} processes=${NUM_PROCESSES} config=${CONFIG} output=${OUTPUT_ROOT}/beta${BETA}"
if ((NUM_PROCESSES > 1)); then
    cmd=("${accelerate_bin}" launch --config_file "${ACCELERATE_CONFIG}" --num_processes "${NUM_PROCESSES}"
        "${train_args[@]}")
else
    cmd=("${python_bin}" "${train_args[@]}")
fi
log "running: ${cmd[*]}"
exec "${cmd[@]}"
