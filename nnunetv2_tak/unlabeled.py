"""The unlabeled-data stream: discovery and checks of ``imagesUnlabeled/``, preprocessing with the
dataset's own plans into a separate folder (with a manifest that detects stale data), and an
image-only dataset that never opens a label file.

Layout: ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/`` holds ``<case>.b2nd`` (the
preprocessed image, as nnU-Net stores it), ``<case>.pkl`` (properties) and ``tak_unlabeled.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

UNLABELED_DIR = "imagesUnlabeled"
MANIFEST = "tak_unlabeled.json"
MANIFEST_FORMAT = "nnunetv2_tak.unlabeled/1"
SPLIT_KEY = "unlabeled"  # extra key of a splits_final.json entry (nnU-Net ignores it)


class UnlabeledDataError(ValueError):
    """Unusable unlabeled data; the message names the file or setting and how to fix it."""


# --- discovery ----------------------------------------------------------------------------------
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


def _source_stamp(files: Iterable[Path]) -> list[list]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _write_json_atomic(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)


# --- preprocessing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    case: str
    files: list[str]
    output_truncated: str
    plans: dict
    configuration: str
    dataset_json: dict


def _preprocess_case(job: _Job) -> str:
    """Worker: nnU-Net's own preprocessor on an image without segmentation, saved like nnU-Net saves data."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import write_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(job.plans)
    configuration_manager = plans_manager.get_configuration(job.configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    expected_channels = len(job.dataset_json["channel_names"])
    try:
        data, _, properties = preprocessor.run_case(job.files, None, plans_manager, configuration_manager,
                                                    job.dataset_json)
    except Exception as exc:  # unreadable or corrupt file: name it
        raise UnlabeledDataError(f"could not read/preprocess unlabeled case {job.case!r} ({', '.join(job.files)}): "
                                 f"{type(exc).__name__}: {exc}. Fix or remove these files.") from exc
    if data.shape[0] != expected_channels:
        raise UnlabeledDataError(
            f"unlabeled case {job.case!r} ({', '.join(job.files)}) has {data.shape[0]} channels after reading, the "
            f"dataset has {expected_channels} ({job.dataset_json['channel_names']}). Store one channel per file.")
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    tmp = f"{job.output_truncated}.{os.getpid()}.tmp.b2nd"  # per process: parallel folds may preprocess at once
    if os.path.exists(tmp):
        os.remove(tmp)
    blosc2.set_nthreads(1)
    blosc2.asarray(data, urlpath=tmp, chunks=chunks, blocks=blocks,
                   cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
    write_pickle(properties, f"{job.output_truncated}.{os.getpid()}.tmp.pkl")
    os.replace(f"{job.output_truncated}.{os.getpid()}.tmp.pkl", job.output_truncated + ".pkl")
    os.replace(tmp, job.output_truncated + ".b2nd")
    return job.case


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UnlabeledDataError(f"{path} is not an nnunetv2_tak unlabeled manifest ({MANIFEST_FORMAT}); "
                                 f"move the folder {folder} away.")
    return manifest


def _move_aside(folder: Path, old_fingerprint: str) -> Path:
    target = folder.with_name(f"{folder.name}.stale-{old_fingerprint[:8]}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.stale-{old_fingerprint[:8]}-{n}")
        n += 1
    folder.rename(target)
    return target


def preprocess_unlabeled(raw_dataset_folder: str | os.PathLike, preprocessed_dataset_folder_base: str | os.PathLike,
                         plans: Mapping, configuration: str, dataset_json: Mapping, num_processes: int = 1,
                         replace_stale: bool = False, progress: bool = True,
                         log: Callable[[str], None] | None = None) -> tuple[Path, list[str]]:
    """Preprocess ``imagesUnlabeled/`` with the dataset's plans; only new or changed cases are processed.

    Returns (folder, case ids). Preprocessing made with other plans is stale: an error, unless
    ``replace_stale``, which moves the stale folder aside (``<folder>.stale-<hash>``) and starts afresh;
    nothing is deleted or overwritten in place.
    """
    log = log or logger.info
    cases = find_unlabeled_images(raw_dataset_folder, dataset_json)
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration, dataset_json)
    data_identifier = folder.name[:-len("_unlabeled")]
    manifest = _read_manifest(folder)
    if manifest is not None and manifest["plans_fingerprint"] != fingerprint:
        if not replace_stale:
            raise UnlabeledDataError(
                f"the unlabeled preprocessing in {folder} was made with other plans (configuration "
                f"{manifest.get('configuration')!r}, plans fingerprint {manifest['plans_fingerprint'][:12]}, now "
                f"{fingerprint[:12]}): the plans changed since. Re-run `nnUNetv2_tak_preprocess_unlabeled -d "
                f"{Path(preprocessed_dataset_folder_base).name} -c {configuration} --replace-stale` (the old folder "
                "is moved aside, not deleted).")
        moved = _move_aside(folder, manifest["plans_fingerprint"])
        log(f"TAK: stale unlabeled preprocessing moved to {moved}")
        manifest = None
    folder.mkdir(parents=True, exist_ok=True)
    manifest = manifest or {"format": MANIFEST_FORMAT, "plans_fingerprint": fingerprint, "cases": {}}
    manifest.update({"configuration": configuration, "data_identifier": data_identifier,
                     "dataset_name": plans.get("dataset_name"), "plans_name": plans.get("plans_name")})
    done: dict[str, dict] = manifest["cases"]
    for gone in sorted(set(done) - set(cases)):
        log(f"TAK: unlabeled case {gone!r} is no longer in {UNLABELED_DIR}/; not used (its files are kept)")
        done.pop(gone)
    stamps = {case: _source_stamp(files) for case, files in cases.items()}
    todo = [case for case in sorted(cases)
            if done.get(case, {}).get("source") != stamps[case] or not (folder / f"{case}.b2nd").is_file()]
    if todo:
        log(f"TAK: preprocessing {len(todo)} unlabeled case(s) of {len(cases)} into {folder}")
        jobs = [_Job(case, [str(f) for f in cases[case]], str(folder / case), dict(plans), configuration,
                     dict(dataset_json)) for case in todo]
        for case in _run_jobs(jobs, num_processes, progress):
            done[case] = {"source": stamps[case]}
            _write_json_atomic(folder / MANIFEST, manifest)
    _write_json_atomic(folder / MANIFEST, manifest)
    return folder, sorted(cases)


def _folder_and_fingerprint(preprocessed_dataset_folder_base: str | os.PathLike, plans: Mapping, configuration: str,
                            dataset_json: Mapping) -> tuple[Path, str]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(dict(plans)).get_configuration(configuration).configuration  # follows inherits_from
    return (unlabeled_folder(preprocessed_dataset_folder_base, resolved["data_identifier"]),
            plans_fingerprint(plans, resolved, dataset_json))


def preprocessed_unlabeled_cases(preprocessed_dataset_folder_base: str | os.PathLike, plans: Mapping,
                                 configuration: str, dataset_json: Mapping) -> tuple[Path, list[str]] | None:
    """(folder, case ids) of an up-to-date unlabeled preprocessing when the raw images are not at hand;
    None when there is none; an error when it is stale."""
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration,
                                                  dataset_json)
    manifest = _read_manifest(folder)
    if manifest is None:
        return None
    if manifest["plans_fingerprint"] != fingerprint:
        raise UnlabeledDataError(f"the unlabeled preprocessing in {folder} was made with other plans and the raw "
                                 f"images ({UNLABELED_DIR}/) are not available to redo it; set nnUNet_raw.")
    return folder, sorted(manifest["cases"])


