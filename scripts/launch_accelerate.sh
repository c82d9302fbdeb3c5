#!/usr/bin/env bash
# run_clm.py under `accelerate launch`: NGPU processes on each of NNODES nodes (run it on every node).
#
#   scripts/launch_accelerate.sh CONFIG.json [--flag value ...]      # the flags override the config
#   ACCELERATE_CONFIG=configs/accelerate/fsdp_8gpu.yaml scripts/launch_accelerate.sh CONFIG.json
#
# ACCELERATE_CONFIG: configs/accelerate/ddp_8gpu.yaml (default), deepspeed_zero2.yaml or fsdp_8gpu.yaml.
# Its process and node settings are replaced by NGPU, NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT.
# The output is also kept in <output_dir>.logs/ (or LOG_DIR).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp_8gpu.yaml}

set_run_args "$@"
run_logged accelerate launch --config_file "$ACCELERATE_CONFIG" \
  --num_processes "$((NGPU * NNODES))" --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  run_clm.py "${RUN_CLM_ARGS[@]}"
