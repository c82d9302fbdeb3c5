#!/usr/bin/env bash
# Issue 15's throughput targets on one GPU, through run_clm.py's own path (its loader, PatchTrainer step and model):
# the paper's 370M Llama, T=2048, K=4, bf16, torch.compile, the fused LM-head loss, SDPA.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [VARIANT...]
#
# Writes one JSON per variant and OUT_DIR/summary.md (the README table; each target met / NOT met / not
# measured; the GPU-sized train configs for the best micro-batch), so a second run with other variants can
# write beside it in another folder. Variants (default: memory compile-mb16 compile-mb32):
#   memory         the head + loss peak memory (fused, chunked, stock) at 8,192 positions x 32,000 and 128,256
#   compile-mbN    torch.compile, micro-batch N sequences of 2,048 tokens, the real loader over the token cache
#   unfused-mbN    the same with --loss_implementation unfused (the stock head + chunked K-way loss)
#   eager-mbN      eager PyTorch
#   reference      torch.compile, one batch already on the GPU (the loader's cost), plus a bare PyTorch loop
#   cudnn          torch.compile with SDPA restricted to cuDNN attention
#   liger          eager + Liger-Kernel
# Variants that would start after SUITE_SECONDS (default 450 s) are skipped, so the suite ends within 8 minutes;
# one that fails (out of memory at a large micro-batch, say) is reported and the suite goes on.
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
STEPS=${STEPS:-30}
SUITE_SECONDS=${SUITE_SECONDS:-450}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT_DIR"
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
bench() {  # bench NAME FLAGS...: one throughput.py run; a failure is reported, not fatal
  local name=$1
  shift
  if (( SECONDS - start > SUITE_SECONDS )); then
    echo "$name: skipped (past SUITE_SECONDS=$SUITE_SECONDS)"
    return
  fi
  echo "== $name ($(( SECONDS - start )) s)"
  if "$PYTHON" benchmarks/throughput.py "${common[@]}" "$@" "${extra[@]}" --output_json "$OUT_DIR/$name.json"; then
    reports+=("$OUT_DIR/$name.json")
  else
    echo "$name: failed (exit $?; out of memory at this micro-batch?)"
  fi
}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(memory compile-mb16 compile-mb32)
for variant in "${variants[@]}"; do
  case $variant in
    memory) bench memory --micro_batch 4 --loss_hidden_size 1024 --head_loss_memory 32000 128256 ;;
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
    *) echo "unknown variant '$variant' (memory, compile-mbN, unfused-mbN, eager-mbN, reference, cudnn, liger)" >&2
       exit 2 ;;
  esac
done
# The README table, issue 15's targets (met / NOT met), and the GPU-sized train configs of the best micro-batch.
if [ ${#reports[@]} -gt 0 ]; then
  "$PYTHON" benchmarks/summarize.py "${reports[@]}" --configs_dir "$OUT_DIR" | tee "$OUT_DIR/summary.md"
fi
echo "gpu_suite: $(( SECONDS - start )) s"
