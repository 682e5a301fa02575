#!/usr/bin/env bash
# The two commands of the README, on a fresh Debian/Ubuntu machine with Python 3.10+:
#   bash run.sh demo   # prepare everything, run the embedded default, print results and plots
#   bash run.sh test   # prepare everything, run the test suite (what .ci/run calls)
# Both are idempotent: the virtualenv, the installed package and the data are reused, and the
# demo run resumes (or skips) what it already trained.
set -euo pipefail
cd "$(dirname "$0")"

# Debian's dataset-fashion-mnist (IDX files); FASHION_MNIST_DIR=DIR reads them from DIR instead.
DATA=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
WORKDIR=runs/fashion_mnist

say() { printf '[run.sh] %s\n' "$*"; }

check_python() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
    say "needs Python >= 3.10 as python3 (found: $(python3 --version 2>&1 || echo none))"
    exit 1
  }
  python3 -c 'import venv, ensurepip' 2>/dev/null || {
    say "python3 cannot make virtualenvs: sudo apt-get install python3-venv, then rerun"
    exit 1
  }
}

prepare_env() {  # .venv with the package and the test tools; torch/nir extras when present
  [ -x .venv/bin/python ] || { say "creating .venv"; python3 -m venv .venv; }
  local extras="dev,nir"
  .venv/bin/python -c 'import torch' 2>/dev/null && extras="$extras,torch,nir-consumers"
  say "installing idsnn-jax[$extras] into .venv (quick when already there)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
}

prepare_data() {  # returns 1 (after saying what to do) when the data cannot be installed
  [ -d "$DATA" ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null && $sudo true 2>/dev/null; then
    say "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    ($sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      && [ -d "$DATA" ] && return 0
  fi
  say "Fashion-MNIST is not in $DATA and could not be installed here. Either run"
  say "  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)"
  say "and then bash run.sh demo again, or put the four IDX files (train-images-idx3-ubyte.gz,"
  say "...) in a folder DIR and run"
  say "  FASHION_MNIST_DIR=DIR bash run.sh demo"
  return 1
}

demo() {
  check_python
  prepare_data || exit 1
  prepare_env
  say "training the embedded default (configs/fashion_mnist.py) in $WORKDIR"
  # Ends with the table of what each stage reached, the plots' paths and the next commands.
  .venv/bin/python -m idsnn_jax.main --config=configs/fashion_mnist.py --workdir="$WORKDIR" \
    ${FASHION_MNIST_DIR:+--config.data_dir="$FASHION_MNIST_DIR"}
}

run_tests() {
  check_python
  prepare_data || say "continuing: the tests that need real Fashion-MNIST will be skipped"
  prepare_env
  .venv/bin/python -m pytest -n 2
}

case "${1:-}" in
  demo) demo ;;
  test) run_tests ;;
  *) echo "usage: bash run.sh demo | test" >&2; exit 2 ;;
esac
