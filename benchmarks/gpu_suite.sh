#!/usr/bin/env bash
# The throughput tables of the README on one GPU: the paper's 370M model, T=2048, micro-batch 4, bf16.
# Variants (all by default, or the ones named as arguments), one JSON each in $RESULTS_DIR:
#   eager      eager PyTorch, the real loader over the token cache, plus the loss-only memory table
#   compile    torch.compile, the real loader
#   reference  torch.compile, one batch already on the GPU (the loader's cost = 1 - compile/reference), plus a
#              bare PyTorch loop over stock LlamaForCausalLM (the issue's reference setup)
#   cudnn      torch.compile with SDPA restricted to cuDNN attention
#   liger      eager + Liger-Kernel (its fused linear cross-entropy does not trace under torch.compile)
# Ends with $RESULTS_DIR/summary.md: the README's table and the targets (benchmarks/summarize.py).
# Extra flags for throughput.py go in $BENCH_FLAGS (e.g. BENCH_FLAGS="--data_cache_dir /tmp/tc").
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-runs/throughput}
STEPS=${STEPS:-30}
mkdir -p "$RESULTS_DIR"
read -r -a extra <<< "${BENCH_FLAGS:-}"
common=(--model_config configs/model/llama-370m.json --block_size 2048 --micro_batch 4 --patch_size 4
        --bf16 --steps "$STEPS" --warmup 5 "${extra[@]}")
reports=()
bench() {  # bench NAME FLAGS...
  local name=$1
  shift
  python benchmarks/throughput.py "${common[@]}" "$@" --output_json "$RESULTS_DIR/$name.json"
  reports+=("$RESULTS_DIR/$name.json")
}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(eager compile reference cudnn liger)
for variant in "${variants[@]}"; do
  case $variant in
    eager) bench eager ;;
    compile) bench compile --torch_compile --skip_loss_memory ;;
    reference) bench reference --torch_compile --skip_loss_memory --data synthetic --reference_loop ;;
    cudnn) bench cudnn --torch_compile --skip_loss_memory --sdpa_backend cudnn ;;
    liger)
      if python -c "import liger_kernel, torch; assert torch.cuda.is_available()" 2>/dev/null; then
        bench liger --liger --skip_loss_memory
      else
        echo "liger: needs a CUDA GPU and liger-kernel (pip install -r requirements-gpu.txt); skipped"
      fi ;;
    *) echo "unknown variant '$variant' (eager, compile, reference, cudnn, liger)" >&2; exit 2 ;;
  esac
done
# The README table and issue 5's targets (met / NOT met) for the variants just run.
if [ ${#reports[@]} -gt 0 ]; then
  python benchmarks/summarize.py "${reports[@]}" | tee "$RESULTS_DIR/summary.md"
fi
