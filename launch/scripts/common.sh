# shellcheck shell=bash
# Helpers shared by tpu.sh, gpu.sh and local.sh (sourced, not run). The caller sets
# SCRIPT (its name, for messages), REPO_ROOT, PYTHON and DRY_RUN first.

die() { printf '%s: %s\n' "$SCRIPT" "$*" >&2; exit 1; }

# Print the arguments as one line that a shell reads back into the same arguments.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ -n $a && $a != *[!A-Za-z0-9_./:=@%+,-]* ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${out[*]}"
}

# Run a command, or with DRY_RUN=1 only print it.
run() {
  if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}

# The training arguments, checked: CONFIG must exist in this checkout.
train_args() {
  [[ $# -ge 2 ]] || die "expected CONFIG WORKDIR [OVERRIDES...], e.g. configs/vdm/digits.py runs/digits"
  local config=$1 workdir=$2; shift 2
  [[ -f $REPO_ROOT/${config%%:*} ]] || die "config file ${config%%:*} not found in $REPO_ROOT"
  TRAIN_ARGS=(-m launch.train --config "$config" --workdir "$workdir" "$@")
}

# The distillation arguments, checked: TEACHER CONFIG WORKDIR [OVERRIDES...].
distill_args() {
  [[ $# -ge 3 ]] || die "expected TEACHER CONFIG WORKDIR [OVERRIDES...], e.g. runs/digits configs/distill/digits.py runs/digits_distill"
  local teacher=$1 config=$2 workdir=$3; shift 3
  [[ -f $REPO_ROOT/${config%%:*} ]] || die "config file ${config%%:*} not found in $REPO_ROOT"
  DISTILL_ARGS=(-m launch.distill --teacher "$teacher" --config "$config" --workdir "$workdir" "$@")
}

# train / evaluate / sample / distill as one process on this host (tpu.sh redefines them).
cmd_train() { train_args "$@"; cd "$REPO_ROOT" || exit; run "$PYTHON" "${TRAIN_ARGS[@]}"; }
cmd_distill() { distill_args "$@"; cd "$REPO_ROOT" || exit; run "$PYTHON" "${DISTILL_ARGS[@]}"; }
cmd_evaluate() {
  [[ $# -ge 1 ]] || die "evaluate needs WORKDIR"
  local workdir=$1; shift
  cd "$REPO_ROOT" || exit; run "$PYTHON" -m launch.evaluate --workdir "$workdir" "$@"
}
cmd_sample() {
  [[ $# -ge 1 ]] || die "sample needs WORKDIR (then --num N --steps S)"
  local workdir=$1; shift
  cd "$REPO_ROOT" || exit; run "$PYTHON" -m launch.sample --workdir "$workdir" "$@"
}
