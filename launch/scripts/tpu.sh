#!/usr/bin/env bash
# Cloud TPU VMs: create a slice, put this checkout on every worker, install, run, watch,
# delete. Every worker of a slice runs the same command (`--worker=all`); JAX finds the
# other workers by itself (launch/distributed.py calls jax.distributed.initialize()).
#
#   tpu.sh [--dry-run] SUBCOMMAND [ARGS...]      (see `usage` below; README.md beside it)
#
# Driven by environment variables:
#   TPU_NAME          node id of the TPU VM (and id of its queued resource)     required
#   ZONE              e.g. us-central2-b                                         required
#   PROJECT           GCP project; gcloud's default project when unset
#   ACCELERATOR_TYPE  e.g. v4-32, v5litepod-16, v5p-64, v6e-16                   for create
#   RUNTIME_VERSION   TPU software version; by default derived from ACCELERATOR_TYPE
#   SPOT=1            request spot capacity (preemptible, cheaper)
#   CREATE_MODE       `queued` (default: queued-resources create) or `vm` (tpu-vm create)
#   WORKDIR           gs://bucket/run: checkpoints, metrics, samples           for jobs
#   TFDS_DATA_DIR     gs://bucket/tensorflow_datasets, exported on the workers  optional
#   REPO_URL, REPO_REF   for `clone` (REPO_REF defaults to origin/HEAD)
#   REMOTE_DIR, VENV, LOG_DIR   paths on the workers (defaults ~/vdiff, ~/vdiff-venv,
#                     ~/vdiff-logs); inserted as written, so `~` expands on the worker
#   BASE_PYTHON       for `install`: a Python >= 3.11 on the workers to make the venv from
#                     (default: the image's, or python3.11 from its Ubuntu archive)
#   DRY_RUN=1         print the commands (one per line, shell-quoted) instead of running them
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-~/vdiff}"
VENV="${VENV:-~/vdiff-venv}"
LOG_DIR="${LOG_DIR:-~/vdiff-logs}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
  cat <<'EOF'
Usage: tpu.sh [--dry-run] SUBCOMMAND [ARGS...]

  create [GCLOUD_FLAGS...]      request the slice (queued resource; CREATE_MODE=vm: tpu-vm create)
  copy                          send this checkout (tracked files, uncommitted edits included)
  clone                         git clone REPO_URL at REPO_REF on every worker
  install                       venv from the image's Python >= 3.11 (else apt's python3.11),
                                then pip install -e '.[tpu]' (jax[tpu], libtpu) from PyPI
  train CONFIG [OVERRIDES...]   python -m launch.train --config CONFIG --workdir $WORKDIR ...
  evaluate [ARGS...]            python -m launch.evaluate --workdir $WORKDIR ARGS
  sample [ARGS...]              python -m launch.sample --workdir $WORKDIR ARGS (--num N --steps S)
  distill TEACHER CONFIG [OVERRIDES...]
                                python -m launch.distill --teacher TEACHER --config CONFIG --workdir $WORKDIR
  logs [JOB]                    follow JOB's log (default train) on worker ${WORKER:-0}
  status                        state of the slice, and which jobs run on which worker
  stop [JOB]                    SIGTERM to JOB on every worker: it saves a checkpoint and exits
  delete                        delete the queued resource and its node (or the VM)

Jobs run detached (nohup) on every worker, logging to $LOG_DIR/JOB.log on each worker.
Environment: TPU_NAME ZONE [PROJECT] ACCELERATOR_TYPE [RUNTIME_VERSION] [SPOT=1]
[CREATE_MODE=queued|vm] WORKDIR=gs://... [TFDS_DATA_DIR=gs://...] [REPO_URL REPO_REF]
[BASE_PYTHON] [DRY_RUN=1]
EOF
}

SCRIPT=tpu.sh
# shellcheck source=launch/scripts/common.sh
source "$REPO_ROOT/launch/scripts/common.sh"

# Fail early, naming each missing variable and how to set it.
need() {
  local v
  for v in "$@"; do
    [[ -n ${!v:-} ]] || die "$v is not set: export $v=... (see launch/scripts/README.md)"
  done
}

# LOC: the flags every gcloud tpus command takes.
set_location() {
  LOC=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then LOC+=(--project="$PROJECT"); fi
}

