#!/usr/bin/env bash
# Set up, then run the test suite (slow checks excluded; `bash scripts/test.sh -m slow` runs
# only those). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
