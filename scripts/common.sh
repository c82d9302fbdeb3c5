# shellcheck shell=bash
# Sourced by the launchers: the repository root, the launch defaults, run_clm.py's arguments, the log file.
# Paths (configs, data, output_dir) are relative to the repository root: the launchers run from there.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT" || exit 1

NGPU=${NGPU:-8}                       # processes (GPUs) on each node
NNODES=${NNODES:-1}                   # nodes
NODE_RANK=${NODE_RANK:-0}             # this node: 0 .. NNODES-1
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} # the node of rank 0, reachable from every node
MASTER_PORT=${MASTER_PORT:-29500}     # a free port there, the same on every node
PYTHON=${PYTHON:-python}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# check_launch_env: refuse a launch layout that would fail late or hang (a rank that waits forever at the
# rendezvous for a node that does not exist), naming the variable.
check_launch_env() {
  local name
  for name in NGPU NNODES; do
    if [[ ! ${!name} =~ ^[1-9][0-9]*$ ]]; then
      echo "$(basename "$0"): error: $name must be a positive integer, got '${!name}'" >&2
      exit 2
    fi
  done
  if [[ ! $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
    echo "$(basename "$0"): error: NODE_RANK must lie in 0..$((NNODES - 1)) (NNODES=$NNODES), got '$NODE_RANK'" >&2
    exit 2
  fi
  if [[ ! $MASTER_PORT =~ ^[0-9]+$ ]] || ((MASTER_PORT < 1 || MASTER_PORT > 65535)); then
    echo "$(basename "$0"): error: MASTER_PORT must be a port number 1..65535, got '$MASTER_PORT'" >&2
    exit 2
  fi
}

# set_run_args [CONFIG.json] [--flag value ...]
# Sets RUN_CLM_ARGS (the config's keys as flags, then the given flags, which override them), OUTPUT_DIR,
# and LOG_FILE: LOG_DIR/node<rank>-<time>.log, LOG_DIR defaulting to <output_dir>.logs beside the run
# (not inside it: run_clm.py refuses a non-empty output_dir that holds no run of its own).
set_run_args() {
  if (($# == 0)); then
    echo "usage: $(basename "$0") CONFIG.json [--flag value ...]   (or run_clm.py flags alone)" >&2
    exit 2
  fi
  check_launch_env
  OUTPUT_DIR=$("$PYTHON" scripts/config_args.py --get output_dir "$@") || exit 2
  local listing
  listing=$("$PYTHON" scripts/config_args.py "$@")
  # shellcheck disable=SC2034  # read by the launchers that source this file
  mapfile -t RUN_CLM_ARGS <<<"$listing"
  LOG_DIR=${LOG_DIR:-${OUTPUT_DIR%/}.logs}
  LOG_FILE="$LOG_DIR/node${NODE_RANK}-$(date +%Y%m%d-%H%M%S).log"
}

# run_logged COMMAND...: replaces the launcher with COMMAND (exec: the same process, so a signal sent to the
# launcher's PID, by `kill` or a scheduler, reaches torchrun / accelerate / deepspeed, which stop their ranks;
# before, the launcher's shell died alone and the job trained on, re-parented), its output shown and appended to
# LOG_FILE through tee. The launcher's exit status is COMMAND's. DRY_RUN=1 prints the command and runs nothing
# (nor writes a log).
run_logged() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
    return 0
  fi
  mkdir -p "$LOG_DIR"
  {
    echo "# $(date -Is) $(hostname) NGPU=$NGPU NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    printf '%q ' "$@"
    echo
  } | tee -a "$LOG_FILE"
  exec > >(tee -a "$LOG_FILE") 2>&1
  exec "$@"
}
