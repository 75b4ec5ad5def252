#!/usr/bin/env bash
# LAPDOG-style persona dialogue (alignment/persona): SFT, REINFORCE or GRPO for the T5 FiD reader,
# data parallel over the GPUs of one or several nodes (torchrun); no scorer needed (the reward is
# text overlap). On N nodes (sbatch --nodes=N) srun starts one torchrun per node, which meet in a
# static rendezvous on the first node (its SLURM NodeAddr, port RDZV_PORT): N x NUM_PROCESSES ranks.
#
#   sbatch slurm/train_persona.sh --name sft --train_data data/convai2/train.jsonl ...   # SFT
#   sbatch slurm/train_persona.sh --reader_rl_learning --use_grpo --grpo_group_size 4 \
#       --grpo_kl_coeff 0.1 --name grpo --model_path ckpt/sft/checkpoint/latest ...      # GRPO
#   RESUME=1 sbatch slurm/train_persona.sh <the same flags>                              # continue
#   sbatch --nodes=2 slurm/train_persona.sh <the same flags>                             # 2 x 4 GPUs
#   bash slurm/train_persona.sh --config alignment/persona/persona_toy.yaml --total_steps 2
#
# Arguments are flags of `python -m alignment.persona.train` (after EXTRA_ARGS, so they win). SLURM
# opens the --output file before the script runs: `mkdir -p logs` before submitting.
#
# Settings (environment variables, with their defaults):
#   CONFIG=""                                 YAML recipe (--config), e.g.
#                                             alignment/persona/persona_convai2.yaml
#   NUM_PROCESSES=<GPUs visible, else 1>      processes per node; > 1 or several nodes: torchrun,
#                                             else plain python
#   RDZV_PORT=<20000 + job id % 10000>        several nodes: the rendezvous port on the first node
#   RESUME=""                                 1: --resume (continue checkpoint_dir/name)
#   EXTRA_ARGS=""                             space-separated extra flags
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=persona
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --output=logs/persona_%j.out

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
log_prefix=train_persona
# shellcheck source=slurm/common.sh
source slurm/common.sh

gpus="$(visible_gpus)"
process_count NUM_PROCESSES
CONFIG="${CONFIG:-}"
RESUME="${RESUME:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

read -r -a extra <<<"${EXTRA_ARGS}"
args=()
[[ -z "${CONFIG}" ]] || args+=(--config "${CONFIG}")
[[ -z "${RESUME}" ]] || args+=(--resume)
args+=("${extra[@]}" "$@")

num_nodes="$(job_num_nodes)"
if ((NUM_PROCESSES > 1 || num_nodes > 1)); then
    torchrun_setup "${NUM_PROCESSES}"
    cmd=("${launcher[@]}" "${python_bin}" -m torch.distributed.run "${torchrun_flags[@]}"
        -m alignment.persona.train "${args[@]}")
else
    cmd=("${python_bin}" -m alignment.persona.train "${args[@]}")
fi
log "nodes=${num_nodes} processes=${NUM_PROCESSES} gpus=${gpus}${CONFIG:+ config=${CONFIG}}${RESUME:+ resume}"
log "running: ${cmd[*]}"
# on_every_node is a function (srun underneath), which exec cannot replace this shell with
"${cmd[@]}"
