#!/usr/bin/env bash
# The GPU measurements of docs/throughput.md in one command, on one GPU, through run_clm.py's own path (its
# loader, the PatchTrainer step and the patch model): the paper's 370M Llama at T=2048, K=4, bf16, SDPA, and the
# variants below; the FSDP check; the fused loss's GPU tests.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [VARIANT...]
#
# Variants: `python benchmarks/suite_variants.py --help` (names, what each runs, the default list and each one's
# estimated time on one H200). Every name is checked before anything runs; an unknown one is refused (exit 2).
# The default list (about 490 s on one H200): regional-unfused-mb32 regional-mb32 regional-cudnn-mb32 fsdp
# v128k-regional-token-mb16 v128k-regional-unfused-token-mb16 1.3b-regional-mb16 gputests headloss.
#
# Writes into OUT_DIR: environment.txt (date, nvidia-smi, the versions), one JSON per variant (throughput.py's
# report; fsdp.json; gputests.json), fsdp-v1/ and fsdp-v2/ (the FSDP launches' configs and logs), suite.log (all
# output) and summary.md (the table, each target met / NOT met / not measured, and the GPU-sized train configs
# of the best 370M variant per card, written beside it). The suite ends within SUITE_SECONDS (default 490 s) plus
# the summary: a variant gets the time left (`timeout`), and one cut short keeps the stages it finished
# (throughput.py writes its JSON after each stage; the table names it "cut short"); variants with less than 20 s
# left are skipped. One that fails (out of memory at a large micro-batch, say) is reported and the suite goes on.
# STEPS (default 20) timed steps a stage after 5 warm-up steps (the 1.3b and v128k variants set their own).
# Wheels that the machine lacks (no internet) are installed from .whl/ (benchmarks/prepare_gpu_wheels.sh).
# Extra flags for throughput.py go in $BENCH_FLAGS (e.g. BENCH_FLAGS="--data_cache_dir /tmp/tc"), and for
# fsdp_check.py in $FSDP_FLAGS; the FSDP runs themselves (checkpoints) go to $FSDP_WORK_DIR (default: a temporary
# folder, removed at the end), not into OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [VARIANT...]" >&2
  exit 2
fi
OUT_DIR=$1
shift
PYTHON=${PYTHON:-python}
plan=$("$PYTHON" benchmarks/suite_variants.py "$@") || exit 2  # every variant known before anything runs
STEPS=${STEPS:-20}
SUITE_SECONDS=${SUITE_SECONDS:-490}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
# Only the wheels built for this Python and platform (packaging's tags, as pip decides): .whl/ is prepared for the
# device's Python 3.12, and a machine with another Python keeps its own packages.
mapfile -t wheels < <("$PYTHON" - <<'PY'
import glob
import os
import sys

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

supported = set(sys_tags())
for path in sorted(glob.glob(".whl/*.whl")):
    if supported & set(parse_wheel_filename(os.path.basename(path))[3]):
        print(path)
    else:
        print(f"gpu_suite: not installing {path}: built for another Python or platform", file=sys.stderr)
PY
)
if (( ${#wheels[@]} )); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PYTHON" -c "import json, sys; sys.path.insert(0, 'benchmarks'); from throughput import versions; print(json.dumps(versions(), indent=2))" 2>&1
} > "$OUT_DIR/environment.txt" || true
read -r -a extra <<< "${BENCH_FLAGS:-}"
read -r -a fsdp_extra <<< "${FSDP_FLAGS:-}"
common=(--model_config configs/model/llama-370m.json --block_size 2048 --patch_size 4 --bf16 --steps "$STEPS"
        --warmup 5)
reports=()
start=$SECONDS
fsdp_work=${FSDP_WORK_DIR:-$(mktemp -d)}
cleanup() { [ -n "${FSDP_WORK_DIR:-}" ] || rm -rf "$fsdp_work"; }
trap cleanup EXIT
while read -r -a line <&3; do  # fd 3: the commands below must not read the plan from stdin
  name=${line[0]} kind=${line[2]}
  args=("${line[@]:3}")
  left=$(( SUITE_SECONDS - (SECONDS - start) ))
  if (( left < 20 )); then
    echo "$name: skipped (${left} s left of SUITE_SECONDS=$SUITE_SECONDS)"
    continue
  fi
  echo "== $name ($(( SECONDS - start )) s; ${left} s left; about ${line[1]} s on one H200)"
  status=0
  case $kind in
    bench)
      if [[ " ${args[*]} " == *" --liger"* ]] && ! "$PYTHON" -c "import liger_kernel, torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "$name: needs a CUDA GPU and liger-kernel (pip install -r requirements-gpu.txt); skipped"
        continue
      fi
      timeout -s INT -k 30 "$left" "$PYTHON" benchmarks/throughput.py "${common[@]}" "${args[@]}" "${extra[@]}" \
        --output_json "$OUT_DIR/$name.json" || status=$?
      report=$OUT_DIR/$name.json ;;
    fsdp)
      timeout -s INT -k 30 "$left" "$PYTHON" benchmarks/fsdp_check.py "$OUT_DIR" --work_dir "$fsdp_work" \
        "${fsdp_extra[@]}" || status=$?
      report=$OUT_DIR/fsdp.json ;;
    pytest)
      timeout -s INT -k 30 "$left" "$PYTHON" -m pytest "${args[@]}" > "$OUT_DIR/$name.log" 2>&1 || status=$?
      cat "$OUT_DIR/$name.log"
      "$PYTHON" - "$OUT_DIR/$name.log" "$OUT_DIR/$name.json" "$status" <<'PY'
import json
import sys

log, out, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [line for line in open(log, encoding="utf-8", errors="replace").read().splitlines() if line.strip()]
json.dump({"gputests": {"exit_code": status, "summary": lines[-1] if lines else ""}}, open(out, "w"), indent=2)
PY
      report=$OUT_DIR/$name.json ;;
  esac
  if [ -f "$report" ]; then  # whole, or cut short after a stage
    reports+=("$report")
  fi
  if (( status == 124 || status == 130 )); then
    echo "$name: cut short at the suite's time limit"
  elif (( status != 0 )); then
    echo "$name: failed (exit $status)"
  fi
done 3<<< "$plan"
# The table, the targets (met / NOT met), and the GPU-sized train configs of the best 370M variant per card.
if [ ${#reports[@]} -gt 0 ]; then
  "$PYTHON" benchmarks/summarize.py "${reports[@]}" --configs_dir "$OUT_DIR" | tee "$OUT_DIR/summary.md"
fi
echo "gpu_suite: $(( SECONDS - start )) s"
