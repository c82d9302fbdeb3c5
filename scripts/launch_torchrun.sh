#!/usr/bin/env bash
# run_clm.py under `torchrun`: NGPU processes on each of NNODES nodes (run it on every node), plain DDP.
#
#   scripts/launch_torchrun.sh CONFIG.json [--flag value ...]        # the flags override the config
#   scripts/launch_torchrun.sh CONFIG.json --deepspeed configs/deepspeed/zero3.json
#
# The output is also kept in <output_dir>.logs/ (or LOG_DIR).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

set_run_args "$@"
run_logged torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NGPU" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  run_clm.py "${RUN_CLM_ARGS[@]}"
