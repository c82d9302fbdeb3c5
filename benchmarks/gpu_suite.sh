#!/usr/bin/env bash
# The throughput table of the README on one GPU: the paper's 370M model, T=2048, micro-batch 4, bf16,
# eager PyTorch, then torch.compile, then torch.compile + Liger-Kernel. JSON files go to $RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-runs/throughput}
STEPS=${STEPS:-30}
mkdir -p "$RESULTS_DIR"
common=(--model_config configs/model/llama-370m.json --block_size 2048 --micro_batch 4 --patch_size 4
        --bf16 --steps "$STEPS" --warmup 5 "$@")
python benchmarks/throughput.py "${common[@]}" --output_json "$RESULTS_DIR/eager.json"
python benchmarks/throughput.py "${common[@]}" --torch_compile --skip_loss_memory --output_json "$RESULTS_DIR/compile.json"
if python -c "import liger_kernel" 2>/dev/null; then
  # Liger's fused linear cross-entropy does not trace under torch.compile (torch 2.11, liger 0.8.5): eager only.
  python benchmarks/throughput.py "${common[@]}" --liger --skip_loss_memory --output_json "$RESULTS_DIR/liger.json"
fi
