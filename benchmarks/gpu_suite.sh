#!/usr/bin/env bash
# Issue 15's throughput targets on one GPU, through run_clm.py's own path (its loader, PatchTrainer step and model):
# the paper's 370M Llama, T=2048, K=4, bf16, torch.compile, the fused LM-head loss, SDPA.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [VARIANT...]
#
# Writes one JSON per variant and OUT_DIR/summary.md (the README table; each target met / NOT met / not
# measured; the GPU-sized train configs for 80 GB and 141 GB cards), so a second run with other variants can
# write beside it in another folder. Variants (default: regional-unfused-mb16 regional-unfused-mb32 regional-mb32
# memory regional-mb64):
#   memory         the head + loss peak memory (fused, chunked, stock) at 8,192 positions x 32,000 and 128,256
#   regional-mbN   torch.compile by regions (one compilation of the decoder layer serves all 24; accelerate's
#                  use_regional_compilation), micro-batch N sequences of 2,048 tokens, the real loader over the
#                  token cache, the default loss (the fused LM-head loss, eager: outside the compiled layers)
#   regional-unfused-mbN  the same with --loss_implementation unfused (the stock head + chunked K-way loss): on
#                  one H200, 2026-11-30, about 5% faster than the fused loss at 32,000 vocab, 15 GiB more at N=32
#   compile-mbN    regional-mbN with the whole model compiled, the fused loss inside the graph (on one H200,
#                  2026-11-30, micro-batch 16: 36.5% MFU against 42.7% by regions, and 133 s + 158 s compiling)
#   unfused-mbN    compile-mbN with --loss_implementation unfused
#   eager-mbN      eager PyTorch
#   reference      torch.compile, one batch already on the GPU (the loader's cost), plus a bare PyTorch loop
#   cudnn          torch.compile with SDPA restricted to cuDNN attention
#   liger          eager + Liger-Kernel
# The suite ends within SUITE_SECONDS (default 450 s) plus the summary, so within 8 minutes: a variant gets the
# time left (`timeout`), and one cut short keeps the stages it finished (throughput.py writes its JSON after each
# stage; the table names it "cut short"); variants with less than 20 s left are skipped. One that fails (out of
# memory at a large micro-batch, say) is reported and the suite goes on. Progress goes to OUT_DIR/suite.log too.
# Wheels that the machine lacks (no internet) are installed from .whl/ (benchmarks/prepare_gpu_wheels.sh).
# Extra flags for throughput.py go in $BENCH_FLAGS (e.g. BENCH_FLAGS="--data_cache_dir /tmp/tc").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [VARIANT...]" >&2
  exit 2
fi
OUT_DIR=$1
shift
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(regional-unfused-mb16 regional-unfused-mb32 regional-mb32 memory regional-mb64)
for variant in "${variants[@]}"; do  # all of them known before anything runs
  case $variant in
    memory | regional-mb[0-9]* | regional-unfused-mb[0-9]* | compile-mb[0-9]* | unfused-mb[0-9]* | eager-mb[0-9]* \
      | reference | cudnn | liger) ;;
    *) echo "gpu_suite.sh: unknown variant '$variant' (memory, regional-mbN, regional-unfused-mbN, compile-mbN," \
            "unfused-mbN, eager-mbN, reference, cudnn, liger)" >&2
       exit 2 ;;
  esac
done
STEPS=${STEPS:-30}
SUITE_SECONDS=${SUITE_SECONDS:-450}
PYTHON=${PYTHON:-python}
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
read -r -a extra <<< "${BENCH_FLAGS:-}"
common=(--model_config configs/model/llama-370m.json --block_size 2048 --patch_size 4 --bf16 --steps "$STEPS"
        --warmup 5)
reports=()
start=$SECONDS
bench() {  # bench NAME FLAGS...: one throughput.py run in the time left; a failure is reported, not fatal
  local name=$1 left=$(( SUITE_SECONDS - (SECONDS - start) )) status=0
  shift
  if (( left < 20 )); then
    echo "$name: skipped (${left} s left of SUITE_SECONDS=$SUITE_SECONDS)"
    return
  fi
  echo "== $name ($(( SECONDS - start )) s; ${left} s left)"
  timeout -s INT -k 30 "$left" "$PYTHON" benchmarks/throughput.py "${common[@]}" "$@" "${extra[@]}" \
    --output_json "$OUT_DIR/$name.json" || status=$?
  if [ -f "$OUT_DIR/$name.json" ]; then  # whole, or cut short after a stage
    reports+=("$OUT_DIR/$name.json")
  fi
  if (( status == 124 || status == 130 )); then
    echo "$name: cut short at the suite's time limit"
  elif (( status != 0 )); then
    echo "$name: failed (exit $status; out of memory at this micro-batch?)"
  fi
}
for variant in "${variants[@]}"; do
  case $variant in
    memory) bench memory --micro_batch 4 --loss_hidden_size 1024 --head_loss_memory 32000 128256 ;;
    regional-mb[0-9]*) bench "$variant" --micro_batch "${variant#regional-mb}" --torch_compile --compile_regions \
                         --skip_loss_memory ;;
    regional-unfused-mb[0-9]*) bench "$variant" --micro_batch "${variant#regional-unfused-mb}" --torch_compile \
                                 --compile_regions --skip_loss_memory --loss_implementation unfused ;;
    compile-mb[0-9]*) bench "$variant" --micro_batch "${variant#compile-mb}" --torch_compile --skip_loss_memory ;;
    unfused-mb[0-9]*) bench "$variant" --micro_batch "${variant#unfused-mb}" --torch_compile --skip_loss_memory \
                        --loss_implementation unfused ;;
    eager-mb[0-9]*) bench "$variant" --micro_batch "${variant#eager-mb}" ;;
    reference) bench reference --micro_batch 16 --torch_compile --skip_loss_memory --data synthetic --reference_loop ;;
    cudnn) bench cudnn --micro_batch 16 --torch_compile --skip_loss_memory --sdpa_backend cudnn ;;
    liger)
      if "$PYTHON" -c "import liger_kernel, torch; assert torch.cuda.is_available()" 2>/dev/null; then
        bench liger --micro_batch 16 --liger --skip_loss_memory
      else
        echo "liger: needs a CUDA GPU and liger-kernel (pip install -r requirements-gpu.txt); skipped"
      fi ;;
  esac
done
# The README table, issue 15's targets (met / NOT met), and the GPU-sized train configs of the best variant per card.
if [ ${#reports[@]} -gt 0 ]; then
  "$PYTHON" benchmarks/summarize.py "${reports[@]}" --configs_dir "$OUT_DIR" | tee "$OUT_DIR/summary.md"
fi
echo "gpu_suite: $(( SECONDS - start )) s"
