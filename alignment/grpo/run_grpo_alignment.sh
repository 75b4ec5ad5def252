#!/usr/bin/env bash
# GRPO safety alignment on TRL, one β per job: waits for the scorer service, then trains.
#
#   sbatch alignment/grpo/run_grpo_alignment.sh                     # 1 node, 4 GPUs, first β
#   sbatch --array=0-3 alignment/grpo/run_grpo_alignment.sh         # one job per β in BETAS
#   sbatch --nodes=4 alignment/grpo/run_grpo_alignment.sh           # 4 nodes x 4 GPUs, ZeRO-2
#   ACCELERATE_CONFIG=alignment/grpo/accelerate_zero3.yaml sbatch --nodes=2 ...   # ZeRO-3
#   VLLM_MODE=server sbatch --nodes=3 alignment/grpo/run_grpo_alignment.sh        # 2 train, 1 vLLM
#   bash alignment/grpo/run_grpo_alignment.sh max_steps=2           # one process, here and now
#
# Start the scorer first (its own job); it writes SCORER_ADDRESS_FILE once it listens. Arguments
# are key=value overrides of the recipe (after EXTRA_OVERRIDES, so they win). SLURM opens the
# --output file before the script runs: create logs/ once (`mkdir -p logs`) before submitting.
#
# On N nodes, srun starts one `accelerate launch` per node with --num_machines N, --machine_rank
# (SLURM_NODEID) and the first node's NodeAddr as --main_process_ip: N x NUM_PROCESSES ranks, λ
# moved from the costs of all of them (alignment/grpo/reward.py).
#
# VLLM_MODE=server: generation by TRL's vLLM server (`trl vllm-serve`) on GPUs of its own, the
# trainer with vllm_mode=server. Several nodes: the last node serves (tensor parallel over its
# GPUs), the others train. One node: the first VLLM_SERVER_GPUS GPUs serve, the rest train. The
# trainer waits for the server (TRL's vllm_server_timeout) and pushes its weights after each step
# through vLLM's NCCL weight-transfer engine, so this mode needs CUDA GPUs. Without VLLM_MODE the
# recipe decides (grpo_alignment.yaml: vLLM colocated with each training rank).
#
# Settings (environment variables, with their defaults):
#   CONFIG=alignment/grpo/grpo_alignment.yaml        recipe YAML
#   BETAS="0.01 0.05 0.1 0.15"                       KL coefficients; SLURM_ARRAY_TASK_ID picks one,
#                                                    the first is used outside an array
#   NUM_PROCESSES=<GPUs visible, else 1>             training processes per node; > 1 or several
#                                                    nodes: accelerate launch; else plain python
#   ACCELERATE_CONFIG=alignment/grpo/accelerate_zero2.yaml   (accelerate_zero3.yaml, accelerate_ddp.yaml)
#   ACCELERATE_ARGS=""                               extra `accelerate launch` flags (--mixed_precision no)
#   RDZV_PORT=<20000 + job id % 10000>               several nodes: main process port on the first node
#   SCORER_ADDRESS_FILE=logs/scorers/                written by the scorer service
#                                                    (the replicas' address directory, or one address file)
#   SCORER_WAIT_S=1800                               how long to wait for a healthy scorer
#   OUTPUT_ROOT=logs/grpo                            runs go to $OUTPUT_ROOT/beta$BETA
#   EXTRA_OVERRIDES=""                               space-separated key=value overrides
#   VLLM_MODE=""                                     server: see above
#   VLLM_SERVER_GPUS=1                               one node, server mode: GPUs for the server
#   VLLM_SERVER_PORT=<rendezvous port + 1>           the server's HTTP port
#   VLLM_SERVER_ARGS=""                              extra `trl vllm-serve` flags (--max_model_len 2048)
#   VLLM_PYTHON=$PYTHON                              interpreter with trl and vllm for the server
#   PYTHON=.venv/bin/python (else python3)           interpreter of the trainer
#   ACCELERATE=<$PYTHON -m accelerate.commands.launch>   the accelerate launcher
#
#SBATCH --job-name=grpo-align
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --output=logs/grpo_%A_%a.out

