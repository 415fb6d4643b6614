"""A self-contained nnU-Net workspace for the examples (quickstart, benchmarks). Imports nothing from
nnunetv2: nnU-Net reads its path variables when it is first imported, so call this before."""

from __future__ import annotations

import os
from pathlib import Path


def use_workspace(work: str | os.PathLike) -> Path:
    """Point nnUNet_raw/_preprocessed/_results at folders inside ``work`` (created) and set CPU-friendly
    defaults unless already set: 2 augmentation workers, 1 export worker, no torch.compile."""
    work = Path(work).resolve()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / var)
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    return work
