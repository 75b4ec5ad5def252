#!/usr/bin/env bash
# Quadrant classification of the sweep's models against the scorer service: waits for the scorer,
# then generates, scores and labels each model in its own process (vLLM does not hand GPU memory
# back reliably within one process). Re-running resumes: finished models are skipped and a model
# interrupted mid-generation continues from its saved responses.
#
#   sbatch alignment/evaluation/classify_reward_cost_unified.sh
#   MODELS="ES-100 ES-500" sbatch alignment/evaluation/classify_reward_cost_unified.sh
#   FROM_POINTS=alignment/outputs/model_comparisons bash alignment/evaluation/classify_reward_cost_unified.sh
#   bash alignment/evaluation/classify_reward_cost_unified.sh --max_prompts 50     # here and now
#
# Arguments are flags of `python -m alignment.evaluation.classify_reward_cost_unified` (after
# EXTRA_ARGS, so they win). SLURM opens the --output file before the script runs: `mkdir -p logs`.
#
# Settings (environment variables, with their defaults):
#   SWEEP_CONFIG=alignment/evaluation/sweep_configs.yaml   models and generation settings
#   MODELS=""                                      names to classify (default: every model of the sweep)
#   OUTPUT_DIR=alignment/outputs/model_comparisons
#   BACKEND=<vllm if a GPU is visible, else transformers>
#   SCORER_ADDRESS_FILE=logs/scorers/              written by slurm/run_scorer_service.sh
#                                                  (the replicas' address directory, or one address file)
#   SCORER_WAIT_S=1800                             how long to wait for a healthy scorer
#   FROM_POINTS=""                                 rebuild outputs from this folder's *_points.jsonl
#                                                  only (no scorer, no generation, no GPU)
#   PLOTS=1                                        1: then draw reward_cost_scatter_grid.png and
#                                                  model_safety_ratios.png of every model in OUTPUT_DIR
#   EXTRA_ARGS=""                                  space-separated extra flags
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=classify-rc
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/classify_%j.out

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
log_prefix=classify_reward_cost_unified
# shellcheck source=slurm/common.sh
source slurm/common.sh

SWEEP_CONFIG="${SWEEP_CONFIG:-alignment/evaluation/sweep_configs.yaml}"
MODELS="${MODELS:-}"
OUTPUT_DIR="${OUTPUT_DIR:-alignment/outputs/model_comparisons}"
if [[ -z "${BACKEND:-}" ]]; then
    if (($(visible_gpus) >= 1)); then BACKEND=vllm; else BACKEND=transformers; fi
fi
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorers/}"
SCORER_WAIT_S="${SCORER_WAIT_S:-1800}"
FROM_POINTS="${FROM_POINTS:-}"
PLOTS="${PLOTS:-1}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

read -r -a extra <<<"${EXTRA_ARGS}"
cli=("${python_bin}" -m alignment.evaluation.classify_reward_cost_unified)

draw_figures() {
    [[ "${PLOTS}" == "1" ]] || return 0
    "${python_bin}" -m alignment.visualization.plot_reward_cost_grid --input "${OUTPUT_DIR}"
    "${python_bin}" -m alignment.visualization.plot_safety_ratios --input "${OUTPUT_DIR}"
}

if [[ -n "${FROM_POINTS}" ]]; then
    read -r -a only <<<"${MODELS}"
    args=(--from-points "${FROM_POINTS}" --output-dir "${OUTPUT_DIR}")
    ((${#only[@]} == 0)) || args+=(--only "${only[@]}")
    log "rebuilding outputs in ${OUTPUT_DIR} from ${FROM_POINTS}"
    "${cli[@]}" "${args[@]}" "${extra[@]}" "$@"
    draw_figures
    exit 0
fi

args=(
    --config "${SWEEP_CONFIG}" --output_dir "${OUTPUT_DIR}" --backend "${BACKEND}"
    --scorer_url auto --scorer_address_file "${SCORER_ADDRESS_FILE}" "${extra[@]}" "$@"
)
if [[ -n "${MODELS}" ]]; then
    read -r -a names <<<"${MODELS}"
else
    # also checks the sweep (unknown keys, missing ES checkpoints) before waiting for the scorer
    mapfile -t names < <("${cli[@]}" "${args[@]}" --list-models)
    ((${#names[@]} > 0)) || { log "ERROR: could not read the models of ${SWEEP_CONFIG} (see above)"; exit 1; }
fi

wait_for_scorer "${SCORER_ADDRESS_FILE}" "${SCORER_WAIT_S}"
mkdir -p "${OUTPUT_DIR}"
log "models: ${names[*]} backend=${BACKEND} output=${OUTPUT_DIR}"
for name in "${names[@]}"; do
    log "classifying ${name}"
    "${cli[@]}" "${args[@]}" --only "${name}"
done
draw_figures
log "done: outputs in ${OUTPUT_DIR}"
