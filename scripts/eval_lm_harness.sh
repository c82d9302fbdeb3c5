#!/usr/bin/env bash
# Zero-shot evaluation of a checkpoint with lm-evaluation-harness on the paper's six tasks (MMLU, HellaSwag,
# PIQA, WinoGrande, ARC-Easy, ARC-Challenge). The tasks' data sets come from the Hugging Face hub.
#
#   pip install -r requirements-eval.txt
#   scripts/eval_lm_harness.sh runs/llama-370m-patch-k4-lambda0.67              # the six tasks, results in outputs/lm_eval/
#   scripts/eval_lm_harness.sh runs/llama-370m-patch-k4-lambda0.67 --limit 100  # anything after the model goes to lm_eval
#   TASKS=wikitext_local scripts/eval_lm_harness.sh PATH   # offline: WikiText perplexity on data/
#
# Environment (defaults): TASKS (the six above), NUM_FEWSHOT (0), DTYPE (bfloat16), BATCH_SIZE (auto),
# DEVICE (cuda when torch sees a GPU, else cpu), PYTHON (python, the interpreter that has torch),
# OUTPUT_PATH (outputs/lm_eval/<model folder name>, ignored by git).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 MODEL_DIR [lm_eval arguments...]" >&2
  exit 2
fi
MODEL=$1
shift
if [[ ! -f "$MODEL/config.json" ]]; then  # a local model folder: a typo would otherwise be tried as a hub id
  echo "$0: error: $MODEL is not a model folder (no config.json in it)" >&2
  exit 2
fi
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TASKS=${TASKS:-"mmlu,hellaswag,piqa,winogrande,arc_easy,arc_challenge"}
NUM_FEWSHOT=${NUM_FEWSHOT:-0}
DTYPE=${DTYPE:-bfloat16}
BATCH_SIZE=${BATCH_SIZE:-auto}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
OUTPUT_PATH=${OUTPUT_PATH:-"outputs/lm_eval/$(basename "${MODEL%/}")"}

if ! command -v lm_eval >/dev/null 2>&1; then
  echo "$0: lm_eval not found: pip install -r requirements-eval.txt" >&2
  exit 1
fi

set -x
lm_eval --model hf \
  --model_args "pretrained=${MODEL},dtype=${DTYPE}" \
  --include_path "${SCRIPT_DIR}/lm_eval_tasks" \
  --tasks "${TASKS}" \
  --num_fewshot "${NUM_FEWSHOT}" \
  --batch_size "${BATCH_SIZE}" \
  --device "${DEVICE}" \
  --output_path "${OUTPUT_PATH}" \
  "$@"
