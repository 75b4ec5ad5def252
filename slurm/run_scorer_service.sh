#!/usr/bin/env bash
# The scorer service (Beaver reward + cost models on one GPU) as its own job. Start it first: once
# it listens it writes its reachable address to SCORER_ADDRESS_FILE, where trainers find it.
#
#   sbatch slurm/run_scorer_service.sh                  # on the cluster (mkdir -p logs first)
#   bash slurm/run_scorer_service.sh                    # here and now; Ctrl-C stops it
#   bash slurm/run_scorer_service.sh --access-log       # arguments go to the service as extra flags
#
# Settings (environment variables, with their defaults):
#   REWARD_MODEL=PKU-Alignment/beaver-7b-unified-reward   path or hub name
#   COST_MODEL=PKU-Alignment/beaver-7b-unified-cost       path or hub name
#   SCORER_HOST=0.0.0.0                                   interface to listen on
#   SCORER_PORT=8000                                      0 picks a free port (published in the file)
#   SCORER_ADDRESS_FILE=logs/scorer_address.json          where the address is published
#   SCORER_DTYPE=<bf16 if a GPU is visible, else auto>    auto, bf16, fp16, fp32
#   SCORER_MAX_BATCH_SIZE=32                              rows per forward pass
#   SCORER_TOKEN=""                                       if set, clients must send this bearer token;
#                                                         if not, a non-loopback SCORER_HOST makes the
#                                                         service generate one into the address file
#                                                         (mode 0600), where trainers read it
#                                                         (--insecure-no-token as an extra flag: none)
#   LOG_DIR=logs                                          log: $LOG_DIR/scorer_service_<job id|local>.log
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=scorer
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=72:00:00
#SBATCH --output=logs/scorer_%j.out

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
log_prefix=run_scorer_service
# shellcheck source=slurm/common.sh
source slurm/common.sh


REWARD_MODEL="${REWARD_MODEL:-PKU-Alignment/beaver-7b-unified-reward}"
COST_MODEL="${COST_MODEL:-PKU-Alignment/beaver-7b-unified-cost}"
SCORER_HOST="${SCORER_HOST:-0.0.0.0}"
SCORER_PORT="${SCORER_PORT:-8000}"
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorer_address.json}"
if [[ -z "${SCORER_DTYPE:-}" ]]; then
    if (($(visible_gpus) >= 1)); then SCORER_DTYPE=bf16; else SCORER_DTYPE=auto; fi
fi
SCORER_MAX_BATCH_SIZE="${SCORER_MAX_BATCH_SIZE:-32}"
LOG_DIR="${LOG_DIR:-logs}"
# The service reads the token from $SCORER_TOKEN itself: it never appears on a command line.
export SCORER_TOKEN="${SCORER_TOKEN:-}"
[[ -n "${SCORER_TOKEN}" ]] || unset SCORER_TOKEN


mkdir -p "${LOG_DIR}" "$(dirname "${SCORER_ADDRESS_FILE}")"
log_file="${LOG_DIR}/scorer_service_${SLURM_JOB_ID:-local}.log"

cmd=("${python_bin}" -m alignment.scoring.scorer_service
    --reward-model "${REWARD_MODEL}" --cost-model "${COST_MODEL}"
    --host "${SCORER_HOST}" --port "${SCORER_PORT}" --address-file "${SCORER_ADDRESS_FILE}"
    --dtype "${SCORER_DTYPE}" --max-batch-size "${SCORER_MAX_BATCH_SIZE}" "$@")
log "reward=${REWARD_MODEL} cost=${COST_MODEL} port=${SCORER_PORT} dtype=${SCORER_DTYPE}" \
    "auth=$([[ -n "${SCORER_TOKEN:-}" ]] && echo SCORER_TOKEN || echo "generated unless loopback")"
log "address file ${SCORER_ADDRESS_FILE}; log ${log_file}"
log "running: ${cmd[*]}"

# Output goes to the log file and to stdout (the SLURM output file) through tee, in a process
# substitution so that exec still replaces this shell: SIGTERM (scancel, Ctrl-C) reaches the
# service, which shuts down and removes its address file. tee ignores those signals, so it keeps
# recording the shutdown and ends when the service closes its output.
exec > >(trap '' TERM INT HUP && exec tee -a "${log_file}") 2>&1
exec "${cmd[@]}"
