#!/usr/bin/env bash
# Pairwise GPT judging of the models' answers (helpfulness, harmlessness), then sequential Elo and
# Bradley–Terry ratings. The judge is remote (OpenAI or any OpenAI-compatible server), so the job
# needs CPUs only. Resumable: rerun the same command and only missing judgments are requested.
#
#   OPENAI_API_KEY=... sbatch alignment/evaluation/run_gpt_elo_eval.sh
#   MODELS="Alpaca-7B Beaver-V3 ES-500" NUM_PROMPTS=20 bash alignment/evaluation/run_gpt_elo_eval.sh
#   BASE_URL=http://judge-host:8000/v1 JUDGE_MODEL=Qwen/Qwen2.5-72B-Instruct OPENAI_API_KEY=EMPTY \
#       bash alignment/evaluation/run_gpt_elo_eval.sh                # a locally served judge
#   RATINGS_ONLY=1 JUDGMENTS=path/to/gpt_judgments.jsonl bash alignment/evaluation/run_gpt_elo_eval.sh
#
# Arguments are flags of `python -m alignment.evaluation.gpt_elo_eval` (after EXTRA_ARGS, so they
# win). SLURM opens the --output file before the script runs: `mkdir -p logs` before submitting.
#
# Settings (environment variables, with their defaults):
#   POINTS_DIR=alignment/outputs/model_comparisons   {Model}_points.jsonl from the classification
#   MODELS=""                                        space-separated; empty: every model there
#   OUTPUT_DIR=alignment/outputs/gpt_elo             judgments, ratings, comparison table
#   BASE_URL=""                                      OpenAI-compatible base URL; empty: OpenAI's
#   JUDGE_MODEL=gpt-4.1-mini
#   API_KEY_ENV=OPENAI_API_KEY                       name of the variable holding the key
#   NUM_PROMPTS=50                                   prompts shared by all models
#   SEED=0                                           prompt sample and A/B order
#   ORDER=random                                     random (one order per pair) or both
#   CONCURRENCY=8                                    requests in flight
#   MAX_RPM=0                                        requests per minute, 0: no limit
#   MAX_RETRIES=6                                    on 429 / 5xx / connection errors
#   BASELINE=Alpaca-7B                               rated 1000 in every table
#   RATINGS_ONLY=0                                   1: recompute ratings from JUDGMENTS only
#   JUDGMENTS=""                                     judgments jsonl; empty: OUTPUT_DIR's
#   PLOTS=1                                          1: then draw gpt_elo_scatter.png in OUTPUT_DIR
#   EXTRA_ARGS=""                                    space-separated extra flags
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=gpt-elo
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=12:00:00
#SBATCH --output=logs/gpt_elo_%j.out

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
log_prefix=run_gpt_elo_eval
# shellcheck source=slurm/common.sh
source slurm/common.sh

POINTS_DIR="${POINTS_DIR:-alignment/outputs/model_comparisons}"
MODELS="${MODELS:-}"
OUTPUT_DIR="${OUTPUT_DIR:-alignment/outputs/gpt_elo}"
BASE_URL="${BASE_URL:-}"
JUDGE_MODEL="${JUDGE_MODEL:-gpt-4.1-mini}"
API_KEY_ENV="${API_KEY_ENV:-OPENAI_API_KEY}"
NUM_PROMPTS="${NUM_PROMPTS:-50}"
SEED="${SEED:-0}"
ORDER="${ORDER:-random}"
CONCURRENCY="${CONCURRENCY:-8}"
MAX_RPM="${MAX_RPM:-0}"
MAX_RETRIES="${MAX_RETRIES:-6}"
BASELINE="${BASELINE:-Alpaca-7B}"
RATINGS_ONLY="${RATINGS_ONLY:-0}"
JUDGMENTS="${JUDGMENTS:-}"
PLOTS="${PLOTS:-1}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

read -r -a extra <<<"${EXTRA_ARGS}"
read -r -a models <<<"${MODELS}"
args=(--output-dir "${OUTPUT_DIR}" --baseline "${BASELINE}")
[[ -z "${JUDGMENTS}" ]] || args+=(--judgments "${JUDGMENTS}")
((${#models[@]} == 0)) || args+=(--models "${models[@]}")
if [[ "${RATINGS_ONLY}" == "1" ]]; then
    args+=(--ratings-only)
    log "ratings only from ${JUDGMENTS:-${OUTPUT_DIR}/gpt_judgments.jsonl}"
else
    [[ -z "${BASE_URL}" ]] || args+=(--base-url "${BASE_URL}")
    args+=(
        --points-dir "${POINTS_DIR}" --judge-model "${JUDGE_MODEL}" --api-key-env "${API_KEY_ENV}"
        --num-prompts "${NUM_PROMPTS}" --seed "${SEED}" --order "${ORDER}"
        --concurrency "${CONCURRENCY}" --max-requests-per-minute "${MAX_RPM}" --max-retries "${MAX_RETRIES}"
    )
    log "judge=${JUDGE_MODEL} base_url=${BASE_URL:-OpenAI} models=${MODELS:-all in ${POINTS_DIR}}" \
        "prompts=${NUM_PROMPTS} order=${ORDER} output=${OUTPUT_DIR}"
fi
args+=("${extra[@]}" "$@")
mkdir -p "${OUTPUT_DIR}"
cmd=("${python_bin}" -m alignment.evaluation.gpt_elo_eval "${args[@]}")
log "running: ${cmd[*]}"
"${cmd[@]}"
# a --limit run stops before the ratings: nothing to draw yet
if [[ "${PLOTS}" == "1" && -f "${OUTPUT_DIR}/gpt_elo_ratings.json" ]]; then
    "${python_bin}" -m alignment.visualization.plot_gpt_elo_figure --input "${OUTPUT_DIR}"
fi
