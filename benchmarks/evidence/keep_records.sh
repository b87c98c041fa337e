#!/bin/bash
# Keeps the study's small text records in the repository: for every run under RUNS/study and
# every evaluation under RUNS/eval, its config.yaml, log.jsonl, summary.json and results.json
# (no checkpoints, no features, no images), plus each run's `/usr/bin/time` line.
#   benchmarks/evidence/keep_records.sh RUNS [DEST]   (DEST: benchmarks/evidence/records)
# The run directories live outside the work tree and are lost with the machine; these records
# are what docs/RESULTS.md's study tables and figures are made from: `cmae plot` reads
# DEST/study/NAME, and `evaluate.py --runs DEST/study --out DEST/eval --random-seeds ...`
# prints the table from the kept results without running anything (it skips every command
# whose results exist; name random seeds only when their kNN and probe results are kept).
# Records already in DEST stay (a later machine may hold fewer runs); a run kept again is
# overwritten by its newer files, and walls.txt gains the new lines.
set -euo pipefail
src=${1:?usage: keep_records.sh RUNS [DEST]}
dest=$(realpath -m "${2:-$(dirname "$0")/records}")
cd "$src"
dirs=(); for d in study eval; do [ -d "$d" ] && dirs+=("$d"); done
[ ${#dirs[@]} -gt 0 ] || { echo "keep_records: no study/ or eval/ in $src" >&2; exit 1; }
mkdir -p "$dest/study"
find "${dirs[@]}" -path eval/features -prune -o -type f \
  \( -name log.jsonl -o -name config.yaml -o -name summary.json -o -name results.json \) \
  -print0 | xargs -0 -r cp --parents -t "$dest"
walls=$dest/study/walls.txt
{ [ -f "$walls" ] && cat "$walls"
  for f in study/*.log; do [ -f "$f" ] && grep -h " s wall$" "$f"; done
} | sort -u > "$walls.new" || true
mv "$walls.new" "$walls"
echo "kept $(find "$dest" -type f | wc -l) files in $dest"
