#!/usr/bin/env bash
# The paper's Table 1 runs from their training configs: the token-level baselines and the patch-level
# runs (K = 4), on NGPU GPUs (default 8) of NNODES nodes, with the backend of your choice.
#
#   scripts/run_paper.sh configs/train/llama-370m-patch-k4-lambda0.67.json [--flag value ...]
#   scripts/run_paper.sh 370m [--flag value ...]     # the baseline, then λ = 1/2, 2/3, 4/5, one after another
#   scripts/run_paper.sh configs/train/llama-370m-patch-k4-lambda0.67-141gb.json   # sized for one card (README)
#   BACKEND=deepspeed DS_CONFIG=configs/deepspeed/zero3.json scripts/run_paper.sh 2.7b
#
# BACKEND: accelerate (default; ACCELERATE_CONFIG picks DDP, DeepSpeed or FSDP), deepspeed (DS_CONFIG) or
# torchrun. The flags go to every run and override the config (e.g. --per_device_train_batch_size 4
# --gradient_accumulation_steps 32 on 40 GB GPUs: the same 2M tokens per step). A run that stopped resumes
# when started again; a finished one is reported and left as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
  echo "usage: $(basename "$0") CONFIG.json|370m|780m|1.3b|2.7b [--flag value ...]" >&2
  exit 2
}

BACKEND=${BACKEND:-accelerate}
case "$BACKEND" in
  accelerate | deepspeed | torchrun) ;;
  *) echo "BACKEND must be accelerate, deepspeed or torchrun, not '$BACKEND'" >&2 && exit 2 ;;
esac
(($# > 0)) || usage
target=$1
shift
case "$target" in
  *.json) configs=("$target") ;;
  370m | 780m | 1.3b | 2.7b)
    configs=("configs/train/llama-$target-token.json")
    for config in "configs/train/llama-$target-patch"-*.json; do
      [[ $config == *-[0-9]*gb.json ]] || configs+=("$config")  # GPU-sized configs (-80gb, -141gb) run by name
    done ;;
  *) usage ;;
esac
for config in "${configs[@]}"; do
  [[ -f $config ]] || { echo "no config $config" >&2 && exit 2; }
  "scripts/launch_$BACKEND.sh" "$config" "$@"
done
