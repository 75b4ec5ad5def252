#!/usr/bin/env bash
# ES safety alignment (Ray + vLLM engines) against the scorer service: waits for the scorer, then
# trains. Start the scorer first (slurm/run_scorer_service.sh, its own job), or use
# slurm/submit_alignment.sh, which submits both in order.
#
#   sbatch slurm/train_accl_alignment_api.sh                          # 1 node, 4 GPUs
#   sbatch --nodes=4 slurm/train_accl_alignment_api.sh                # 4 nodes x 4 GPUs: 16 engines
#   RESUME=logs/es/alignment_<stamp> sbatch slurm/train_accl_alignment_api.sh
#   bash slurm/train_accl_alignment_api.sh --num_iterations 2         # here and now
#
# On several nodes the job starts a Ray cluster of its own (slurm/ray_cluster.sh): the head on the
# first node, `ray start --block` on every other node through srun, all at their SLURM NodeAddr;
# it waits until every node has joined (else it stops, naming the missing ones), runs the trainer
# on the first node with --executor ray --ray_address <head>, one engine per GPU of every node, and
# stops the cluster when the trainer ends, fails or the job is cancelled.
#
# Arguments are flags of `python -m alignment.es.train_es_alignment` (after EXTRA_ARGS, so they
# win). SLURM opens the --output file before the script runs: `mkdir -p logs` before submitting.
#
# Settings (environment variables, with their defaults):
#   POLICY_MODEL_PATH=models/alpaca-7b               θ₀: HF folder or hub name; when unset, RESUME's
#                                                    run config, else ES_CONFIG's policy_model_path,
#                                                    else models/alpaca-7b (the log names the one used)
#   ENGINES_PER_NODE=<GPUs visible, else 1>          generation engines on each node, one per GPU
#   NUM_ENGINES=<nodes x ENGINES_PER_NODE>           all engines of the job
#   BACKEND=<vllm if a GPU is visible, else transformers>
#   EXECUTOR=<ray if NUM_ENGINES > 1, else local>    several nodes: ray
#   EXPERIMENT_DIR=logs/es                           runs go to $EXPERIMENT_DIR/alignment_<stamp>
#   SCORER_ADDRESS_FILE=logs/scorers/                written by the scorer service
#                                                    (the replicas' address directory, or one address file)
#   SCORER_WAIT_S=1800                               how long to wait for a healthy scorer
#   ES_CONFIG=""                                     YAML of ES settings (--config)
#   RESUME=""                                        run directory to resume (--resume)
#   EXTRA_ARGS=""                                    space-separated extra flags
#   PYTHON=.venv/bin/python (else python3)
#   Several nodes: RAY_PORT, RAY_CPUS_PER_NODE, RAY_TEMP_DIR, RAY_JOIN_TIMEOUT_S (300),
#   RAY_START_ARGS, RAY_LOG_DIR (logs): see slurm/ray_cluster.sh
#
#SBATCH --job-name=es-align
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
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
num_nodes="$(job_num_nodes)"

if [[ -z "${ENGINES_PER_NODE:-}" ]]; then
    ENGINES_PER_NODE="${gpus}"
    ((ENGINES_PER_NODE >= 1)) || ENGINES_PER_NODE=1
fi
process_count ENGINES_PER_NODE
NUM_ENGINES="${NUM_ENGINES:-$((num_nodes * ENGINES_PER_NODE))}"
process_count NUM_ENGINES
if [[ -z "${BACKEND:-}" ]]; then
    if ((gpus >= 1)); then BACKEND=vllm; else BACKEND=transformers; fi
fi
if [[ -z "${EXECUTOR:-}" ]]; then
    if ((NUM_ENGINES > 1 || num_nodes > 1)); then EXECUTOR=ray; else EXECUTOR=local; fi
fi
if ((num_nodes > 1)) && [[ "${EXECUTOR}" != ray ]]; then
    log "EXECUTOR=${EXECUTOR} runs on one node only; a job on ${num_nodes} nodes needs EXECUTOR=ray"
    exit 2
