#!/usr/bin/env bash
# This machine: one process, or N CPU processes that act as the N hosts of a pod. The
# multi-process mode runs the multi-host code paths (jax.distributed, per-process data
# shards, collective checkpoint saves) without a pod: each process gets K fake CPU devices
# (--xla_force_host_platform_device_count) and the env vars launch/distributed.py reads.
#
#   local.sh [--dry-run] SUBCOMMAND [ARGS...]    (see `usage` below; README.md beside it)
#
# Environment:
#   PYTHON               interpreter with this package installed (default python3)
#   DEVICES_PER_PROCESS  K, fake CPU devices per process in `multiprocess` (default 4)
#   PORT                 coordinator port on 127.0.0.1 (default: a free port)
#   LOG_DIR              logs of processes 1..N-1 (default WORKDIR/logs); process 0 prints here
#   DRY_RUN=1            print the commands (one per line, shell-quoted) instead of running them
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
  cat <<'EOF'
Usage: local.sh [--dry-run] SUBCOMMAND [ARGS...]

  train CONFIG WORKDIR [OVERRIDES...]            one process, default JAX devices
  evaluate WORKDIR [ARGS...]                     one process
  sample WORKDIR [ARGS...]                       one process (ARGS: --num N --steps S)
  distill TEACHER CONFIG WORKDIR [OVERRIDES...]  one process: every stage of python -m launch.distill
  multiprocess N CONFIG WORKDIR [OVERRIDES...]   N CPU processes (K devices each) training
                                                 together; stops all if one fails

Environment: PYTHON (python3) DEVICES_PER_PROCESS=K (4) PORT (free port) LOG_DIR (WORKDIR/logs) DRY_RUN=1
EOF
}

SCRIPT=local.sh
# shellcheck source=launch/scripts/common.sh
source "$REPO_ROOT/launch/scripts/common.sh"

# A TCP port nobody listens on now (the coordinator binds it a moment later).
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

PIDS=()

# SIGTERM to every process still running: each saves a checkpoint (JAX's preemption sync
# point agrees on the step) and exits.
stop_all() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
}

# Wait for all PIDS, dropping each from the list as it ends. The first one to fail stops
# the others (a lone survivor would wait forever in a collective) and its exit status is
# returned.
wait_all() {
  local pid rc live
  while [[ ${#PIDS[@]} -gt 0 ]]; do
    live=()
    for pid in "${PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then live+=("$pid"); continue; fi
      rc=0; wait "$pid" || rc=$?
      if [[ $rc -ne 0 ]]; then
        echo "local.sh: process with pid $pid exited with status $rc; stopping the others" >&2
        stop_all; wait || true
        return "$rc"
      fi
    done
    PIDS=(${live[@]+"${live[@]}"})
    if [[ ${#PIDS[@]} -gt 0 ]]; then sleep 0.5; fi
  done
}

# multiprocess N CONFIG WORKDIR [OVERRIDES...]: N processes, PROCESS_ID 0..N-1, each on K
# fake CPU devices (N*K devices in all). Process 0 prints to this terminal, the others to
# LOG_DIR/process_I.log. Ctrl-C or SIGTERM stops them all.
cmd_multiprocess() {
  [[ ${1:-} =~ ^[1-9][0-9]*$ ]] || die "multiprocess needs a process count N >= 1, then CONFIG WORKDIR"
  local n=$1 i port log_dir
  shift
  train_args "$@"
  [[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS: want a positive integer"
  port=${PORT:-$(free_port)}
  log_dir=${LOG_DIR:-$2/logs}
  local xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
  cd "$REPO_ROOT"
  if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$log_dir"
    trap 'stop_all; wait; exit 130' INT TERM
  fi
  for ((i = 0; i < n; i++)); do
    local cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" COORDINATOR_ADDRESS="127.0.0.1:$port"
               NUM_PROCESSES="$n" PROCESS_ID="$i" "$PYTHON" "${TRAIN_ARGS[@]}")
    if [[ $DRY_RUN == 1 ]]; then quote "${cmd[@]}"; continue; fi
    if [[ $i == 0 ]]; then "${cmd[@]}" & else "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 & fi
    PIDS+=($!)
  done
  if [[ $DRY_RUN != 1 ]]; then wait_all; fi
}

main() {
  if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
  local sub=${1:-}
  shift || true
  case $sub in
    train|evaluate|sample|distill|multiprocess) "cmd_$sub" "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; [[ -z $sub ]] || echo "local.sh: unknown subcommand '$sub'" >&2; exit 2 ;;
  esac
}

main "$@"
