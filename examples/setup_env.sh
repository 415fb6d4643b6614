#!/usr/bin/env bash
# Create ./.venv (once) and install nnunetv2_tak with its test tools into it. Idempotent.
# torch is pinned to the build this project is tested with (CPU works; it is a CUDA build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# installed = the distribution's metadata and console scripts exist (the source tree alone is importable)
if ! [ -x .venv/bin/nnUNetv2_tak_encode_prompts ] || \
   ! .venv/bin/python -c "import importlib.metadata as m; m.version('nnunetv2-tak'); import torch, open_clip, pytest" \
     2>/dev/null; then
    .venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/pip install --quiet -e ".[test]"
fi