# The TPU software version recommended for JAX on each generation (cloud.google.com/tpu/docs/runtimes).
runtime_version() {
  if [[ -n ${RUNTIME_VERSION:-} ]]; then echo "$RUNTIME_VERSION"; return; fi
  case $ACCELERATOR_TYPE in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for ACCELERATOR_TYPE=$ACCELERATOR_TYPE: export RUNTIME_VERSION=..." ;;
  esac
}

# Run one shell command line on workers (default: all of them) through gcloud's ssh.
on_workers() {
  local command=$1 worker=${2:-all}
  set_location
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$worker" --command="$command"
}

# create: request the slice. Queued resources wait for capacity instead of failing at once;
# `status` shows when the node is ACTIVE. Extra arguments go to gcloud as they are.
cmd_create() {
  need TPU_NAME ZONE ACCELERATOR_TYPE
  local version spot=()
  version=$(runtime_version)
  set_location
  if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
  case ${CREATE_MODE:-queued} in
    queued)
      run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${LOC[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" ${spot[@]+"${spot[@]}"} "$@" ;;
    vm)
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$version" ${spot[@]+"${spot[@]}"} "$@" ;;
    *) die "CREATE_MODE=$CREATE_MODE: use queued or vm" ;;
  esac
}

# copy: archive the tracked files of this checkout, with uncommitted edits (git stash create
# snapshots them without touching the working tree), scp it to every worker and unpack it
# into a fresh REMOTE_DIR. Untracked files are left out: `git add` them first.
cmd_copy() {
  need TPU_NAME ZONE
  # shellcheck disable=SC2088  # the literal text the worker's shell would expand
  case $REMOTE_DIR in ''|'~'|'~/'|/) die "REMOTE_DIR=$REMOTE_DIR would be wiped: pick a subdirectory" ;; esac
  local ref tarball
  ref=$(git -C "$REPO_ROOT" stash create)
  ref=${ref:-HEAD}
  tarball="${TMPDIR:-/tmp}/vdiff-$$.tar.gz"
  set_location
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$ref"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:vdiff.tar.gz" "${LOC[@]}" --worker=all
  run rm -f "$tarball"
  on_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/vdiff.tar.gz -C $REMOTE_DIR && rm ~/vdiff.tar.gz"
}

# clone: clone REPO_URL on every worker (or fetch, if already cloned) and check out REPO_REF.
cmd_clone() {
  need TPU_NAME ZONE REPO_URL
  local url ref
  url=$(quote "$REPO_URL")
  ref=$(quote "${REPO_REF:-origin/HEAD}")
  on_workers "{ [ -d $REMOTE_DIR/.git ] || git clone --quiet $url $REMOTE_DIR; } && git -C $REMOTE_DIR fetch --quiet origin && git -C $REMOTE_DIR checkout --quiet --detach $ref"
}

# install: launch/scripts/tpu_vm_install.sh from the copied checkout, on every worker. The
# JAX runtimes are Ubuntu 22.04 with Python 3.10, and jax needs 3.11, so it takes the
# image's Python if it is recent enough, else python3.11 from the image's own Ubuntu
# archive (apt), then pip installs this package with its `tpu` extra from the package
# index. Nothing comes from elsewhere. Each worker ends by printing its place in the slice.
cmd_install() {
  need TPU_NAME ZONE
  local env=""
  if [[ -n ${BASE_PYTHON:-} ]]; then env="BASE_PYTHON=$(quote "$BASE_PYTHON") "; fi
  on_workers "${env}bash $REMOTE_DIR/launch/scripts/tpu_vm_install.sh $VENV $REMOTE_DIR"
}

# The shell line that starts `python -m launch.JOB ARGS` detached on a worker, refusing to
# start a second copy of a running job. Output is appended to LOG_DIR/JOB.log, the pid
# written to LOG_DIR/JOB.pid (used by `stop` and `status`).
job_command() {
  local job=$1; shift
  local log="$LOG_DIR/$job" env=""
  if [[ -n ${TFDS_DATA_DIR:-} ]]; then env="export TFDS_DATA_DIR=$(quote "$TFDS_DATA_DIR") && "; fi
  printf '%s' "cd $REMOTE_DIR && mkdir -p $LOG_DIR && " \
    "{ ! kill -0 \"\$(cat $log.pid 2>/dev/null)\" 2>/dev/null || { echo \"\$(hostname): $job is already running\" >&2; exit 1; }; } && " \
    "$env{ echo \"=== \$(date -u) $job\" >> $log.log; " \
    "nohup $VENV/bin/python -m launch.$job $(quote "$@") >> $log.log 2>&1 < /dev/null & echo \$! > $log.pid; }"
}

