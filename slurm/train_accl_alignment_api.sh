#!/usr/bin/env bash
# ES safety alignment (Ray + vLLM engines) against the scorer service: waits for the scorer, then
# trains. Start the scorer first (slurm/run_scorer_service.sh, its own job), or use
# slurm/submit_alignment.sh, which submits both in order.
#
#   sbatch slurm/train_accl_alignment_api.sh                          # 4 GPUs
#   RESUME=logs/es/alignment_<stamp> sbatch slurm/train_accl_alignment_api.sh
#   bash slurm/train_accl_alignment_api.sh --num_iterations 2         # here and now
#
# Arguments are flags of `python -m alignment.es.train_es_alignment` (after EXTRA_ARGS, so they
# win). SLURM opens the --output file before the script runs: `mkdir -p logs` before submitting.
#
# Settings (environment variables, with their defaults):
#   POLICY_MODEL_PATH=models/alpaca-7b               θ₀: HF folder or hub name (with ES_CONFIG or
#                                                    RESUME: only passed when set explicitly)
#   NUM_ENGINES=<GPUs visible, else 1>               generation engines, one per GPU
#   BACKEND=<vllm if a GPU is visible, else transformers>
#   EXECUTOR=<ray if NUM_ENGINES > 1, else local>
#   EXPERIMENT_DIR=logs/es                           runs go to $EXPERIMENT_DIR/alignment_<stamp>
#   SCORER_ADDRESS_FILE=logs/scorers/                written by the scorer service
#                                                    (the replicas' address directory, or one address file)
#   SCORER_WAIT_S=1800                               how long to wait for a healthy scorer
#   ES_CONFIG=""                                     YAML of ES settings (--config)
#   RESUME=""                                        run directory to resume (--resume)
#   EXTRA_ARGS=""                                    space-separated extra flags
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=es-align
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --output=logs/es_%j.out

set -euo pipefail

# sbatch runs a copy of this script from a spool folder: use the submit directory when it is the
# repository root, else the folder above this script.
script_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]]; then
    repo_root="${SLURM_SUBMIT_DIR}"
else
    repo_root="${script_root}"
fi
cd "${repo_root}"
log_prefix=train_accl_alignment_api
# shellcheck source=slurm/common.sh
source slurm/common.sh


gpus="$(visible_gpus)"

# With ES_CONFIG or RESUME the policy comes from that config unless POLICY_MODEL_PATH is set.
policy_given="${POLICY_MODEL_PATH:+yes}"
POLICY_MODEL_PATH="${POLICY_MODEL_PATH:-models/alpaca-7b}"
if [[ -z "${NUM_ENGINES:-}" ]]; then
    NUM_ENGINES="${gpus}"
    ((NUM_ENGINES >= 1)) || NUM_ENGINES=1
fi
if ! [[ "${NUM_ENGINES}" =~ ^[0-9]+$ ]] || ((NUM_ENGINES < 1)); then
    log "NUM_ENGINES must be a positive integer, got '${NUM_ENGINES}'"
    exit 2
fi
if [[ -z "${BACKEND:-}" ]]; then
    if ((gpus >= 1)); then BACKEND=vllm; else BACKEND=transformers; fi
fi
if [[ -z "${EXECUTOR:-}" ]]; then
    if ((NUM_ENGINES > 1)); then EXECUTOR=ray; else EXECUTOR=local; fi
fi
EXPERIMENT_DIR="${EXPERIMENT_DIR:-logs/es}"
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorers/}"
SCORER_WAIT_S="${SCORER_WAIT_S:-1800}"
ES_CONFIG="${ES_CONFIG:-}"
RESUME="${RESUME:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

wait_for_scorer "${SCORER_ADDRESS_FILE}" "${SCORER_WAIT_S}"

read -r -a extra <<<"${EXTRA_ARGS}"
args=()
[[ -z "${ES_CONFIG}" ]] || args+=(--config "${ES_CONFIG}")
[[ -z "${RESUME}" ]] || args+=(--resume "${RESUME}")
if [[ -n "${policy_given}" || (-z "${ES_CONFIG}" && -z "${RESUME}") ]]; then
    args+=(--policy_model_path "${POLICY_MODEL_PATH}")
fi
args+=(
    --num_engines "${NUM_ENGINES}"
    --backend "${BACKEND}" --executor "${EXECUTOR}" --experiment_dir "${EXPERIMENT_DIR}"
    --scorer_url auto --scorer_address_file "${SCORER_ADDRESS_FILE}"
    "${extra[@]}" "$@"
)
mkdir -p "${EXPERIMENT_DIR}"
cmd=("${python_bin}" -m alignment.es.train_es_alignment "${args[@]}")
log "engines=${NUM_ENGINES} backend=${BACKEND} executor=${EXECUTOR} policy=${POLICY_MODEL_PATH}" \
    "experiment_dir=${EXPERIMENT_DIR}${RESUME:+ resume=${RESUME}}"
log "running: ${cmd[*]}"
exec "${cmd[@]}"
