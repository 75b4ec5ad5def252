# Shared by the job scripts (sourced, not run): the python to use, the GPUs this job may use, and
# waiting for the scorer. Each script first finds the repository root (under sbatch it runs from
# a spool copy, so only SLURM_SUBMIT_DIR points into the repository) and cds there.
# shellcheck shell=bash

# log_prefix is set by the sourcing script before it calls log.
log() { echo "[${log_prefix:-job} $(date +%H:%M:%S)] $*" >&2; }

# $PYTHON, else the project's .venv, else python3.
if [[ -n "${PYTHON:-}" ]]; then
    python_bin="${PYTHON}"
elif [[ -x .venv/bin/python ]]; then
    python_bin=".venv/bin/python"
else
    python_bin="python3"
fi
export python_bin

# Number of GPUs this job may use: SLURM and users restrict them through CUDA_VISIBLE_DEVICES.
visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        if [[ -z "${CUDA_VISIBLE_DEVICES}" || "${CUDA_VISIBLE_DEVICES}" == "-1" ]]; then
            echo 0
        else
            local ids
            IFS=',' read -r -a ids <<<"${CUDA_VISIBLE_DEVICES}"
            echo "${#ids[@]}"
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# process_count NAME: how many processes to launch. Keeps the variable NAME when it is set, else sets
# it to the GPUs visible (at least 1); exits 2, naming NAME, unless it is a positive integer.
process_count() {
    local value="${!1:-}"
    if [[ -z "${value}" ]]; then
        value="$(visible_gpus)"
        ((value >= 1)) || value=1
    fi
    if ! [[ "${value}" =~ ^[0-9]+$ ]] || ((value < 1)); then
        log "${1} must be a positive integer, got '${value}'"
        exit 2
    fi
    printf -v "${1}" '%s' "${value}"
}

# wait_for_scorer ADDRESS_FILE TIMEOUT_S: sets scorer_url, or exits 1 with what it last saw. The
# scorer job may still be loading its 7B models when a trainer job starts.
wait_for_scorer() {
    log "waiting up to ${2}s for a healthy scorer in ${1}"
    if ! scorer_url="$("${python_bin}" -m alignment.scoring.wait --address-file "${1}" --timeout "${2}")"; then
        log "ERROR: no healthy scorer (see above); start slurm/run_scorer_service.sh first" \
            "or set SCORER_ADDRESS_FILE / SCORER_WAIT_S"
        exit 1
    fi
    log "scorer healthy at ${scorer_url}"
}

# --- several nodes ------------------------------------------------------------------------------
# A job on N nodes (sbatch --nodes=N) runs its script on the first node; the scripts start one
# launcher per node through srun. Nodes are reached at the address SLURM itself uses (NodeAddr of
# `scontrol show node`), never through DNS.

# job_num_nodes: nodes of this job (1 outside SLURM).
job_num_nodes() { echo "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"; }

# job_nodes: the job's node names, one a line; the first is the node this script runs on.
job_nodes() { scontrol show hostnames "${SLURM_JOB_NODELIST}"; }

# node_addr NAME: the node's NodeAddr; exits 1 naming the node when SLURM has none.
node_addr() {
    local addr
    addr="$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)"
    if [[ -z "${addr}" ]]; then
        log "ERROR: scontrol show node $1 gives no NodeAddr"
        exit 1
    fi
    echo "${addr}"
}

# node_ip NAME: the node's NodeAddr as an IP address (Ray wants one): as is when it is one, else
# resolved by the system resolver (clusters whose NodeAddr is left at the host name).
node_ip() {
    local addr ip
    addr="$(node_addr "$1")"
    if [[ "${addr}" =~ ^[0-9.]+$ || "${addr}" == *:* ]]; then
        echo "${addr}"
        return
    fi
    ip="$(getent ahostsv4 "${addr}" | awk 'NR == 1 { print $1 }')"
    if [[ -z "${ip}" ]]; then
        log "ERROR: node $1 has NodeAddr=${addr}, which does not resolve to an IPv4 address"
        exit 1
    fi
    echo "${ip}"
}

