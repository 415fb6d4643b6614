"""Make the stock nnU-Net CLI find the TAK trainers without any manual setup.

nnunetv2 2.8 looks for trainers outside its own package only in the folders listed in the
``nnUNet_extTrainer`` environment variable. The wheel installs ``nnunetv2_tak.pth`` into
site-packages; Python runs it at start-up and it calls :func:`register`, which appends the tiny
shim folder (one module re-exporting our trainers) to that variable, keeping whatever the user
already set. This module must stay import-cheap: it runs in every interpreter of the environment.
"""

from __future__ import annotations

import os

ENV_VAR = "nnUNet_extTrainer"
SHIM_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_trainer_shim")


def register(environ: dict[str, str] | None = None) -> str:
    """Append the shim folder to ``nnUNet_extTrainer`` (idempotent); return the new value."""
    env = os.environ if environ is None else environ
    current = env.get(ENV_VAR, "")
    entries = [p for p in current.split(os.pathsep) if p.strip()]
    if not any(os.path.abspath(p) == SHIM_FOLDER for p in entries):
        entries.append(SHIM_FOLDER)
    env[ENV_VAR] = os.pathsep.join(entries)
    return env[ENV_VAR]
