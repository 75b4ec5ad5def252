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
