#!/usr/bin/env bash
# Set up ./.venv and run the quickstart: synthetic cohort, plan, preprocess, train TAK on a CPU demo
# schedule, predict held-out scans, per-class Dice table and a PNG. Arguments go to examples/quickstart.py
# (e.g. --pretrained openai for real CLIP text when online; --help lists them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash examples/setup_env.sh
exec .venv/bin/python examples/quickstart.py "$@"
