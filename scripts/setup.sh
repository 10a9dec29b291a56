#!/usr/bin/env bash
# Creates .venv (with only python3 present) and installs oodjax with its test extra into it.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
# OODJAX_EXTRAS picks the extras (default: test; CI uses test,bench for the PyTorch twin).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.oodjax-installed  # holds the extras last installed
extras=${OODJAX_EXTRAS:-test}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ]; then
  echo "setup: installing oodjax[$extras] and its dependencies into .venv (about a minute)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e ".[$extras]" &&
         # The embedded data's provenance tests read this package; its metadata declares
         # TensorFlow, which it does not need for its data files, hence --no-deps.
         .venv/bin/python -m pip install --disable-pip-version-check --no-deps animal-mnist==0.4
       } \
       >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "setup: pip install failed; the whole log is in $log" >&2
    exit 1
  fi
  echo "$extras" > "$stamp"
fi
