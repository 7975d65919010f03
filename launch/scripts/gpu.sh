#!/usr/bin/env bash
# GPUs: one host (one process sees all its GPUs), several hosts over ssh, or a SLURM job.
# Every multi-host process runs the same command with COORDINATOR_ADDRESS (host:port of
# process 0), NUM_PROCESSES and PROCESS_ID, which launch/distributed.py passes to
# jax.distributed.initialize().
#
#   gpu.sh [--dry-run] SUBCOMMAND [ARGS...]      (see `usage` below; README.md beside it)
#
# Environment:
#   PYTHON            interpreter with this package installed (default python3)
#   PORT              coordinator port on the first host (default 12355)
#   COORDINATOR_HOST  address of the first host as the others reach it (default: its name
#                     in the hostfile, user@ stripped)
#   REMOTE_DIR        the checkout on every host (default: this checkout's path, as on a
#                     shared filesystem); LOG_DIR (default ~/vdiff-logs) for `multi` logs.
#                     These two and PYTHON go into the remote command as written: ~ expands there.
#   TFDS_DATA_DIR     exported to every process when set
#   NODES, GPUS_PER_NODE, TIME_LIMIT   `slurm` outside an allocation: the job it submits
#                     (defaults 1, 8, none); sbatch's own SBATCH_* variables apply too
#   DRY_RUN=1         print the commands (one per line, shell-quoted) instead of running them
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-12355}"
LOG_DIR="${LOG_DIR:-~/vdiff-logs}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
  cat <<'EOF'
Usage: gpu.sh [--dry-run] SUBCOMMAND [ARGS...]

  install [HOSTFILE]                         pip install -e ".[cuda12]" (jax with CUDA 12 from
                                             the package index) here, or on every host
  train CONFIG WORKDIR [OVERRIDES...]        this host, one process over all its GPUs
  evaluate WORKDIR [ARGS...]                 this host
  sample WORKDIR [ARGS...]                   this host (ARGS: --num N --steps S)
  distill TEACHER CONFIG WORKDIR [OVERRIDES...]
                                             this host: every stage of python -m launch.distill
  multi HOSTFILE CONFIG WORKDIR [OVERRIDES...]
                                             train on every host of HOSTFILE (one per line,
                                             first = coordinator), started detached over ssh
  logs HOSTFILE [I]                          follow host I's training log (default 0)
  stop HOSTFILE                              SIGTERM to the trainer on every host (saves, exits)
  slurm CONFIG WORKDIR [OVERRIDES...]        inside an allocation: srun, one process per task;
                                             elsewhere: sbatch a job (NODES x GPUS_PER_NODE) that
                                             runs this same command inside its allocation

Environment: PYTHON (python3) PORT (12355) COORDINATOR_HOST REMOTE_DIR LOG_DIR TFDS_DATA_DIR
NODES (1) GPUS_PER_NODE (8) TIME_LIMIT DRY_RUN=1
EOF
}

SCRIPT=gpu.sh
# shellcheck source=launch/scripts/common.sh
source "$REPO_ROOT/launch/scripts/common.sh"

REMOTE_DIR="${REMOTE_DIR:-$(quote "$REPO_ROOT")}"

