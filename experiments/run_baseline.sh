#!/usr/bin/env bash
# Reproduces experiments/baseline: the main job (small CNN, embedded Fashion-MNIST, every
# detector against every embedded OOD set, and ENVISE's short scenario), then copies its result
# files here and regenerates the README tables.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${WORKDIR:-runs/experiments_baseline}
WORKDIR=$workdir bash scripts/main.sh --no-progress
cp "$workdir/results.json" "$workdir/results.md" "$workdir/metrics.jsonl" experiments/baseline/
cp "$workdir/envise/results.json" experiments/baseline/envise.json  # the ENVISE stage's numbers
.venv/bin/python -m experiments.make_readme