def _run_jobs(jobs: list[_Job], num_processes: int, progress: bool) -> Iterable[str]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="TAK unlabeled preprocessing", disable=not progress)
    try:
        if num_processes <= 1 or len(jobs) == 1:
            for job in jobs:
                yield _preprocess_case(job)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn")) as pool:
            for case in pool.map(_preprocess_case, jobs):
                yield case
                bar.update()
    finally:
        bar.close()


# --- splits -------------------------------------------------------------------------------------
def split_unlabeled_cases(splits_file: str | os.PathLike, fold: int | str) -> list[str]:
    """The ``"unlabeled"`` case ids of fold ``fold`` in splits_final.json ([] when absent or fold 'all');
    an error when they overlap the fold's train or val cases."""
    path = Path(splits_file)
    if not path.is_file():
        return []
    splits = json.loads(path.read_text())
    marked = any(SPLIT_KEY in entry for entry in splits)
    if isinstance(fold, int) and fold < len(splits):
        entry = splits[fold]
        unlabeled = list(entry.get(SPLIT_KEY, []))
        leaked = sorted(set(unlabeled) & (set(entry.get("train", [])) | set(entry.get("val", []))))
        if leaked:
            raise UnlabeledDataError(f"{path} fold {fold} lists {leaked[:5]} both as unlabeled and as train/val; "
                                     "fix the split (nnUNetv2_tak_make_splits)")
        return unlabeled
    if marked:  # nnU-Net would train on every case, labels of the 'unlabeled' ones included
        raise UnlabeledDataError(
            f"{path} marks cases as unlabeled, but fold {fold!r} is not one of its {len(splits)} fold(s): nnU-Net "
            "would train on all cases with their labels. Train one of the split's folds, or make more folds with "
            "nnUNetv2_tak_make_splits --folds N.")
    return []


def shard_for_rank(identifiers: list[str], rank: int, world_size: int) -> list[str]:
    """Disjoint shard of the (sorted) unlabeled cases for one DDP rank: no case is streamed by two ranks."""
    ids = sorted(identifiers)
    if world_size > len(ids):
        raise UnlabeledDataError(f"{len(ids)} unlabeled case(s) cannot be split over {world_size} GPUs without "
                                 "duplicates; add unlabeled images or train on fewer GPUs.")
    return ids[rank::world_size]


# --- dataset ------------------------------------------------------------------------------------
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


__all__ = [
    "MANIFEST",
    "SPLIT_KEY",
    "UNLABELED_DIR",
    "ImageOnlyDataset",
    "UnlabeledDataError",
    "find_unlabeled_images",
    "plans_fingerprint",
    "preprocess_unlabeled",
    "preprocessed_unlabeled_cases",
    "shard_for_rank",
    "split_unlabeled_cases",
    "unlabeled_folder",
]