fi
EXPERIMENT_DIR="${EXPERIMENT_DIR:-logs/es}"
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorers/}"
SCORER_WAIT_S="${SCORER_WAIT_S:-1800}"
ES_CONFIG="${ES_CONFIG:-}"
RESUME="${RESUME:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
read -r -a extra <<<"${EXTRA_ARGS}"

# The policy the trainer will load, always passed explicitly so that the log names the one used.
# The trainer reads RESUME's config.yaml only without ES_CONFIG; a --policy_model_path among the
# arguments comes last and wins.
if [[ -n "${POLICY_MODEL_PATH:-}" ]]; then
    policy="${POLICY_MODEL_PATH}" policy_from=POLICY_MODEL_PATH
elif [[ -n "${RESUME}" && -z "${ES_CONFIG}" && -f "${RESUME}/config.yaml" ]]; then
    policy="$(yaml_key "${RESUME}/config.yaml" policy_model_path)" policy_from="${RESUME}/config.yaml"
elif [[ -n "${ES_CONFIG}" && -f "${ES_CONFIG}" ]]; then
    policy="$(yaml_key "${ES_CONFIG}" policy_model_path)" policy_from="${ES_CONFIG}"
fi
if [[ -z "${policy:-}" ]]; then
    policy=models/alpaca-7b policy_from=default
fi
given=("${extra[@]}" "$@")
for ((i = 0; i < ${#given[@]}; i++)); do
    case "${given[i]}" in
    --policy_model_path=*) policy="${given[i]#*=}" policy_from=arguments ;;
    --policy_model_path) policy="${given[i + 1]:-}" policy_from=arguments ;;
    esac
done

args=()
[[ -z "${ES_CONFIG}" ]] || args+=(--config "${ES_CONFIG}")
[[ -z "${RESUME}" ]] || args+=(--resume "${RESUME}")
args+=(
    --policy_model_path "${policy}" --num_engines "${NUM_ENGINES}"
    --backend "${BACKEND}" --executor "${EXECUTOR}" --experiment_dir "${EXPERIMENT_DIR}"
    --scorer_url auto --scorer_address_file "${SCORER_ADDRESS_FILE}"
)
mkdir -p "${EXPERIMENT_DIR}"
summary="engines=${NUM_ENGINES} backend=${BACKEND} executor=${EXECUTOR} policy=${policy} (from ${policy_from})"
summary+=" experiment_dir=${EXPERIMENT_DIR}${RESUME:+ resume=${RESUME}}"
log "${summary}"
wait_for_scorer "${SCORER_ADDRESS_FILE}" "${SCORER_WAIT_S}"

if ((num_nodes == 1)); then
    cmd=("${python_bin}" -m alignment.es.train_es_alignment "${args[@]}" "${given[@]}")
    log "running: ${cmd[*]}"
    exec "${cmd[@]}"
fi

# Several nodes: a Ray cluster for this job, stopped however the script ends.
# shellcheck source=slurm/ray_cluster.sh
source slurm/ray_cluster.sh
trainer_pid=""
# shellcheck disable=SC2329  # called by the trap below
on_signal() {
    log "received a signal: stopping the trainer and the Ray cluster"
    [[ -z "${trainer_pid}" ]] || kill -TERM "${trainer_pid}" 2>/dev/null || true
    exit 143
}
trap ray_cluster_stop EXIT
trap on_signal TERM INT HUP
ray_cluster_start
ray_cluster_wait
cmd=("${python_bin}" -m alignment.es.train_es_alignment "${args[@]}" --ray_address "${ray_address}" "${given[@]}")
log "nodes=${num_nodes} (${ray_nodes[*]}) engines_per_node=${ENGINES_PER_NODE} ray=${ray_address}"
log "running: ${cmd[*]}"
# In the background, so that a signal reaches the trap at once instead of after the trainer.
"${cmd[@]}" &
trainer_pid=$!
status=0
wait "${trainer_pid}" || status=$?
trainer_pid=""
log "trainer exited with ${status}"
exit "${status}"