# HOSTS: the hosts of a hostfile, one per line; blank lines and # comments are skipped.
read_hosts() {
  [[ -f ${1:-} ]] || die "hostfile '${1:-}' not found: one host (or user@host) per line, the first is the coordinator"
  HOSTS=()
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    if [[ -n $line ]]; then HOSTS+=("$line"); fi
  done < "$1"
  [[ ${#HOSTS[@]} -ge 1 ]] || die "hostfile $1 lists no host"
}

ssh_to() { run ssh -o BatchMode=yes "$1" "$2"; }

# multi HOSTFILE CONFIG WORKDIR [OVERRIDES...]: on host i, start the trainer detached with
# PROCESS_ID=i, all sharing the first host's COORDINATOR_ADDRESS. The output goes to
# LOG_DIR/train.log on each host and the pid to LOG_DIR/train.pid (for `stop`).
# WORKDIR must be storage that every host sees (NFS, gs://...).
cmd_multi() {
  [[ $# -ge 3 ]] || die "usage: gpu.sh multi HOSTFILE CONFIG WORKDIR [OVERRIDES...]"
  read_hosts "$1"; shift
  train_args "$@"
  local head=${HOSTS[0]#*@} n=${#HOSTS[@]} i env
  local coordinator="${COORDINATOR_HOST:-$head}:$PORT"
  for ((i = 0; i < n; i++)); do
    env="export COORDINATOR_ADDRESS=$(quote "$coordinator") NUM_PROCESSES=$n PROCESS_ID=$i"
    if [[ -n ${TFDS_DATA_DIR:-} ]]; then env+=" TFDS_DATA_DIR=$(quote "$TFDS_DATA_DIR")"; fi
    ssh_to "${HOSTS[i]}" "cd $REMOTE_DIR && mkdir -p $LOG_DIR && $env && { echo \"=== \$(date -u) train process $i/$n\" >> $LOG_DIR/train.log; nohup $PYTHON $(quote "${TRAIN_ARGS[@]}") >> $LOG_DIR/train.log 2>&1 < /dev/null & echo \$! > $LOG_DIR/train.pid; }"
  done
}

# install [HOSTFILE]: this checkout with jax's CUDA 12 wheels (NVIDIA's libraries come as
# pip packages: no local CUDA toolkit needed, only a driver), here or on every host.
cmd_install() {
  local cmd="cd $REMOTE_DIR && $PYTHON -m pip install --quiet -e '.[cuda12]' && $PYTHON -c 'import jax; print(jax.devices())'"
  if [[ $# -eq 0 ]]; then
    run bash -c "cd $(quote "$REPO_ROOT") && $PYTHON -m pip install --quiet -e '.[cuda12]'"
    return
  fi
  read_hosts "$1"
  local host
  for host in "${HOSTS[@]}"; do ssh_to "$host" "$cmd"; done
}

# logs HOSTFILE [I]: follow the training log on host I.
cmd_logs() {
  read_hosts "${1:-}"
  local i=${2:-0}
  [[ $i =~ ^[0-9]+$ && $i -lt ${#HOSTS[@]} ]] || die "host index $i: the hostfile has ${#HOSTS[@]} hosts"
  ssh_to "${HOSTS[i]}" "tail -n 200 -F $LOG_DIR/train.log"
}

# stop HOSTFILE: SIGTERM to every trainer; they save a checkpoint and exit, and re-running
# the same `multi` command resumes from it.
cmd_stop() {
  read_hosts "${1:-}"
  local host
  for host in "${HOSTS[@]}"; do
    ssh_to "$host" "kill -TERM \"\$(cat $LOG_DIR/train.pid)\""
  done
}

# The first host of a SLURM node list: scontrol's expansion, or where scontrol is missing
# (a dry run off the cluster) the same rule JAX uses: node[07-08],gpu1 -> node07.
first_node() {
  if command -v scontrol > /dev/null; then scontrol show hostnames "$1" | head -n 1; return; fi
  local prefix=${1%%\[*} range=${1#*\[}
  if [[ $1 != *\[* || $prefix == *,* ]]; then printf '%s\n' "${1%%,*}"; return; fi
  printf '%s\n' "$prefix${range%%[],-]*}"   # the first number of the first range
}

# Outside an allocation: submit a job that runs `gpu.sh slurm ...` inside one, one task per
# node seeing all its GPUs, SIGTERM to the tasks 2 minutes before TIME_LIMIT (save, exit).
slurm_submit() {
  train_args "$@"
  local opts=(--job-name=vdiff-train --nodes="${NODES:-1}" --ntasks-per-node=1
              --gpus-per-node="${GPUS_PER_NODE:-8}" --signal=TERM@120 --chdir="$REPO_ROOT")
  if [[ -n ${TIME_LIMIT:-} ]]; then opts+=(--time="$TIME_LIMIT"); fi
  [[ $DRY_RUN == 1 ]] || command -v sbatch > /dev/null ||
    die "sbatch not found: run this on a SLURM login node (or inside an allocation, where it runs srun)"
  run sbatch "${opts[@]}" --wrap="$(quote launch/scripts/gpu.sh slurm "$@")"
}

# slurm CONFIG WORKDIR [OVERRIDES...]: inside an allocation (an sbatch script, salloc, or the
# job slurm_submit made), srun starts one task per slot of the allocation (ask for
# --ntasks-per-node=1 to have one process see all GPUs of a node); each task sets PROCESS_ID
# from its SLURM_PROCID, and the first node coordinates.
cmd_slurm() {
  if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then slurm_submit "$@"; return; fi
  [[ -n ${SLURM_NTASKS:-} ]] ||
    die "SLURM_NTASKS is unset in this allocation: ask for tasks (sbatch --ntasks-per-node=1)"
  train_args "$@"
  local head
  head=$(first_node "$SLURM_JOB_NODELIST")
  cd "$REPO_ROOT"
  # The single quotes are for the task's shell: SLURM_PROCID differs per task.
  # shellcheck disable=SC2016
  run env COORDINATOR_ADDRESS="${COORDINATOR_HOST:-$head}:$PORT" NUM_PROCESSES="$SLURM_NTASKS" \
    srun --kill-on-bad-exit=1 bash -c 'export PROCESS_ID=$SLURM_PROCID; exec "$@"' _ "$PYTHON" "${TRAIN_ARGS[@]}"
}

main() {
  if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
  local sub=${1:-}
  shift || true
  case $sub in
    install|train|evaluate|sample|distill|multi|logs|stop|slurm) "cmd_$sub" "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; [[ -z $sub ]] || echo "gpu.sh: unknown subcommand '$sub'" >&2; exit 2 ;;
  esac
}

main "$@"