# rendezvous_port: a TCP port for the job's rendezvous on its first node. RDZV_PORT if set, else
# derived from the job id so that jobs sharing a node differ; 20000-29999 stays clear of Ray's
# worker ports (10002-19999) and of the ephemeral range.
rendezvous_port() {
    local port="${RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
    if ! [[ "${port}" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
        log "RDZV_PORT must be a TCP port, got '${port}'"
        exit 2
    fi
    echo "${port}"
}

# step_flags: srun flags giving a step the job's CPUs and GPUs on each of its nodes, one a line:
# srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05), and the GPUs are named too so
# that no site default leaves a step without them.
step_flags() {
    [[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || echo "--cpus-per-task=${SLURM_CPUS_PER_TASK}"
    if [[ "${SLURM_GPUS_ON_NODE:-0}" =~ ^[1-9][0-9]*$ ]]; then echo "--gres=gpu:${SLURM_GPUS_ON_NODE}"; fi
}

# on_first_nodes K CMD...: runs CMD once on each of the job's first K nodes through srun (one task
# per node, output lines prefixed with the task's rank); the word {node_rank} in CMD becomes that
# node's rank (SLURM_NODEID: 0 on the first node, K-1 on the last of them). When one task fails,
# srun ends the others.
on_first_nodes() {
    local k="$1" nodelist res
    shift
    nodelist="$(job_nodes | head -n "${k}" | paste -sd ,)"
    mapfile -t res < <(step_flags)
    local step=(srun "--nodes=${k}" "--ntasks=${k}" --ntasks-per-node=1 "--nodelist=${nodelist}"
        --kill-on-bad-exit=1 --label "${res[@]}")
    # shellcheck disable=SC2016  # expanded by the task's bash, on its node
    "${step[@]}" bash -c 'exec "${@//\{node_rank\}/${SLURM_NODEID}}"' on_first_nodes "$@"
}

# on_every_node CMD...: on_first_nodes for all the job's nodes.
on_every_node() { on_first_nodes "$(job_num_nodes)" "$@"; }

# yaml_key FILE KEY: a top-level value of a YAML file (empty when absent).
yaml_key() {
    "${python_bin}" -c 'import sys, yaml
v = (yaml.safe_load(open(sys.argv[1])) or {}).get(sys.argv[2])
print("" if v is None else v)' "$1" "$2"
}

# torchrun_setup PROCS_PER_NODE: sets the arrays `launcher` and `torchrun_flags` for
# `"${launcher[@]}" python -m torch.distributed.run "${torchrun_flags[@]}" -m module ...`. One node:
# no launcher, --standalone. Several: srun runs one torchrun per node (on_every_node), which meet
# in a static rendezvous at the first node's NodeAddr; node ranks are SLURM's node ids, so global
# ranks are node id x PROCS_PER_NODE + local rank on every run of the same allocation shape.
# shellcheck disable=SC2034  # launcher and torchrun_flags are read by the sourcing script
torchrun_setup() {
    local n head
    n="$(job_num_nodes)"
    if ((n == 1)); then
        launcher=()
        torchrun_flags=(--standalone "--nproc_per_node=${1}")
        return
    fi
    head="$(job_nodes | head -n 1)"
    rendezvous="$(node_addr "${head}"):$(rendezvous_port)"
    launcher=(on_every_node)
    torchrun_flags=("--nnodes=${n}" "--node_rank={node_rank}" "--nproc_per_node=${1}" --rdzv-backend=static
        "--rdzv-endpoint=${rendezvous}")
    log "${n} nodes ($(job_nodes | paste -sd ' ')), ${1} processes each; rendezvous ${rendezvous} on ${head}"
}
