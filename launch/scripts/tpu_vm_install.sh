#!/usr/bin/env bash
# Runs on one Cloud TPU VM worker (`tpu.sh install` starts it on all of them): a Python
# >= 3.11 venv with this checkout and its `tpu` extra (jax[tpu] and libtpu, pinned in
# setup.py, from the package index).
#
#   tpu_vm_install.sh VENV CHECKOUT
#
# Where Python comes from, first match:
#   1. BASE_PYTHON, if set (e.g. a conda or deadsnakes python3.11 you installed);
#   2. python3, python3.13, python3.12 or python3.11 already on the image, if >= 3.11;
#   3. the image's own Ubuntu archive: `apt-get install python3.11 python3.11-venv`
#      (Ubuntu 22.04, the base of the JAX runtimes tpu-ubuntu2204-base, v2-alpha-tpuv5,
#      v2-alpha-tpuv5-lite and v2-alpha-tpuv6e, ships Python 3.10 as python3 and 3.11 in
#      its universe component).
# Nothing is fetched from outside the Ubuntu archive and the Python package index (no
# standalone Python builds). apt waits up to 5 minutes for the dpkg lock, which a fresh
# VM's unattended upgrades may hold.
set -euo pipefail

die() { printf 'tpu_vm_install.sh (%s): %s\n' "$(hostname)" "$*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: tpu_vm_install.sh VENV CHECKOUT"
venv=$1 checkout=$2
[[ -f $checkout/setup.py ]] || die "no checkout at $checkout: run \`tpu.sh copy\` (or clone) first"

SUDO=()
if [[ $(id -u) != 0 ]]; then SUDO=(sudo); fi
apt_install() {
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq &&
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@"
}

# "3.11" for a Python interpreter, or nothing if it does not run.
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
recent() { local v; v=$(version_of "$1"); [[ $v =~ ^3\.([0-9]+)$ && ${BASH_REMATCH[1]} -ge 11 ]]; }

python=${BASE_PYTHON:-}
if [[ -n $python ]]; then
  recent "$python" || die "BASE_PYTHON=$python is not a Python >= 3.11 (jax needs one)"
else
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" > /dev/null && recent "$candidate"; then python=$candidate; break; fi
  done
fi
if [[ -z $python ]]; then
  echo "$(hostname): no Python >= 3.11 on this image; installing python3.11 with apt"
  apt_install python3.11 python3.11-venv ||
    die "apt has no python3.11 here (not Ubuntu 22.04?). Create the slice with a runtime of Ubuntu 22.04 or later (tpu-ubuntu2204-base, v2-alpha-tpuv5, v2-alpha-tpuv5-lite, v2-alpha-tpuv6e), or install a Python >= 3.11 yourself and pass BASE_PYTHON=/path/to/python3.11 to tpu.sh install."
  python=python3.11
fi

# Debian and Ubuntu keep venv's pip bootstrap (ensurepip) in a separate package.
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  apt_install "python$(version_of "$python")-venv" ||
    die "$python cannot create a venv (no ensurepip): install python$(version_of "$python")-venv"
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "${checkout}[tpu]"
# Each worker's view of the slice, without starting anything: launch/distributed.py's plan
# (this worker's number among the slice's processes), and the devices libtpu sees. Every
# worker must report the same total.
"$venv/bin/python" -m launch.distributed