set -euo pipefail

# sbatch runs a copy of this script from a spool folder, so $0 does not point into the repository
# there; the submit directory does (submit from the repository root).
script_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/slurm/common.sh" ]]; then
    repo_root="${SLURM_SUBMIT_DIR}"
else
    repo_root="${script_root}"
fi
cd "${repo_root}"
log_prefix=run_grpo_alignment
# shellcheck source=slurm/common.sh
source slurm/common.sh

CONFIG="${CONFIG:-alignment/grpo/grpo_alignment.yaml}"
BETAS="${BETAS:-0.01 0.05 0.1 0.15}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-alignment/grpo/accelerate_zero2.yaml}"
ACCELERATE_ARGS="${ACCELERATE_ARGS:-}"
VLLM_MODE="${VLLM_MODE:-}"
SCORER_ADDRESS_FILE="${SCORER_ADDRESS_FILE:-logs/scorers/}"
SCORER_WAIT_S="${SCORER_WAIT_S:-1800}"
OUTPUT_ROOT="${OUTPUT_ROOT:-logs/grpo}"
EXTRA_OVERRIDES="${EXTRA_OVERRIDES:-}"

# `python -m accelerate.commands.launch` is `accelerate launch` of the trainer's own interpreter
if [[ -n "${ACCELERATE:-}" ]]; then
    accelerate_launch=("${ACCELERATE}" launch)
else
    accelerate_launch=("${python_bin}" -m accelerate.commands.launch)
fi
case "${VLLM_MODE}" in
"" | server) ;;
*)
    log "VLLM_MODE must be server or empty (the recipe's setting), got '${VLLM_MODE}'"
    exit 2
    ;;
esac

process_count NUM_PROCESSES
num_nodes="$(job_num_nodes)"
train_nodes="${num_nodes}"

