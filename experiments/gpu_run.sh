#!/usr/bin/env bash
# The GPU measurements of issue 21 (experiments/gpu_run.py), ready for a GPU machine without
# internet: at most 8 minutes, results written as they come.
#
# Assumptions, written down because no GPU machine was at hand when this was written:
# - There, python3 (or $PYTHON) already has JAX with its CUDA plugin, flax, optax,
#   orbax-checkpoint, chex, absl-py, numpy, matplotlib, tqdm, pillow, PyYAML, protobuf and
#   PyTorch with CUDA, as the image of the lent H100/H200 machines listed them in 2026-11
#   (jax 0.11.2 with the jax-cuda13 plugin, torch 2.11; not run here). jax[cuda12] is far
#   over what can be carried (64 MiB): without a CUDA JAX the run stops after phase 1.
# - What that image lacks is pure Python: ml-collections and tensorboardX. `--fetch`, run
#   first where PyPI is reachable, saves their wheels in .whl/ (git-ignored); carry .whl/
#   along and they are installed from it into a temporary folder, no network needed.
# - The package (recipes included, in idsnn_jax/configs) is used from this checkout, copied:
#   no build, no install of the project.
# Versions are checked against pyproject.toml's floors and written to run.json.
#
# From the repository root:
#   bash experiments/gpu_run.sh --fetch               # where PyPI is reachable: wheels -> .whl/
#   bash experiments/gpu_run.sh [--out=DIR]           # on the GPU: everything, <= 8 minutes
#   bash experiments/gpu_run.sh --quick [--out=DIR]   # a rerun: main benchmark group, 1 epoch
#   bash experiments/gpu_run.sh --dry-run [--out=DIR] # on a CPU: tiny sizes, all but the GPU
# DIR (default experiments/results/gpu/<the GPU's name>) gets run.json, benchmark.{json,md,png},
# recipe.json and log.txt; --budget_s=S changes the time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(ml-collections==1.1.0 tensorboardX==2.6.5) # pure Python, what the GPU image lacks

if [[ "${1:-}" == "--fetch" ]]; then
  exec "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
fi
site=$(mktemp -d "${TMPDIR:-/tmp}/idsnn-site.XXXXXX")
trap 'rm -rf "$site"' EXIT
cp -r idsnn_jax "$site/"
missing=$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("ml_collections", "tensorboardX") if u.find_spec(m) is None))')
if [[ -n "$missing" ]]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: $PYTHON lacks $missing; run 'bash experiments/gpu_run.sh --fetch' where PyPI" \
      "is reachable and bring .whl/ along" >&2
    exit 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD/experiments${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" experiments/gpu_run.py "${@//--dry-run/--dry_run}" # absl spells it --dry_run
