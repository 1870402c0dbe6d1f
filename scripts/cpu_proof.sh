#!/usr/bin/env bash
# The CPU proof (reports/cpu-proof.md): run every declared round of examples/proof/<name>.yaml, stage by
# stage with the `oel` CLI, in its own project folder (.cache/proof/<name>: params.yaml, data/, models/,
# reports/, mlruns/), so the main project's artifacts stay untouched; then print base / teacher / student,
# their paired tests, the items written, and each stage's wall time (also in <folder>/timings.txt).
#   scripts/cpu_proof.sh users | users-file | frozenlake-file | users-0.5b | frozenlake-0.5b
# A rerun starts the folder afresh. OMP_NUM_THREADS=1: on 2 shared cores, two OpenMP threads each
# spin-waiting for the other made one generate call 20x slower (measured: 9 s vs > 200 s).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
names=$(cd "$repo/examples/proof" && ls *.yaml | sed 's/\.yaml$//' | paste -sd' ')
name=${1:?usage: scripts/cpu_proof.sh NAME, one of: $names}
config=$repo/examples/proof/$name.yaml
test -f "$config" || { echo "error: $config: no such proof setting; use one of: $names"; exit 2; }
dir=${PROOF_DIR:-$repo/.cache/proof}/$name
rm -rf "$dir" && mkdir -p "$dir/.cache" "$repo/.cache/models"
cp "$config" "$dir/params.yaml"
ln -s "$repo/.cache/models" "$dir/.cache/models"   # the embedded models, built once
ln -s "$repo/knowledge" "$dir/knowledge"           # rule files for extract.source: file
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
oel=$repo/.venv/bin/oel
cd "$dir"
stage() {  # one `oel` command, its wall time appended to timings.txt
  local start=$SECONDS
  "$oel" "$@"
  echo "oel $* : $((SECONDS - start)) s" | tee -a timings.txt
}
stage base
stage eval --round base
for round in $("$repo/.venv/bin/python" -c "from oel.config import load_params; print(*load_params().rounds)"); do
  for step in collect extract consolidate headroom distill eval; do  # distill trains only where headroom found some
    stage "$step" --round "$round"
  done
done
echo "total: $SECONDS s" | tee -a timings.txt
"$repo/.venv/bin/python" "$repo/scripts/proof_table.py" "$dir"
