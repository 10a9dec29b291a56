#!/usr/bin/env bash
# The main job: set up, train the small CNN on embedded Fashion-MNIST (resuming if interrupted),
# and score the detectors against every embedded OOD set. Extra arguments go to `oodjax run`,
# e.g. `bash scripts/main.sh --set train.num_epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/oodjax run --config "${CONFIG:-configs/fmnist_small_cnn.py}" \
  --workdir "${WORKDIR:-runs/fmnist_small_cnn}" "$@"
