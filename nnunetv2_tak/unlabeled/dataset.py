"""The image-only dataset the unlabeled stream reads: never opens a label or properties file, names the case and
file of any image it cannot read, and its loader workers end when the process that created it dies."""


from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from nnunetv2_tak.unlabeled.files import UnlabeledDataError
from nnunetv2_tak.unlabeled.integrity import open_b2nd

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ImageOnlyDataset:
    """nnU-Net-dataset-like access to preprocessed images that never opens a segmentation or a
    properties file (a labeled case used as unlabeled must not leak its labels, and nnU-Net's
    properties carry class locations computed from the labels).

    ``load_case(id)`` -> (data [c, *S], zeros [1, *S] int8, None, {"class_locations": {}}); the
    zero target only lets nnU-Net's loader and augmentation run unchanged; it is never used. A file that cannot
    be read raises UnlabeledDataError naming the case, the file and how to redo it, also when the damage shows
    only as nnU-Net's loader crops a patch (blosc2 decompresses on access).

    Loader workers (processes started by the process that created the dataset, e.g. batchgenerators'
    NonDetMultiThreadedAugmenter) end when that process dies, even by ``kill -9``: on Linux the first
    ``load_case`` of a worker asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``; the
    kernel sends it when the thread that started the worker ends, so start the loader from the main thread).
    Elsewhere, and for a parent that died before the worker asked, a worker whose parent is no longer the
    creating process exits at its next ``load_case``; on macOS and Windows a worker waiting on a full queue
    keeps waiting until it is killed.
    """

    def __init__(self, sources: Mapping[str, Path]):
        self.sources = dict(sources)  # case id -> preprocessed image file (.b2nd, .npy or .npz)
        self.identifiers = sorted(self.sources)
        self._creator_pid = os.getpid()
        self._watching_pid: int | None = None  # the worker process that has asked for the death signal

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
        self._end_with_creator()
        identifier = str(identifier)  # nnU-Net's loader draws numpy strings
        path = self.sources[identifier]
        try:
            if path.suffix == ".b2nd":
                data = _NamedImage(open_b2nd(path), identifier, path)
            elif path.suffix == ".npy":
                data = np.load(path, mmap_mode="r")
            else:
                with np.load(path) as archive:  # only the 'data' member is read
                    data = archive["data"]
        except Exception as exc:
            raise UnlabeledDataError(read_error(identifier, path, exc)) from exc
        target = np.zeros((1, *data.shape[1:]), dtype=np.int8)  # calloc'd: untouched pages cost nothing
        return data, target, None, {"class_locations": {}}

    def _end_with_creator(self) -> None:
        """In a loader worker: die with the creating process (see the class docstring)."""
        pid = os.getpid()
        if pid == self._creator_pid:
            return
        if self._watching_pid != pid:
            self._watching_pid = pid
            if sys.platform.startswith("linux"):
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed in unlabeled loader worker {pid}: "
                                         f"{os.strerror(errno)}")
        if os.getppid() != self._creator_pid:
            logger.error("unlabeled loader worker %d: the process that started it (%d) has ended; exiting", pid,
                         self._creator_pid)
            os._exit(1)


class _NamedImage:
    """A preprocessed image whose reads name the case and file when they fail. nnU-Net's crop_and_pad_nd picks
    its path by ``isinstance`` on the array type, so the wrapper reports the wrapped array's class."""

    def __init__(self, array, case: str, path: Path):
        self._array, self._case, self._path = array, case, path

    @property
    def __class__(self):
        return type(self._array)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def ndim(self) -> int:
        return len(self._array.shape)

    @property
    def dtype(self):
        return self._array.dtype

    def __getitem__(self, key):
        try:
            return self._array[key]
        except Exception as exc:  # blosc2: RuntimeError "Error while getting the buffer" for a damaged chunk
            raise UnlabeledDataError(read_error(self._case, self._path, exc)) from exc

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)


def read_error(case: str, path: Path, exc: BaseException) -> str:
    """The message for an unreadable preprocessed image: the case, the file and how to redo it."""
    dataset = path.parent.parent.name
    if path.parent.name.endswith("_unlabeled"):
        fix = (f"Run `nnUNetv2_tak_preprocess_unlabeled -d {dataset} -c <configuration>`: it checks every case "
               "against the sizes and checksums in its manifest and preprocesses the damaged ones again (--check-only "
               "only names them); then continue training with --c.")
    else:
        fix = (f"It is nnU-Net's preprocessed data of a training case: preprocess it again with `nnUNetv2_preprocess "
               f"-d {dataset} -c <configuration>`; then continue training with --c.")
    return (f"unlabeled case {case!r}: its preprocessed image {path} cannot be read ({type(exc).__name__}: {exc}); "
            f"the file is damaged (cut short, overwritten or corrupted on disk). {fix}")


def _image_file(folder: Path, case: str) -> Path:
    for suffix in (".b2nd", ".npy", ".npz"):
        path = folder / f"{case}{suffix}"
        if path.is_file():
            return path
    raise UnlabeledDataError(f"no preprocessed image for unlabeled case {case!r} in {folder}; run "
                             "nnUNetv2_plan_and_preprocess (for split cases) or nnUNetv2_tak_preprocess_unlabeled.")
