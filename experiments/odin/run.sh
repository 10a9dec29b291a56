#!/usr/bin/env bash
# Reproduces experiments/odin: baseline vs ODIN (paper's full grid and protocol) on the embedded
# data, reusing the main job's trained small CNN when runs/experiments_baseline holds it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
workdir=${WORKDIR:-runs/experiments_baseline}
.venv/bin/oodjax run --config configs/odin_fmnist.py --workdir "$workdir" --no-progress
mkdir -p experiments/odin
cp "$workdir/results.json" "$workdir/results.md" experiments/odin/
rm -rf experiments/odin/plots && cp -r "$workdir/plots" experiments/odin/plots
.venv/bin/python -m experiments.make_readme
