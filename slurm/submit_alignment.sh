#!/usr/bin/env bash
# Submit the scorer job, then a trainer job that may start once the scorer job has started (the
# trainer waits for the scorer's /health itself, so it can begin loading while the scorer loads).
#
#   bash slurm/submit_alignment.sh                       # scorer + ES trainer
#   TRAINER=grpo bash slurm/submit_alignment.sh          # scorer + GRPO trainer
#   bash slurm/submit_alignment.sh --num_iterations 100  # arguments go to the trainer script
#
# Settings (environment variables, with their defaults); everything else in the environment
# (REWARD_MODEL, POLICY_MODEL_PATH, ...) reaches the jobs, since sbatch exports it by default:
#   TRAINER=es                                       es: slurm/train_accl_alignment_api.sh,
#                                                    grpo: alignment/grpo/run_grpo_alignment.sh
#   SCORER_ADDRESS_FILE=logs/scorers/                shared by both jobs
#                                                    (the replicas' address directory, or one address file)
#   SBATCH_ARGS=""                                   extra sbatch flags for both jobs (--account=...)
#   SCORER_SBATCH_ARGS="" TRAINER_SBATCH_ARGS=""     extra sbatch flags for one of them

set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

log() { echo "[submit_alignment] $*" >&2; }

if ! command -v sbatch >/dev/null 2>&1; then
    log "ERROR: sbatch is not on PATH: this script submits SLURM jobs. Without SLURM, run the"
    log "scripts with bash instead: bash slurm/run_scorer_service.sh & then"
    log "bash slurm/train_accl_alignment_api.sh (see slurm/README.md)"
    exit 1
fi

TRAINER="${TRAINER:-es}"
case "${TRAINER}" in
es) trainer_script="slurm/train_accl_alignment_api.sh" ;;
grpo) trainer_script="alignment/grpo/run_grpo_alignment.sh" ;;
*)
    log "ERROR: TRAINER must be es or grpo, got '${TRAINER}'"
    exit 2
    ;;
esac
export SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorers/}"
read -r -a common <<<"${SBATCH_ARGS:-}"
read -r -a scorer_extra <<<"${SCORER_SBATCH_ARGS:-}"
read -r -a trainer_extra <<<"${TRAINER_SBATCH_ARGS:-}"

# SLURM opens each job's --output file (under logs/) before its script runs.
mkdir -p logs "$(dirname "${SCORER_ADDRESS_FILE}")"
# A stale address file from an earlier scorer would let the trainer start against a dead URL
# (it would only wait for /health to answer); the new scorer rewrites it once it listens.
[[ -d "${SCORER_ADDRESS_FILE}" ]] || rm -f "${SCORER_ADDRESS_FILE}"  # in a directory, stale files are skipped

scorer_id="$(sbatch --parsable "${common[@]}" "${scorer_extra[@]}" slurm/run_scorer_service.sh)"
scorer_id="${scorer_id%%;*}"
log "scorer job ${scorer_id}: logs/scorer_${scorer_id}.out, logs/scorer_service_${scorer_id}.log;" \
    "address file ${SCORER_ADDRESS_FILE}"

trainer_id="$(sbatch --parsable --dependency="after:${scorer_id}" "${common[@]}" "${trainer_extra[@]}" \
    "${trainer_script}" "$@")"
trainer_id="${trainer_id%%;*}"
if [[ "${TRAINER}" == es ]]; then
    log "ES trainer job ${trainer_id} (starts after ${scorer_id} starts): logs/es_${trainer_id}.out;" \
        "runs under ${EXPERIMENT_DIR:-logs/es}"
else
    log "GRPO trainer job ${trainer_id} (starts after ${scorer_id} starts): logs/grpo_${trainer_id}_*.out;" \
        "runs under ${OUTPUT_ROOT:-logs/grpo}"
fi
log "the scorer keeps running after training: scancel ${scorer_id} when done"
echo "scorer=${scorer_id} trainer=${trainer_id}"
