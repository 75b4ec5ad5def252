# A Ray cluster for one multi-node SLURM job (sourced by train_accl_alignment_api.sh after
# common.sh): the head on the job's first node (where the batch script runs), one
# `ray start --address ... --block` on every other node through srun, all at their SLURM NodeAddr.
#
#   ray_cluster_start     start head and workers; sets ray_address (HOST:PORT)
#   ray_cluster_wait      until every node has joined (RAY_JOIN_TIMEOUT_S), else exit 1 naming the
#                         missing nodes; logs the nodes with their CPUs and GPUs
#   ray_cluster_stop      SIGTERM to the head and the workers' srun, SIGKILL after RAY_STOP_WAIT_S
#
# Every Ray process is a child of a `ray start --block`, which Ray ties to its children's fate:
# stopping those (here, or SLURM's SIGTERM/SIGKILL on scancel) stops every raylet, GCS and
# actor; nothing is daemonised out of the job. `ray stop` is never used: it stops every Ray
# process of the machine, other jobs' too.
#
# Settings (environment variables, with their defaults):
#   RAY_PORT=<20000 + job id % 10000>       the head's GCS port (RDZV_PORT if set)
#   RAY_CPUS_PER_NODE=<SLURM_CPUS_ON_NODE>  CPUs each node offers Ray (an engine actor takes one)
#   RAY_TEMP_DIR=${TMPDIR:-/tmp}/ray-<job>  Ray's session files and logs, on every node
#   RAY_JOIN_TIMEOUT_S=300                  how long every node may take to join
#   RAY_START_ARGS=""                       extra `ray start` flags for every node
#   RAY_WORKER_START_ARGS=""                extra `ray start` flags for the other nodes only
#   RAY_STOP_WAIT_S=30                      grace before SIGKILL at the end
# shellcheck shell=bash

ray_cluster_start() {
    local nodes n cpus ray_cli=("${python_bin}" -m ray.scripts.scripts)
    mapfile -t nodes < <(job_nodes)
    n="${#nodes[@]}"
    ray_nodes=("${nodes[@]}")
    ray_head_ip="$(node_ip "${nodes[0]}")"
    RAY_PORT="${RAY_PORT:-$(rendezvous_port)}"
    ray_address="${ray_head_ip}:${RAY_PORT}"
    RAY_TEMP_DIR="${RAY_TEMP_DIR:-${TMPDIR:-/tmp}/ray-${SLURM_JOB_ID:-local}}"
    cpus="${RAY_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}"
    read -r -a ray_extra <<<"${RAY_START_ARGS:-}"
    read -r -a ray_worker_extra <<<"${RAY_WORKER_START_ARGS:-}"
    ray_node_args=(--block --num-cpus "${cpus}" --temp-dir "${RAY_TEMP_DIR}" --disable-usage-stats "${ray_extra[@]}")
    ray_log_dir="${RAY_LOG_DIR:-logs}"
    mkdir -p "${ray_log_dir}"
    local tag="${SLURM_JOB_ID:-local}"
    log "Ray head on ${nodes[0]} at ${ray_address}; ${n} nodes: ${nodes[*]}; logs ${ray_log_dir}/ray_${tag}_*.log"
    "${ray_cli[@]}" start --head --node-ip-address "${ray_head_ip}" --port "${RAY_PORT}" \
        --include-dashboard false "${ray_node_args[@]}" >"${ray_log_dir}/ray_${tag}_head.log" 2>&1 &
    ray_head_pid=$!
    ray_workers_pid=""
    if ((n > 1)); then
        local res
        mapfile -t res < <(step_flags)
        local step=(srun "--nodes=$((n - 1))" "--ntasks=$((n - 1))" --ntasks-per-node=1 "--exclude=${nodes[0]}"
            --kill-on-bad-exit=0 --label "${res[@]}")
        "${step[@]}" bash slurm/ray_cluster.sh --join "${ray_address}" \
            "${ray_node_args[@]}" "${ray_worker_extra[@]}" \
            >"${ray_log_dir}/ray_${tag}_workers.log" 2>&1 &
        ray_workers_pid=$!
    fi
}

ray_cluster_wait() {
    local expected=() watch=(--watch-pid "${ray_head_pid}") name out
    for name in "${ray_nodes[@]}"; do expected+=(--node "${name}=$(node_ip "${name}")"); done
    [[ -z "${ray_workers_pid}" ]] || watch+=(--watch-pid "${ray_workers_pid}")
    if ! out="$("${python_bin}" -m alignment.es.ray_cluster --address "${ray_address}" "${expected[@]}" \
        --timeout "${RAY_JOIN_TIMEOUT_S:-300}" "${watch[@]}")"; then
        log "ERROR: the Ray cluster did not come up (above); head log ${ray_log_dir}/ray_${SLURM_JOB_ID:-local}_head.log"
        exit 1
    fi
    while read -r line; do log "Ray node joined: ${line}"; done <<<"${out}"
}

ray_cluster_stop() {
    local pids=() pid waited=0
    for pid in "${ray_workers_pid:-}" "${ray_head_pid:-}"; do
        [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null && pids+=("${pid}")
    done
    ((${#pids[@]})) || return 0
    log "stopping the Ray cluster (pids ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    while ((waited < ${RAY_STOP_WAIT_S:-30})) && kill -0 "${pids[@]}" 2>/dev/null; do
        sleep 1
        waited=$((waited + 1))
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    ray_head_pid="" ray_workers_pid=""
}

# Run (not sourced) on a worker node by srun: `bash slurm/ray_cluster.sh --join HEAD:PORT FLAGS...`
# joins the head at this node's own NodeAddr and blocks until stopped.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    [[ "${1:-}" == --join && -n "${2:-}" ]] || {
        echo "usage: bash slurm/ray_cluster.sh --join HEAD:PORT [ray start flags]" >&2
        exit 2
    }
    head="$2"
    shift 2
    log_prefix="ray_cluster ${SLURMD_NODENAME:-?}"
    # shellcheck source=slurm/common.sh
    source slurm/common.sh
    ip="$(node_ip "${SLURMD_NODENAME}")"
    log "joining ${head} as ${SLURMD_NODENAME} (${ip})"
    exec "${python_bin}" -m ray.scripts.scripts start --address "${head}" --node-ip-address "${ip}" "$@"
fi
