#!/usr/bin/env bash
# Set up ./.venv and run the quickstart (synthetic data, plan, preprocess, train, predict, Dice).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash examples/setup_env.sh
exec .venv/bin/python examples/quickstart.py "$@"
