#!/usr/bin/env bash
# run_clm.py under the `deepspeed` launcher with `--deepspeed DS_CONFIG`: NGPU processes on each node.
#
#   scripts/launch_deepspeed.sh CONFIG.json [--flag value ...]       # the flags override the config
#   DS_CONFIG=configs/deepspeed/zero3.json scripts/launch_deepspeed.sh CONFIG.json
#
# DS_CONFIG: configs/deepspeed/zero2.json (default), zero1.json, zero3.json or zero3_offload.json; its
# "auto" values come from the training config. Several nodes: run this on every node with NNODES,
# NODE_RANK, MASTER_ADDR and HOSTFILE (an MPI-style hostfile naming the NNODES nodes, "host slots=8" a
# line, the same on every node); each node starts its own processes (--no_ssh), so no pdsh is needed.
# A `--deepspeed FILE` in the training config or the flags is used when DS_CONFIG is not set; DS_CONFIG and a
# different --deepspeed together are refused (before, DS_CONFIG or its default replaced it without a word).
# The output is also kept in <output_dir>.logs/ (or LOG_DIR).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

set_run_args "$@"
given=$("$PYTHON" scripts/config_args.py --find deepspeed "$@") || exit 2
if [[ -z $given ]]; then
  DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
  RUN_CLM_ARGS+=(--deepspeed "$DS_CONFIG")
elif [[ -n ${DS_CONFIG:-} && $DS_CONFIG != "$given" ]]; then
  echo "$(basename "$0"): error: DS_CONFIG=$DS_CONFIG and --deepspeed $given (config or flags) disagree: give one" >&2
  exit 2
fi
launcher=(deepspeed --num_gpus "$NGPU" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank)
if ((NNODES > 1)); then
  : "${HOSTFILE:?with NNODES > 1, set HOSTFILE to an MPI-style hostfile of the nodes, a line HOST slots=NGPU each}"
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --node_rank "$NODE_RANK" --no_ssh)
fi
run_logged "${launcher[@]}" run_clm.py "${RUN_CLM_ARGS[@]}"
