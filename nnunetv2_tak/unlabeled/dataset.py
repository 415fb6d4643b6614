"""The image-only dataset the unlabeled stream reads: never opens a label or properties file."""


from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from nnunetv2_tak.unlabeled.files import UnlabeledDataError

logger = logging.getLogger(__name__)

class ImageOnlyDataset:
    """nnU-Net-dataset-like access to preprocessed images that never opens a segmentation or a
    properties file (a labeled case used as unlabeled must not leak its labels, and nnU-Net's
    properties carry class locations computed from the labels).

    ``load_case(id)`` -> (data [c, *S], zeros [1, *S] int8, None, {"class_locations": {}}); the
    zero target only lets nnU-Net's loader and augmentation run unchanged; it is never used.
    """

    def __init__(self, sources: Mapping[str, Path]):
        self.sources = dict(sources)  # case id -> preprocessed image file (.b2nd, .npy or .npz)
        self.identifiers = sorted(self.sources)

    @classmethod
    def from_folders(cls, folders_and_cases: Iterable[tuple[Path, Iterable[str]]]) -> ImageOnlyDataset:
        sources: dict[str, Path] = {}
        for folder, cases in folders_and_cases:
            for case in cases:
                path = _image_file(Path(folder), case)
                if case in sources:
                    raise UnlabeledDataError(f"unlabeled case id {case!r} occurs twice ({sources[case]} and {path});"
                                             " rename one of them.")
                sources[case] = path
        return cls(sources)

    def __len__(self) -> int:
        return len(self.identifiers)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def load_case(self, identifier: str):
        path = self.sources[identifier]
        if path.suffix == ".b2nd":
            import blosc2

            mmap = {} if os.name == "nt" else {"mmap_mode": "r"}
            data = blosc2.open(urlpath=str(path), mode="r", dparams={"nthreads": 1}, **mmap)
        elif path.suffix == ".npy":
            data = np.load(path, mmap_mode="r")
        else:
            with np.load(path) as archive:  # only the 'data' member is read
                data = archive["data"]
        target = np.zeros((1, *data.shape[1:]), dtype=np.int8)  # calloc'd: untouched pages cost nothing
        return data, target, None, {"class_locations": {}}


def _image_file(folder: Path, case: str) -> Path:
    for suffix in (".b2nd", ".npy", ".npz"):
        path = folder / f"{case}{suffix}"
        if path.is_file():
            return path
    raise UnlabeledDataError(f"no preprocessed image for unlabeled case {case!r} in {folder}; run "
                             "nnUNetv2_plan_and_preprocess (for split cases) or nnUNetv2_tak_preprocess_unlabeled.")


