"""Helpers shared by the command-line tools."""

from __future__ import annotations

import os
from pathlib import Path


def dataset_name(dataset: str) -> str:
    """'501' or 'Dataset501_X' -> 'Dataset501_X' (nnU-Net's own lookup)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)


def nnunet_folder(variable: str, dataset: str, error: type[Exception] = ValueError) -> Path:
    """$<variable>/<dataset>, failing with a message naming the variable when it is unset."""
    root = os.environ.get(variable)
    if not root:
        raise error(f"the environment variable {variable} is not set (see nnU-Net's setting_up_paths.md)")
    return Path(root) / dataset


def dataset_folders(dataset: str, error: type[Exception] = ValueError) -> tuple[str, Path, Path]:
    """(dataset name, $nnUNet_raw/<name>, $nnUNet_preprocessed/<name>)."""
    name = dataset_name(dataset)
    return name, nnunet_folder("nnUNet_raw", name, error), nnunet_folder("nnUNet_preprocessed", name, error)
