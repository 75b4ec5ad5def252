#!/usr/bin/env bash
# The scorer service (Beaver reward + cost models) as its own job: R replicas, one per GPU, on one
# or several nodes. Start it first: each replica, once it listens, writes its reachable address
# into SCORER_ADDRESS_DIR, where trainers given `--scorer_url auto` find every healthy replica.
#
#   sbatch slurm/run_scorer_service.sh                                   # 1 replica, 1 GPU
#   sbatch --gres=gpu:4 slurm/run_scorer_service.sh                      # 4 replicas on one node
#   sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 --mem=256G slurm/run_scorer_service.sh
#                                                    # 8 replicas on 2 nodes: srun, one per task
#   sbatch --nodes=2 --ntasks=3 --gres=gpu:2 slurm/run_scorer_service.sh  # 3 replicas: 2 on the
#                                                    # first node, 1 on the second
#   bash slurm/run_scorer_service.sh                 # here and now; Ctrl-C stops it
#   bash slurm/run_scorer_service.sh --access-log    # arguments go to the service as extra flags
#
# Replicas: inside a job of several tasks, srun starts one replica per task (--kill-on-bad-exit=0:
# one that dies leaves the others serving); each takes the GPU of its local rank when the task
# sees several, and port SCORER_PORT + local rank. Otherwise the service's own --replicas starts
# them on this node, one per visible GPU (on CPU each gets its share of the cores). Replicas on
# other nodes must see the same SCORER_ADDRESS_DIR (a shared file system, as logs/ usually is).
#
# Settings (environment variables, with their defaults):
#   REWARD_MODEL=PKU-Alignment/beaver-7b-unified-reward   path or hub name
#   COST_MODEL=PKU-Alignment/beaver-7b-unified-cost       path or hub name
#   SCORER_REPLICAS=<tasks of the job if several, else visible GPUs, at least 1>
#   SCORER_HOST=0.0.0.0                                   interface to listen on; nodeaddr: the
#                                                         node's SLURM NodeAddr (scontrol show node),
#                                                         each replica its own node's
#   SCORER_PORT=8000                                      replica k of a node: +k; 0 picks free ports
#   SCORER_ADDRESS_DIR=logs/scorers                       one address file per replica
#   SCORER_ADDRESS_FILE=""                                one replica only: publish in this file
#                                                         (a directory, or ending in /: as ..._DIR)
#   SCORER_DTYPE=<bf16 if a GPU is visible, else auto>    auto, bf16, fp16, fp32
#   SCORER_MAX_BATCH_SIZE=32                              rows per forward pass
#   SCORER_TOKEN=""                                       if set, clients must send this bearer token;
#                                                         if not, a non-loopback SCORER_HOST makes each
#                                                         replica generate one into its address file
#                                                         (mode 0600), where trainers read it
#                                                         (--insecure-no-token as an extra flag: none)
#   LOG_DIR=logs                                          log: $LOG_DIR/scorer_service_<job id|local>.log
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=scorer
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=72:00:00
#SBATCH --output=logs/scorer_%j.out
# (no --ntasks-per-node here: one task per node is sbatch's default, and --ntasks=3 over 2 nodes
# must stay possible)

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
SCORER_ADDRESS_DIR="${SCORER_ADDRESS_DIR:-logs/scorers}"
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-}"
if [[ -n "${SCORER_ADDRESS_FILE}" && ( -d "${SCORER_ADDRESS_FILE}" || "${SCORER_ADDRESS_FILE}" == */ ) ]]; then
    SCORER_ADDRESS_DIR="${SCORER_ADDRESS_FILE}"  # the trainers' variable naming the directory
    SCORER_ADDRESS_FILE=""
fi
if [[ -z "${SCORER_DTYPE:-}" ]]; then
    if (($(visible_gpus) >= 1)); then SCORER_DTYPE=bf16; else SCORER_DTYPE=auto; fi
fi
SCORER_MAX_BATCH_SIZE="${SCORER_MAX_BATCH_SIZE:-32}"
LOG_DIR="${LOG_DIR:-logs}"
# The service reads the token from $SCORER_TOKEN itself: it never appears on a command line.
export SCORER_TOKEN="${SCORER_TOKEN:-}"
[[ -n "${SCORER_TOKEN}" ]] || unset SCORER_TOKEN
if ! [[ "${SCORER_PORT}" =~ ^[0-9]+$ ]]; then
    log "SCORER_PORT must be a port number, got '${SCORER_PORT}'"
    exit 2
fi

