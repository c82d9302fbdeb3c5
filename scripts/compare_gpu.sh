#!/usr/bin/env bash
# The equal-compute comparison (scripts/compare.py --preset gpu) on one H100/H200 as one command, tokenising
# included: a 41.7M-parameter Llama (configs/model/llama-42m.json), budgets of 1.31M, 2.62M and 5.24M training
# positions, token-level / the paper's recipe / the superposition recipe at K = 4 and 6, two seeds each: 24 runs,
# two at a time. Estimated 7 minutes if the runs went one after another (`python scripts/compare.py --preset gpu
# --dry_run` prints the estimate and how it is made; docs/equal-compute.md).
#
#   here, once:      python scripts/compare.py --preset gpu --prepare    (copies the corpus into .gpu_data/)
#   on the GPU:      bash scripts/compare_gpu.sh
#
# compare.py runs under a time limit of $COMPARE_TIME_LIMIT seconds (default 480), sent as Ctrl-C: the runs
# finished by then are reported, so the whole command stays inside a 9-minute slot. Runs (models, token cache,
# each run's log) go to $COMPARE_RUNS (default /tmp/compare-gpu). The report goes to $OUT/compare-gpu if $OUT is
# set, otherwise runs/compare-gpu, as at most 8 files: compare.md, compare.json, compare.png, switch.png,
# compare.log (this command's output), device.txt and runs.tar.gz (each run's all_results.json, trainer_state.json
# files and log, laid out as run folders: `tar xzf runs.tar.gz` gives runs/<budget>/<recipe>-seed<s>/).
# Extra arguments go to scripts/compare.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUNS=${COMPARE_RUNS:-/tmp/compare-gpu}
LIMIT=${COMPARE_TIME_LIMIT:-480}
REPORT=${OUT:-runs}/compare-gpu
LOCAL="$RUNS/report"
if ! ls .gpu_data/corpus/train-*.jsonl.xz >/dev/null 2>&1; then
  echo "compare_gpu.sh: error: no .gpu_data/corpus/train-*.jsonl.xz; run 'python scripts/compare.py --preset gpu --prepare' first" >&2
  exit 2
fi
mkdir -p "$REPORT" "$LOCAL"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$REPORT/device.txt" 2>&1 || true
"$PYTHON" -c 'import sys, torch, transformers, accelerate; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, accelerate.__version__)' >>"$REPORT/device.txt"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
timeout --signal=INT --kill-after=30 "$LIMIT" \
  "$PYTHON" scripts/compare.py --preset gpu --output_root "$RUNS" --report_dir "$LOCAL" "$@" 2>&1 | tee "$REPORT/compare.log" || status=$?
for name in compare.md compare.json compare.png switch.png; do
  if [ -f "$LOCAL/$name" ]; then cp "$LOCAL/$name" "$REPORT/"; fi
done
if [ -d "$LOCAL/runs" ]; then tar czf "$REPORT/runs.tar.gz" -C "$LOCAL" runs; fi
echo "compare_gpu.sh: exit status $status; report in $REPORT"
exit "$status"
