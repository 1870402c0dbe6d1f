#!/usr/bin/env bash
# Resolve the GPU environment (docs/gpu.md "Installing the GPU extra"): the project's dependencies plus the `gpu`
# extra's vLLM, for linux x86_64 and Python 3.11 and 3.12, into requirements-gpu-py311.lock and
# requirements-gpu-py312.lock. Needs uv and the package index; tests/unit/test_gpu_lock.py checks the result
# offline against TRL's accepted vLLM range and vLLM's own requirements.
#
# pyproject pins three packages exactly at versions no vLLM that TRL 1.16 accepts (0.22-0.31) can share an
# environment with: numpy 2.4.6 (vLLM 0.30's mistral-common needs < 2.4), prefect 3.9.1 (it needs
# fastapi >= 0.139, vLLM 0.28-0.30 cap fastapi < 0.137) and prefect-dask with it. They are left free here and
# every other pin is kept; the pins of requirements.lock are the preferred versions of everything else.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
UV=${UV:-$here/.cache/tools/uv-0.13.9/bin/uv}
RELAXED="numpy prefect prefect-dask"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" - "$here/pyproject.toml" "$RELAXED" > "$work/gpu.in" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
relaxed = set(sys.argv[2].split())
for dep in project["dependencies"] + project["optional-dependencies"]["gpu"]:
    name = dep.split("==")[0].split(">")[0].split("<")[0].strip()
    print(name if name in relaxed else dep)
PYEOF
for py in 3.11 3.12; do
  out="$here/requirements-gpu-py${py/./}.lock"
  grep -v '^#' "$here/requirements.lock" | sed 's/+cpu//' > "$work/prefer.txt"
  cp "$work/prefer.txt" "$work/out.txt"  # an existing output file is uv's set of preferred versions
  "$UV" pip compile "$work/gpu.in" --python-platform x86_64-manylinux_2_28 --python-version "$py" \
    --no-header --no-annotate -q -o "$work/out.txt"
  moved=$("${PYTHON:-python3}" - "$work/prefer.txt" "$work/out.txt" <<'PYEOF'
import sys
def pins(path):
    out = {}
    for line in open(path):
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            out[name.lower().replace("_", "-").replace(".", "-")] = version
    return out
cpu, gpu = pins(sys.argv[1]), pins(sys.argv[2])
print(", ".join(f"{n} {cpu[n]} -> {gpu[n]}" for n in sorted(gpu) if n in cpu and cpu[n] != gpu[n]))
PYEOF
)
  {
    echo "# The GPU environment for Python $py on linux x86_64: the project's dependencies with the gpu extra"
    echo "# (vLLM), resolved by scripts/gpu_check/lock.sh (uv $("$UV" --version | cut -d' ' -f2), $(date -u +%Y-%m-%d))."
    # pyproject's requires-python (<3.12) stops pip at 3.12 unless told; the lock itself is the resolved set.
    extra=$([ "$py" = 3.11 ] && echo "" || echo " --ignore-requires-python")
    echo "# Install: pip install -r $(basename "$out") && pip install --no-deps$extra -e .   (docs/gpu.md)"
    echo "# Left free (pyproject's exact pins cannot share an environment with vLLM): $RELAXED"
    echo "# moved from requirements.lock: $moved"
    cat "$work/out.txt"
  } > "$out"
  echo "wrote $out ($(grep -c '==' "$out") pins; moved: $moved)"
done
