"""Where unlabeled images come from and what they must be: discovery of ``imagesUnlabeled/``, the plans
fingerprint that says whether preprocessed data is stale, and a byte-level check of each raw image file."""


from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nnunetv2_tak.fileio import atomic_write_text

logger = logging.getLogger(__name__)

UNLABELED_DIR = "imagesUnlabeled"
MANIFEST = "tak_unlabeled.json"
# /2: every case entry records its files ({"files": {name: {"size", "sha256"}}}); /1 entries (no records) are still
# read: checked by what needs no record, and recorded on the next preprocessing run
MANIFEST_FORMAT = "nnunetv2_tak.unlabeled/2"
READABLE_MANIFEST_FORMATS = ("nnunetv2_tak.unlabeled/1", MANIFEST_FORMAT)
SPLIT_KEY = "unlabeled"  # extra key of a splits_final.json entry (nnU-Net ignores it)


class UnlabeledDataError(ValueError):
    """Unusable unlabeled data; the message names the file or setting and how to fix it."""


def find_unlabeled_images(raw_dataset_folder: str | os.PathLike, dataset_json: Mapping) -> dict[str, list[Path]]:
    """``imagesUnlabeled/`` -> {case id: [channel files in channel order]}; empty when the folder is absent.

    Every file must be named ``<case>_<XXXX><file_ending>`` and every case must have exactly the
    dataset's channels; anything else is an error naming the file.
    """
    folder = Path(raw_dataset_folder) / UNLABELED_DIR
    if not folder.is_dir():
        return {}
    ending = dataset_json["file_ending"]
    num_channels = len(dataset_json["channel_names"])
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        match = pattern.match(path.name)
        if match is None:
            raise UnlabeledDataError(
                f"unlabeled image {path} is not named <case>_<XXXX>{ending} (the dataset's file_ending is "
                f"{ending!r} and files carry a 4-digit channel index, as in imagesTr). Rename or remove it.")
        cases.setdefault(match["case"], {})[int(match["channel"])] = path
    expected = list(range(num_channels))
    for case, channels in cases.items():
        if sorted(channels) != expected:
            raise UnlabeledDataError(
                f"unlabeled case {case!r} in {folder} has channel files {sorted(channels)}, but the dataset has "
                f"{num_channels} channel(s) {dataset_json['channel_names']} (files {case}_0000{ending}"
                f"{' ... ' if num_channels > 1 else ''}). Add the missing channels or remove the case.")
    return {case: [channels[c] for c in expected] for case, channels in cases.items()}


def unlabeled_folder(preprocessed_dataset_folder_base: str | os.PathLike, data_identifier: str) -> Path:
    return Path(preprocessed_dataset_folder_base) / f"{data_identifier}_unlabeled"


# the configuration entries that determine a preprocessed image (not the network, batch or patch size)
PREPROCESSING_KEYS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes",
                      "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs")


def plans_fingerprint(plans: Mapping, configuration: Mapping, dataset_json: Mapping) -> str:
    """sha256 of everything that determines a preprocessed image: target spacing, normalisation,
    resampling, preprocessor, intensity statistics, axis order, channels and reader. Network width,
    batch and patch size (e.g. shrunk plans) do not make the preprocessing stale."""
    relevant = {
        "configuration": {k: configuration.get(k) for k in PREPROCESSING_KEYS},
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "transpose_forward": plans.get("transpose_forward"),
        "image_reader_writer": plans.get("image_reader_writer"),
        "channel_names": dataset_json.get("channel_names"),
        "file_ending": dataset_json.get("file_ending"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def source_stamp(files: Iterable[Path]) -> list[list]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def write_json_atomic(path: Path, content: dict) -> None:
    atomic_write_text(path, json.dumps(content, indent=1))


# --- checks of the raw files --------------------------------------------------------------------
class _NiftiHeader(NamedTuple):
    sizes: list[int]  # dims 1..dim[0]
    bitpix: int
    vox_offset: float
    single_file: bool  # the voxels follow the header in this file
    voxel_dtype: np.dtype | None  # for floating-point data types (which can hold NaN); None otherwise


# NIfTI datatype codes of floating-point voxels: FLOAT32, FLOAT64, COMPLEX64, COMPLEX128
_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}


def _nifti_header(raw: bytes) -> _NiftiHeader:
    """The fields of a NIfTI-1/2 header this module checks; ValueError if ``raw`` does not start with one."""
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0] if len(raw) >= 4 else 0
        if size == 348 and len(raw) >= 348:
            dim = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
            vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
            single_file = raw[344:348] == b"n+1\x00"
            break
        if size == 540 and len(raw) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", raw[12:16])
            dim = struct.unpack(endian + "8q", raw[16:80])
            vox_offset = float(struct.unpack(endian + "q", raw[168:176])[0])
            single_file = raw[4:8] == b"n+2\x00"
            break
    else:
        raise ValueError(f"no NIfTI-1/2 header (the file starts with {len(raw)} bytes and no valid sizeof_hdr)")
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1:dim[0] + 1]) or bitpix <= 0:
        raise ValueError(f"invalid NIfTI header: dim {list(dim)}, bitpix {bitpix}")
    voxel_dtype = np.dtype(endian + _FLOAT_TYPES[datatype]) if datatype in _FLOAT_TYPES else None
    return _NiftiHeader(list(dim[1:dim[0] + 1]), bitpix, vox_offset, single_file, voxel_dtype)


