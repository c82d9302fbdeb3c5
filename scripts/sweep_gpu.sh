#!/usr/bin/env bash
# The data-scaling sweep (scripts/sweep.py --preset gpu) on one H100/H200, tokenisation included, as one
# command: 19.5M-parameter Llama, 0.18 / 0.5 / 1.44 passes over the 51.1M-token offline corpus, a token-level
# and a patch run (K=4, λ=2/3) at each size; 442 s on one H200 (2026-11-30; results in benchmarks/results/sweep-h200).
#
#   here, once:      python scripts/sweep.py --preset gpu --prepare    (copies the corpus into .gpu_data/)
#   on the GPU:      bash scripts/sweep_gpu.sh
#
# Runs (models, checkpoints, token cache) go to $SWEEP_RUNS (default /tmp/sweep-gpu); the report (sweep.md,
# sweep.json, sweep.png, each run's all_results.json, the log) to $OUT/sweep-gpu if $OUT is set, otherwise
# runs/sweep-gpu, rewritten after every size. Extra arguments go to scripts/sweep.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${SWEEP_RUNS:-/tmp/sweep-gpu}
REPORT=${OUT:-runs}/sweep-gpu
if ! ls .gpu_data/corpus/train-*.jsonl.xz >/dev/null 2>&1; then
  echo "sweep_gpu.sh: error: no .gpu_data/corpus/train-*.jsonl.xz; run 'python scripts/sweep.py --preset gpu --prepare' first" >&2
  exit 2
fi
mkdir -p "$REPORT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$REPORT/device.txt" 2>&1 || true
"$PYTHON" -c 'import sys, torch, transformers, accelerate; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, accelerate.__version__)' >>"$REPORT/device.txt"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PYTHON" scripts/sweep.py --preset gpu --output_root "$RUNS" --report_dir "$REPORT" "$@" 2>&1 | tee "$REPORT/sweep.log"