read -r -a betas <<<"${BETAS}"
if ((${#betas[@]} == 0)); then
    log "BETAS is empty"
    exit 2
fi
task="${SLURM_ARRAY_TASK_ID:-0}"
if ! [[ "${task}" =~ ^[0-9]+$ ]] || ((task >= ${#betas[@]})); then
    log "SLURM_ARRAY_TASK_ID=${task} is outside BETAS (${#betas[@]} values: ${BETAS})"
    exit 2
fi
BETA="${betas[task]}"

wait_for_scorer "${SCORER_ADDRESS_FILE}" "${SCORER_WAIT_S}"

read -r -a extra <<<"${EXTRA_OVERRIDES}"
read -r -a accelerate_extra <<<"${ACCELERATE_ARGS}"
overrides=("${extra[@]}" "$@")

server_pid=""
if [[ "${VLLM_MODE}" == server ]]; then
    # The model the server loads is the one the trainer loads: the recipe's, or the last override.
    model="$(yaml_key "${CONFIG}" model_name)"
    for o in "${overrides[@]}"; do [[ "${o}" != model_name=* ]] || model="${o#model_name=}"; done
    VLLM_SERVER_PORT="${VLLM_SERVER_PORT:-$(($(rendezvous_port) + 1))}"
    read -r -a server_extra <<<"${VLLM_SERVER_ARGS:-}"
    vllm_python="${VLLM_PYTHON:-${python_bin}}"
    if ((num_nodes > 1)); then
        train_nodes=$((num_nodes - 1))
        server_node="$(job_nodes | tail -n 1)"
        server_host="$(node_addr "${server_node}")"
        server_gpus="$(visible_gpus)"
        ((server_gpus >= 1)) || server_gpus=1
        mapfile -t res < <(step_flags)
        server_cmd=(srun --nodes=1 --ntasks=1 "--nodelist=${server_node}" --kill-on-bad-exit=1 --label "${res[@]}")
    else
        # one node: the first VLLM_SERVER_GPUS GPUs serve, the others train
        server_gpus="${VLLM_SERVER_GPUS:-1}"
        gpus="$(visible_gpus)"
        if ((gpus < server_gpus + 1)); then
            log "VLLM_MODE=server on one node needs VLLM_SERVER_GPUS=${server_gpus} GPUs for the server" \
                "and at least one to train; ${gpus} visible (or use several nodes)"
            exit 2
        fi
        IFS=',' read -r -a ids <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((gpus - 1)))}"
        server_host=127.0.0.1
        server_cmd=(env "CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${ids[*]:0:server_gpus}")")
        CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${ids[*]:server_gpus}")"
        export CUDA_VISIBLE_DEVICES
        NUM_PROCESSES=$((gpus - server_gpus))
    fi
    # `trl vllm-serve` of the server's interpreter (its own environment, whatever its bin/ holds)
    server_cmd+=("${vllm_python}" -c 'import sys; from trl.cli.main import main; sys.argv[0] = "trl"; sys.exit(main())'
        vllm-serve --model "${model}" --host 0.0.0.0 --port "${VLLM_SERVER_PORT}"
        --tensor_parallel_size "${server_gpus}" "${server_extra[@]}")
    log "vLLM server (trl vllm-serve) for ${model} at ${server_host}:${VLLM_SERVER_PORT} on ${server_gpus} GPU(s)"
    log "running: ${server_cmd[*]}"
    "${server_cmd[@]}" &
    server_pid=$!
    overrides=(use_vllm=true vllm_mode=server "vllm_server_host=${server_host}"
        "vllm_server_port=${VLLM_SERVER_PORT}" "${overrides[@]}")
fi
# shellcheck disable=SC2329  # called by the trap below
stop_server() {
    [[ -n "${server_pid}" ]] || return 0
    log "stopping the vLLM server (pid ${server_pid})"
    kill -TERM "${server_pid}" 2>/dev/null || true
    wait "${server_pid}" 2>/dev/null || true
}
trap stop_server EXIT

train_args=(
    alignment/grpo/train_grpo_alignment.py --config "${CONFIG}"
    "beta=${BETA}" "output_dir=${OUTPUT_ROOT}/beta${BETA}" "scorer_address_file=${SCORER_ADDRESS_FILE}"
    "${overrides[@]}"
)
mkdir -p "${OUTPUT_ROOT}"
log "beta=${BETA} processes=${NUM_PROCESSES} config=${CONFIG} output=${OUTPUT_ROOT}/beta${BETA}" \
    "nodes=${train_nodes}${server_pid:+ (+1 vLLM server)}"
if ((train_nodes > 1)); then
    main_node="$(job_nodes | head -n 1)"
    main_ip="$(node_addr "${main_node}")"
    cmd=(on_first_nodes "${train_nodes}" "${accelerate_launch[@]}" --config_file "${ACCELERATE_CONFIG}"
        --num_machines "${train_nodes}" --machine_rank "{node_rank}" --main_process_ip "${main_ip}"
        --main_process_port "$(rendezvous_port)" --num_processes "$((train_nodes * NUM_PROCESSES))"
        "${accelerate_extra[@]}" "${train_args[@]}")
    log "${train_nodes} machines x ${NUM_PROCESSES} processes; main process on ${main_node} (${main_ip})"
elif ((NUM_PROCESSES > 1)); then
    cmd=("${accelerate_launch[@]}" --config_file "${ACCELERATE_CONFIG}" --num_processes "${NUM_PROCESSES}"
        "${accelerate_extra[@]}" "${train_args[@]}")
else
    cmd=("${python_bin}" "${train_args[@]}")
fi
log "running: ${cmd[*]}"
status=0
"${cmd[@]}" || status=$?
exit "${status}"
