#!/usr/bin/env bash
# GPU check of nnunetv2_tak, a few minutes on a CUDA machine (what it runs: examples/gpu_check.py):
# stock vs TAK iteration time and peak memory at nnU-Net's default plans (AMP, nnU-Net's default
# torch.compile), a short TAK training and nnUNetv2_predict, ratios printed.
#
#   bash examples/gpu_check.sh                        # CUDA
#   bash examples/gpu_check.sh --device cpu --tiny    # plumbing smoke run on a CPU
#
# Uses ./.venv (created by examples/setup_env.sh if it does not work yet; TAK_PYTHON=/path/python to use
# another environment). Data, models and logs go to a new temporary folder (TAK_GPU_CHECK_WORK=DIR to
# choose it; an existing one is reused).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${TAK_PYTHON:-$ROOT/.venv/bin/python}"
if ! "$PY" -c "import nnunetv2_tak, nnunetv2, torch" 2>/dev/null; then
    if [ -n "${TAK_PYTHON:-}" ]; then
        echo "TAK_PYTHON=$TAK_PYTHON cannot import nnunetv2_tak, nnunetv2 and torch; install the project into it" >&2
        exit 1
    fi
    echo "no working environment at $PY: creating it with examples/setup_env.sh" >&2
    bash "$ROOT/examples/setup_env.sh"
fi
WORK="${TAK_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/tak_gpu_check.XXXXXX")}"
exec "$PY" "$ROOT/examples/gpu_check.py" --work-dir "$WORK" "$@"
