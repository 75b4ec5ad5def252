#!/usr/bin/env bash
# Character diffusion: one stage per job (pretrain the generator, train the judge, or GRPO fill-in),
# on every GPU of one or several nodes through torchrun (DDP). No scorer service is involved. On N
# nodes (sbatch --nodes=N) srun starts one torchrun per node, which meet in a static rendezvous on
# the first node (its SLURM NodeAddr, port RDZV_PORT): N x NPROC ranks.
#
#   sbatch slurm/train_char_diffusion.sh                                  # GRPO, 4 GPUs
#   STAGE=pretrain sbatch slurm/train_char_diffusion.sh
#   STAGE=judge sbatch --dependency=afterok:<pretrain job> slurm/train_char_diffusion.sh
#   RESUME=1 sbatch slurm/train_char_diffusion.sh                         # continue out_dir/ckpt.pt
#   sbatch --nodes=2 slurm/train_char_diffusion.sh                        # GRPO, 2 x 4 GPUs
#   bash slurm/train_char_diffusion.sh --max_iters 2                      # here and now
#
# Prepare the data once first (CPU, seconds): python -m alignment.char_diffusion.prepare --input
# input.txt --out models/char_diffusion/gpu/data. Arguments are flags of the stage's CLI (after EXTRA_ARGS, so
# they win), e.g. --group_size=16 --kl_beta=0.2 --learning_rate=5e-6. SLURM opens the --output file
# before the script runs: `mkdir -p logs` before submitting.
#
# Settings (environment variables, with their defaults):
#   STAGE=grpo                                       pretrain | judge | grpo
#   CONFIG=alignment/char_diffusion/<train|judge|grpo>.yaml   recipe of the stage
#   NPROC=<GPUs visible, else 1>                     torchrun processes per node (one per GPU; CPU: gloo)
#   RDZV_PORT=<20000 + job id % 10000>               several nodes: the rendezvous port on the first node
#   RESUME=""                                        non-empty: --resume (out_dir/ckpt.pt)
#   EXTRA_ARGS=""                                    space-separated extra flags
#   PYTHON=.venv/bin/python (else python3)
#
#SBATCH --job-name=char-diffusion
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=logs/char_diffusion_%j.out

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
log_prefix=train_char_diffusion
# shellcheck source=slurm/common.sh
source slurm/common.sh

STAGE="${STAGE:-grpo}"
case "${STAGE}" in
    pretrain) module=alignment.char_diffusion.train recipe=alignment/char_diffusion/train.yaml ;;
    judge) module=alignment.char_diffusion.train_judge recipe=alignment/char_diffusion/judge.yaml ;;
    grpo) module=alignment.char_diffusion.train_grpo recipe=alignment/char_diffusion/grpo.yaml ;;
    *)
        log "STAGE must be pretrain, judge or grpo, got '${STAGE}'"
        exit 2
        ;;
esac
CONFIG="${CONFIG:-${recipe}}"
RESUME="${RESUME:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
process_count NPROC

read -r -a extra <<<"${EXTRA_ARGS}"
args=(--config "${CONFIG}")
[[ -z "${RESUME}" ]] || args+=(--resume)
args+=("${extra[@]}" "$@")
torchrun_setup "${NPROC}"
cmd=("${launcher[@]}" "${python_bin}" -m torch.distributed.run "${torchrun_flags[@]}" -m "${module}" "${args[@]}")
log "stage=${STAGE} processes=${NPROC} config=${CONFIG}${RESUME:+ resume} nodes=$(job_num_nodes)"
log "running: ${cmd[*]}"
# on_every_node is a function (srun underneath), which exec cannot replace this shell with
"${cmd[@]}"
