#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (CPU-only, offline) plus ruff.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash examples/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --durations=10 "$@"
