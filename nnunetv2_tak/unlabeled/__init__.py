"""The unlabeled-data stream: discovery and checks of ``imagesUnlabeled/``, preprocessing with the
dataset's own plans into a separate folder (with a manifest that detects stale data), and an
image-only dataset that never opens a label file.

Layout: ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/`` holds ``<case>.b2nd`` (the
preprocessed image, as nnU-Net stores it), ``<case>.pkl`` (properties) and the manifests that record which
case was made from which source file with which plans: ``tak_unlabeled.json`` (runs without shards) and
``tak_unlabeled.shard-I-of-N.json`` (one part per shard of a sharded run; readers merge them), plus
``tak_unlabeled.shard-I-of-N.lock`` while shard I runs. Every file is written to a temporary name and moved
into place, with nnU-Net's file mode (0o666 & ~umask). Each finished case is recorded with the size and sha256 of
its files; preprocessing and training check the files against that record before they are used.
"""

from nnunetv2_tak.unlabeled.dataset import ImageOnlyDataset
from nnunetv2_tak.unlabeled.files import (
    MANIFEST,
    UNLABELED_DIR,
    UnlabeledDataError,
    check_image_file,
    find_unlabeled_images,
    plans_fingerprint,
    unlabeled_folder,
)
from nnunetv2_tak.unlabeled.integrity import CHECKSUM, SIZE
from nnunetv2_tak.unlabeled.preprocess import check_unlabeled, preprocess_unlabeled, preprocessed_unlabeled_cases
from nnunetv2_tak.unlabeled.shards import check_shard_arguments, shard_cases, shard_of
from nnunetv2_tak.unlabeled.splits import SPLIT_KEY, SplitError, few_label_split, shard_for_rank, split_unlabeled_cases

__all__ = [
    "CHECKSUM",
    "MANIFEST",
    "SIZE",
    "SPLIT_KEY",
    "UNLABELED_DIR",
    "ImageOnlyDataset",
    "SplitError",
    "UnlabeledDataError",
    "check_image_file",
    "check_shard_arguments",
    "check_unlabeled",
    "few_label_split",
    "find_unlabeled_images",
    "plans_fingerprint",
    "preprocess_unlabeled",
    "preprocessed_unlabeled_cases",
    "shard_cases",
    "shard_for_rank",
    "shard_of",
    "split_unlabeled_cases",
    "unlabeled_folder",
]