class _NonFiniteCounter:
    """Counts NaN and infinite voxels in the byte stream of a NIfTI file, fed piece by piece."""

    def __init__(self, dtype: np.dtype, start: int, count: int):
        self.dtype, self.start, self.remaining = dtype, start, count
        self.position, self.pending = 0, b""
        self.nan = self.infinite = 0

    def feed(self, piece: bytes) -> None:
        begin = self.position
        self.position += len(piece)
        if self.position <= self.start or self.remaining <= 0:
            return
        buffer = self.pending + piece[max(0, self.start - begin):]
        usable = min(len(buffer) // self.dtype.itemsize, self.remaining)
        values = np.frombuffer(buffer, self.dtype, count=usable)
        self.pending = buffer[usable * self.dtype.itemsize:]
        self.remaining -= usable
        finite = np.isfinite(values)
        if not finite.all():
            nan = int(np.count_nonzero(np.isnan(values)))
            self.nan += nan
            self.infinite += usable - int(np.count_nonzero(finite)) - nan


def non_finite_problem(path: str | os.PathLike, nan: int, infinite: int, total: int) -> str | None:
    """'<file>: N of M voxels are not finite (...)' when there are any; None otherwise."""
    bad = nan + infinite
    if not bad:
        return None
    return f"{path}: {'all' if bad == total else f'{bad} of'} {total} voxels are not finite ({nan} NaN, {infinite} " \
           "infinite)"


def non_finite_error(case: str, problems: Iterable[str]) -> UnlabeledDataError:
    return UnlabeledDataError(
        f"unlabeled case {case!r} has non-finite voxels: {'; '.join(problems)}. nnU-Net refuses images with NaN "
        "voxels for training cases (nnUNetv2_plan_and_preprocess --verify_dataset_integrity); replace them with a "
        "value that makes sense for the image (e.g. its background intensity), or remove the case.")


def check_image_file(path: str | os.PathLike, dataset_json: Mapping) -> None:
    """Checks a NIfTI file (``.nii.gz``/``.nii``; other formats pass) before it is preprocessed: one 3D image (no
    channels or time points stacked in a 4th dimension), a gzip stream that ends properly, at least the
    bytes its header announces (vox_offset + prod(dim) * bitpix / 8), and no NaN or infinite voxel. SimpleITK reads
    a cut file without error and fills the rest with zeros, and reads NaN and infinite voxels of a NIfTI file as 0.
    Raises UnlabeledDataError naming the file."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii.gz", ".nii")):
        return
    channels = dataset_json["channel_names"]
    case = path.name[:-len(dataset_json["file_ending"]) - 5]
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            head = f.read(540)
            try:
                header = _nifti_header(head)
            except ValueError as exc:
                raise UnlabeledDataError(f"unlabeled image {path} is not a readable NIfTI image: {exc}. "
                                         "Re-export it, or remove the case.") from None
            sizes = header.sizes
            extra = math.prod(sizes[3:])
            if extra > 1:
                ending = dataset_json["file_ending"]
                raise UnlabeledDataError(
                    f"unlabeled image {path} has {len(sizes)} dimensions ({' x '.join(map(str, sizes))}): {extra} "
                    f"channels or time points in one file. nnU-Net expects one 3D file per channel ({case}_0000"
                    f"{ending}, {case}_0001{ending}, ...) and this dataset has {len(channels)} channel(s) "
                    f"{dict(channels)}. Split the file into one file per channel (and list every channel in "
                    "dataset.json's channel_names), or remove the case.")
            counter = _NonFiniteCounter(header.voxel_dtype, int(header.vox_offset), math.prod(sizes)) \
                if header.voxel_dtype is not None and header.single_file else None
            total = 0
            piece = head
            while piece:
                total += len(piece)
                if counter is not None:
                    counter.feed(piece)
                piece = f.read(1 << 22)
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise UnlabeledDataError(
            f"unlabeled image {path} is truncated or corrupt ({type(exc).__name__}: {exc}): the compressed stream "
            "does not end properly (an interrupted copy or download?). Copy it again, or remove the case.") from None
    expected = int(header.vox_offset) + math.prod(sizes) * header.bitpix // 8 if header.single_file else 0
    if total < expected:
        raise UnlabeledDataError(
            f"unlabeled image {path} is truncated: its header announces {' x '.join(map(str, sizes))} voxels of "
            f"{header.bitpix} bits after a {int(header.vox_offset)}-byte header ({expected} bytes), the file holds "
            f"{total}{' once decompressed' if name.endswith('.gz') else ''}. Copy it again, or remove the case.")
    problem = counter and non_finite_problem(path, counter.nan, counter.infinite, math.prod(sizes))
    if problem:
        raise non_finite_error(case, [problem])