# The service on this node; SCORER_HOST=nodeaddr is resolved here, on the node that listens (the
# batch script of a job of several tasks passes it on unresolved to the srun tasks).
set_service() {
    local host="${SCORER_HOST}"
    if [[ "${host}" == nodeaddr ]]; then
        if [[ -z "${SLURMD_NODENAME:-}" ]]; then
            log "SCORER_HOST=nodeaddr needs a SLURM job (no SLURMD_NODENAME); give an address or 0.0.0.0"
            exit 2
        fi
        host="$(node_addr "${SLURMD_NODENAME}")"
    fi
    service=("${python_bin}" -m alignment.scoring.scorer_service
        --reward-model "${REWARD_MODEL}" --cost-model "${COST_MODEL}" --host "${host}"
        --dtype "${SCORER_DTYPE}" --max-batch-size "${SCORER_MAX_BATCH_SIZE}")
}

# One srun task = one replica: its own GPU when the task sees several, its own port on the node.
if [[ "${SCORER_REPLICA_TASK:-}" == 1 ]]; then
    set_service
    rank="${SLURM_LOCALID:-0}"
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" == *,* ]]; then
        IFS=',' read -r -a ids <<<"${CUDA_VISIBLE_DEVICES}"
        export CUDA_VISIBLE_DEVICES="${ids[rank % ${#ids[@]}]}"
    fi
    port=$((SCORER_PORT ? SCORER_PORT + rank : 0))
    log "replica ${SLURM_PROCID:-0} on ${SLURMD_NODENAME:-$(hostname -s)}: port ${port}," \
        "GPU ${CUDA_VISIBLE_DEVICES:-none}"
    exec "${service[@]}" --port "${port}" --address-dir "${SCORER_ADDRESS_DIR}" "$@"
fi

tasks="${SLURM_NTASKS:-1}"
if [[ -z "${SCORER_REPLICAS:-}" && -n "${SLURM_JOB_ID:-}" ]] && ((tasks > 1)); then
    SCORER_REPLICAS="${tasks}"
fi
process_count SCORER_REPLICAS
if [[ -n "${SCORER_ADDRESS_FILE}" ]] && ((SCORER_REPLICAS > 1)); then
    log "SCORER_ADDRESS_FILE holds one replica's address; for ${SCORER_REPLICAS} replicas unset it" \
        "and use SCORER_ADDRESS_DIR (default logs/scorers)"
    exit 2
fi

mkdir -p "${LOG_DIR}" "${SCORER_ADDRESS_DIR}"
log_file="${LOG_DIR}/scorer_service_${SLURM_JOB_ID:-local}.log"
if [[ -n "${SCORER_ADDRESS_FILE}" ]]; then
    mkdir -p "$(dirname "${SCORER_ADDRESS_FILE}")"
    where=(--address-file "${SCORER_ADDRESS_FILE}")
else
    where=(--address-dir "${SCORER_ADDRESS_DIR}")
fi

if [[ -n "${SLURM_JOB_ID:-}" ]] && ((tasks > 1)); then
    # srun forwards scancel's SIGTERM to every replica; each removes its own address file.
    export SCORER_REPLICA_TASK=1
    cmd=(srun --ntasks="${SCORER_REPLICAS}" --kill-on-bad-exit=0 --wait=0 --label
        bash slurm/run_scorer_service.sh "$@")
    placement="srun: one replica per task on ${SLURM_JOB_NUM_NODES:-1} node(s)"
else
    set_service
    cmd=("${service[@]}" --port "${SCORER_PORT}" "${where[@]}" --replicas "${SCORER_REPLICAS}" "$@")
    placement="this node ($(visible_gpus) GPU(s) visible)"
fi
log "reward=${REWARD_MODEL} cost=${COST_MODEL} replicas=${SCORER_REPLICAS} on ${placement}" \
    "port=${SCORER_PORT} dtype=${SCORER_DTYPE}" \
    "auth=$([[ -n "${SCORER_TOKEN:-}" ]] && echo SCORER_TOKEN || echo "generated unless loopback")"
log "address ${SCORER_ADDRESS_FILE:-directory ${SCORER_ADDRESS_DIR}}; log ${log_file}"
log "running: ${cmd[*]}"

# Output goes to the log file and to stdout (the SLURM output file) through tee, in a process
# substitution so that exec still replaces this shell: SIGTERM (scancel, Ctrl-C) reaches the
# service (or srun), which shuts down and removes the address files. tee ignores those signals,
# so it keeps recording the shutdown and ends when the service closes its output.
exec > >(trap '' TERM INT HUP && exec tee -a "${log_file}") 2>&1
exec "${cmd[@]}"