# A local WORKDIR on a multi-host slice would give every worker its own checkpoints.
check_workdir() {
  need WORKDIR
  [[ $WORKDIR == gs://* || ${ALLOW_LOCAL_WORKDIR:-0} == 1 ]] ||
    die "WORKDIR=$WORKDIR is not on GCS: workers of a slice share no disk, so checkpoints must go to gs://... (ALLOW_LOCAL_WORKDIR=1 for a single-host slice)"
}

# train CONFIG [OVERRIDES...]: the same training command on every worker.
cmd_train() {
  need TPU_NAME ZONE
  check_workdir
  [[ $# -ge 1 ]] || die "train needs a config: tpu.sh train configs/vdm/cifar10.py [--config.key=value ...]"
  local config=$1; shift
  [[ -f $REPO_ROOT/${config%%:*} ]] || die "config file ${config%%:*} not found in $REPO_ROOT"
  on_workers "$(job_command train --config "$config" --workdir "$WORKDIR" "$@")"
}

# distill TEACHER CONFIG [OVERRIDES...]: every distillation stage into WORKDIR, on every worker.
cmd_distill() {
  need TPU_NAME ZONE
  check_workdir
  [[ $# -ge 2 ]] || die "distill needs the teacher's workdir and a config: tpu.sh distill gs://b/teacher configs/distill/cifar10.py"
  local teacher=$1 config=$2; shift 2
  [[ -f $REPO_ROOT/${config%%:*} ]] || die "config file ${config%%:*} not found in $REPO_ROOT"
  on_workers "$(job_command distill --teacher "$teacher" --config "$config" --workdir "$WORKDIR" "$@")"
}

# evaluate / sample [ARGS...]: read the run in WORKDIR; ARGS go to the entry point.
cmd_evaluate() { need TPU_NAME ZONE; check_workdir; on_workers "$(job_command evaluate --workdir "$WORKDIR" "$@")"; }
cmd_sample() { need TPU_NAME ZONE; check_workdir; on_workers "$(job_command sample --workdir "$WORKDIR" "$@")"; }

# logs [JOB]: follow one worker's log (WORKER=0 by default; Ctrl-C stops following only).
cmd_logs() {
  need TPU_NAME ZONE
  on_workers "tail -n 200 -F $LOG_DIR/${1:-train}.log" "${WORKER:-0}"
}

# status: the queued resource (or VM) as GCP sees it, then the live jobs on each worker.
cmd_status() {
  need TPU_NAME ZONE
  set_location
  if [[ ${CREATE_MODE:-queued} == queued ]]; then
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOC[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}"
  fi
  on_workers "for j in train evaluate sample distill; do p=\$(cat $LOG_DIR/\$j.pid 2>/dev/null) && kill -0 \"\$p\" 2>/dev/null && echo \"\$(hostname): \$j running (pid \$p)\"; done; true" ||
    echo "tpu.sh: workers not reachable (is the node ACTIVE yet?)" >&2
}

# stop [JOB]: SIGTERM on every worker; the trainer saves a checkpoint and exits, so the same
# `train` command later resumes from it.
cmd_stop() {
  need TPU_NAME ZONE
  local job=${1:-train}
  on_workers "kill -TERM \"\$(cat $LOG_DIR/$job.pid)\" && echo \"\$(hostname): sent SIGTERM to $job\""
}

# delete: the queued resource together with its node (--force), or the VM.
cmd_delete() {
  need TPU_NAME ZONE
  set_location
  if [[ ${CREATE_MODE:-queued} == queued ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOC[@]}" --force
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}"
  fi
}

main() {
  if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
  local sub=${1:-}
  shift || true
  case $sub in
    create|copy|clone|install|train|evaluate|sample|distill|logs|status|stop|delete) "cmd_$sub" "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; [[ -z $sub ]] || echo "tpu.sh: unknown subcommand '$sub'" >&2; exit 2 ;;
  esac
}

main "$@"
