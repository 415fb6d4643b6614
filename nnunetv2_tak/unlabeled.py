"""The unlabeled-data stream: discovery and checks of ``imagesUnlabeled/``, preprocessing with the
dataset's own plans into a separate folder (with a manifest that detects stale data), and an
image-only dataset that never opens a label file.

Layout: ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/`` holds ``<case>.b2nd`` (the
preprocessed image, as nnU-Net stores it), ``<case>.pkl`` (properties) and the manifests that record which
case was made from which source file with which plans: ``tak_unlabeled.json`` (runs without shards) and
``tak_unlabeled.shard-I-of-N.json`` (one part per shard of a sharded run; readers merge them), plus
``tak_unlabeled.shard-I-of-N.lock`` while shard I runs. Every file is written to a temporary name and moved
into place, with nnU-Net's file mode (0o666 & ~umask).
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import json
import logging
import math
import os
import re
import socket
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nnunetv2_tak.fileio import atomic_write_text

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
    atomic_write_text(path, json.dumps(content, indent=1))


# --- checks of the raw files --------------------------------------------------------------------
def _nifti_header(raw: bytes) -> tuple[list[int], int, float, bool]:
    """(sizes of dims 1..dim[0], bitpix, vox_offset, data in this file) of a NIfTI-1/2 header; ValueError if
    ``raw`` does not start with one."""
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0] if len(raw) >= 4 else 0
        if size == 348 and len(raw) >= 348:
            dim = struct.unpack(endian + "8h", raw[40:56])
            bitpix = struct.unpack(endian + "h", raw[72:74])[0]
            vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
            single_file = raw[344:348] == b"n+1\x00"
            break
        if size == 540 and len(raw) >= 540:
            bitpix = struct.unpack(endian + "h", raw[14:16])[0]
            dim = struct.unpack(endian + "8q", raw[16:80])
            vox_offset = float(struct.unpack(endian + "q", raw[168:176])[0])
            single_file = raw[4:8] == b"n+2\x00"
            break
    else:
        raise ValueError(f"no NIfTI-1/2 header (the file starts with {len(raw)} bytes and no valid sizeof_hdr)")
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1:dim[0] + 1]) or bitpix <= 0:
        raise ValueError(f"invalid NIfTI header: dim {list(dim)}, bitpix {bitpix}")
    return list(dim[1:dim[0] + 1]), bitpix, vox_offset, single_file


def check_image_file(path: str | os.PathLike, dataset_json: Mapping) -> None:
    """Checks a NIfTI file (``.nii.gz``/``.nii``; other formats pass) before it is preprocessed: one 3D image (no
    channels or time points stacked in a 4th dimension), a gzip stream that ends properly, and at least the
    bytes its header announces (vox_offset + prod(dim) * bitpix / 8). SimpleITK reads a cut file without error
    and fills the rest with zeros. Raises UnlabeledDataError naming the file."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii.gz", ".nii")):
        return
    channels = dataset_json["channel_names"]
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            head = f.read(540)
            try:
                sizes, bitpix, vox_offset, single_file = _nifti_header(head)
            except ValueError as exc:
                raise UnlabeledDataError(f"unlabeled image {path} is not a readable NIfTI image: {exc}. "
                                         "Re-export it, or remove the case.") from None
            extra = math.prod(sizes[3:])
            if extra > 1:
                case = path.name[:-len(dataset_json["file_ending"]) - 5]
                ending = dataset_json["file_ending"]
                raise UnlabeledDataError(
                    f"unlabeled image {path} has {len(sizes)} dimensions ({' x '.join(map(str, sizes))}): {extra} "
                    f"channels or time points in one file. nnU-Net expects one 3D file per channel ({case}_0000"
                    f"{ending}, {case}_0001{ending}, ...) and this dataset has {len(channels)} channel(s) "
                    f"{dict(channels)}. Split the file into one file per channel (and list every channel in "
                    "dataset.json's channel_names), or remove the case.")
            total = len(head)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise UnlabeledDataError(
            f"unlabeled image {path} is truncated or corrupt ({type(exc).__name__}: {exc}): the compressed stream "
            "does not end properly (an interrupted copy or download?). Copy it again, or remove the case.") from None
    expected = int(vox_offset) + math.prod(sizes) * bitpix // 8 if single_file else 0
    if total < expected:
        raise UnlabeledDataError(
            f"unlabeled image {path} is truncated: its header announces {' x '.join(map(str, sizes))} voxels of "
            f"{bitpix} bits after a {int(vox_offset)}-byte header ({expected} bytes), the file holds {total}"
            f"{' once decompressed' if name.endswith('.gz') else ''}. Copy it again, or remove the case.")


# --- shards and their locks ---------------------------------------------------------------------
PART_PATTERN = re.compile(r"^tak_unlabeled\.shard-(?P<shard>\d+)-of-(?P<num>\d+)\.(?P<kind>json|lock)$")


def shard_of(case: str, num_shards: int) -> int:
    """The shard of a case id: a stable hash, the same on every machine and whatever other files exist."""
    return int.from_bytes(hashlib.sha256(case.encode()).digest()[:8], "big") % num_shards


def shard_cases(cases: Iterable[str], shard: int, num_shards: int) -> list[str]:
    """The sorted case ids of shard ``shard`` of ``num_shards`` (disjoint shards; their union is ``cases``)."""
    return sorted(case for case in cases if shard_of(case, num_shards) == shard)


def _part_file(folder: Path, shard: int, num_shards: int, kind: str = "json") -> Path:
    return folder / f"tak_unlabeled.shard-{shard}-of-{num_shards}.{kind}"


def _shard_files(folder: Path, kind: str) -> dict[tuple[int, int], Path]:
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = PART_PATTERN.match(path.name)
            if match and match["kind"] == kind:
                found[int(match["shard"]), int(match["num"])] = path
    return found


def check_shard_arguments(shard: int | None, num_shards: int | None) -> None:
    if shard is None or num_shards is None:
        raise UnlabeledDataError(f"--shard and --num-shards go together (got shard {shard}, num_shards {num_shards})")
    if num_shards < 1:
        raise UnlabeledDataError(f"--num-shards {num_shards}: the number of shards must be at least 1")
    if not 0 <= shard < num_shards:
        raise UnlabeledDataError(f"--shard {shard} is outside [0, {num_shards}): shards of --num-shards {num_shards} "
                                 f"are numbered 0 to {num_shards - 1} (a SLURM array: --array=0-{num_shards - 1})")


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a killed process not yet reaped by its parent
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _slurm_identity() -> dict:
    """The batch job this process belongs to: SLURM keeps SLURM_JOB_ID when it requeues a job and counts the
    restarts, so a lock of the same job with another restart count was left by a preempted earlier run."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")} if job else {}


def _dead_here(holder: dict | None) -> bool:
    """The lock's holder no longer runs: a dead pid on this host, or an earlier run of this SLURM job."""
    if holder is None:
        return False
    if holder.get("host") == _host() and not _pid_alive(holder["pid"]):
        return True
    mine = _slurm_identity()
    return bool(mine) and holder.get("slurm_job") == mine["slurm_job"] \
        and holder.get("slurm_restart") != mine["slurm_restart"]


def _describe_lock(holder: dict | None) -> str:
    if holder is None:
        return "a process that is starting or whose lock file cannot be read"
    return f"process {holder['pid']} on {holder.get('host')} since {holder.get('started')}"


def _acquire_shard_lock(folder: Path, shard: int, num_shards: int, log: Callable[[str], None]) -> Path:
    """An O_EXCL lock file per shard, holding pid, host, start time and SLURM job. A lock left by a killed
    process on this machine, or by an earlier (preempted, requeued) run of the same SLURM job on any machine,
    is taken over; any other held lock is an error that names the shard and how to clear it."""
    path = _part_file(folder, shard, num_shards, "lock")
    me = {"pid": os.getpid(), "host": _host(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **_slurm_identity()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_lock(path)
            if not _dead_here(holder):
                raise UnlabeledDataError(
                    f"shard {shard} of {num_shards} of {folder} is already being preprocessed by "
                    f"{_describe_lock(holder)} (lock file {path}). Two runs of one shard would do the same work: "
                    f"wait for it to finish. If that process is not running any more (e.g. a killed job on another "
                    f"machine), delete {path} and run again; the cases it finished are kept.") from None
            _break_stale_lock(path, holder)
            log(f"TAK: shard {shard} of {num_shards}: took over the lock of {_describe_lock(holder)}, which no longer "
                "runs (killed?); resuming where it stopped")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise UnlabeledDataError(f"shard {shard} of {num_shards}: could not take the lock {path} (other runs of this "
                             "shard keep starting); run one job per shard")


def _break_stale_lock(path: Path, holder: dict) -> None:
    """Moves a dead process's lock away; if another run replaced it meanwhile, puts that one back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:  # not the lock judged dead: restore it (unless a third run took the name)
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.remove(aside)


def _release_shard_lock(path: Path) -> None:
    holder = _read_lock(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == _host():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# --- manifests ----------------------------------------------------------------------------------
def _read_manifests(folder: Path, attempts: int = 5) -> dict[Path, dict]:
    """Every manifest of the folder: ``tak_unlabeled.json`` (runs without --shard) and one part per shard.
    A part that vanishes while it is read has just been folded into ``tak_unlabeled.json`` by another run:
    everything is read again."""
    for _ in range(attempts - 1):
        manifests = _read_manifests_once(folder)
        if manifests is not None:
            return manifests
    manifests = _read_manifests_once(folder)
    if manifests is None:
        raise UnlabeledDataError(f"the manifests in {folder} kept changing while they were read ({attempts} "
                                 "attempts); wait for the other preprocessing runs to finish and run again")
    return manifests


def _read_manifests_once(folder: Path) -> dict[Path, dict] | None:
    """The manifests, or None when a shard part disappeared between listing and reading."""
    paths = [folder / MANIFEST] if (folder / MANIFEST).is_file() else []
    paths += [path for _, path in sorted(_shard_files(folder, "json").items())]
    manifests = {}
    for path in paths:
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            if path.name == MANIFEST:
                raise
            return None
        except (OSError, ValueError) as exc:
            raise UnlabeledDataError(f"{path} cannot be read ({exc}); delete it and run nnUNetv2_tak_preprocess_"
                                     "unlabeled again (only cases without a record are redone)") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise UnlabeledDataError(f"{path} is not an nnunetv2_tak unlabeled manifest ({MANIFEST_FORMAT}); "
                                     f"move the folder {folder} away.")
        manifests[path] = manifest
    return manifests


def _what(manifest: dict) -> str:
    if "shard" in manifest:
        return f"shard {manifest['shard']} of {manifest['num_shards']}"
    return "the run without --shard"


# --- preprocessing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    case: str
    files: list[str]
    output_truncated: str
    plans: dict
    configuration: str
    dataset_json: dict


def _temporary(output_truncated: str, suffix: str) -> str:
    """Per process and machine: shards, folds and nodes may preprocess into one folder at once."""
    return f"{output_truncated}.tmp-{_host()}-{os.getpid()}{suffix}"


TEMPORARY_PATTERN = re.compile(r"^(?P<case>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)\.(b2nd|pkl)$")


def _remove_dead_temporaries(folder: Path, cases: Iterable[str]) -> None:
    """Half-written temporaries of these cases left by killed processes of this machine."""
    cases = set(cases)
    for path in folder.iterdir():
        match = TEMPORARY_PATTERN.match(path.name)
        if (match and match["case"] in cases and match["host"] == _host() and int(match["pid"]) != os.getpid()
                and not _pid_alive(int(match["pid"]))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _preprocess_case(job: _Job) -> str:
    """Worker: checks the files, then nnU-Net's own preprocessor on an image without segmentation, saved like
    nnU-Net saves data (temporary files moved into place: a killed worker never leaves half a case)."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import write_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for file in job.files:
        check_image_file(file, job.dataset_json)
    plans_manager = PlansManager(job.plans)
    configuration_manager = plans_manager.get_configuration(job.configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    expected_channels = len(job.dataset_json["channel_names"])
    try:
        data, _, properties = preprocessor.run_case(job.files, None, plans_manager, configuration_manager,
                                                    job.dataset_json)
    except Exception as exc:  # unreadable or corrupt file: name it
        raise UnlabeledDataError(f"could not read/preprocess unlabeled case {job.case!r} ({', '.join(job.files)}): "
                                 f"{_channel_problem(job, plans_manager) or f'{type(exc).__name__}: {exc}'}. "
                                 "Fix or remove these files.") from exc
    if data.shape[0] != expected_channels:
        raise UnlabeledDataError(
            f"unlabeled case {job.case!r} ({', '.join(job.files)}) has {data.shape[0]} channels after reading, the "
            f"dataset has {expected_channels} ({job.dataset_json['channel_names']}). Store one channel per file.")
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    tmp, tmp_pkl = _temporary(job.output_truncated, ".b2nd"), _temporary(job.output_truncated, ".pkl")
    if os.path.exists(tmp):
        os.remove(tmp)
    blosc2.set_nthreads(1)
    blosc2.asarray(data, urlpath=tmp, chunks=chunks, blocks=blocks,
                   cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
    write_pickle(properties, tmp_pkl)
    os.replace(tmp_pkl, job.output_truncated + ".pkl")
    os.replace(tmp, job.output_truncated + ".b2nd")
    return job.case


def _channel_problem(job: _Job, plans_manager) -> str | None:
    """After a failed preprocessing: 'the files hold N channels' when that is the cause (nnU-Net's
    normalisation then fails with IndexError), else None."""
    try:
        data, _ = plans_manager.image_reader_writer_class().read_images(job.files)
    except Exception:
        return None
    expected = len(job.dataset_json["channel_names"])
    if data.shape[0] == expected:
        return None
    return (f"the file(s) hold {data.shape[0]} channels (array shape {list(data.shape)}), the dataset has {expected} "
            f"{dict(job.dataset_json['channel_names'])}; nnU-Net expects one 3D file per channel "
            f"({job.case}_0000, {job.case}_0001, ...)")


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
                         log: Callable[[str], None] | None = None, shard: int | None = None,
                         num_shards: int | None = None) -> tuple[Path, list[str]]:
    """Preprocess ``imagesUnlabeled/`` with the dataset's plans; only new or changed cases are processed.

    Returns (folder, case ids): every case, or with ``shard``/``num_shards`` the cases of that shard
    (``shard_cases``), which may run concurrently with the other shards on other machines. Each run records
    every finished case at once in its own manifest (``tak_unlabeled.json`` without shards,
    ``tak_unlabeled.shard-I-of-N.json`` per shard; readers merge them), so a killed run resumes where it
    stopped. A run without shards also finishes what shards left and folds their parts into
    ``tak_unlabeled.json``. Bad files (truncated, several channels in one file, unreadable) are named in one
    error at the end; every other case is done and kept. Preprocessing made with other plans is stale: an
    error, unless ``replace_stale`` (not with shards), which moves the stale folder aside
    (``<folder>.stale-<hash>``) and starts afresh; nothing is deleted or overwritten in place.
    """
    log = log or logger.info
    sharded = shard is not None or num_shards is not None
    if sharded:
        check_shard_arguments(shard, num_shards)
    cases = find_unlabeled_images(raw_dataset_folder, dataset_json)
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration, dataset_json)
    manifests = _read_manifests(folder)
    stale = [(path, m) for path, m in manifests.items() if m["plans_fingerprint"] != fingerprint]
    if stale:
        path, old = stale[0]
        how = (f"nnUNetv2_tak_preprocess_unlabeled -d {Path(preprocessed_dataset_folder_base).name} -c "
               f"{configuration} --replace-stale")
        if sharded:
            raise UnlabeledDataError(
                f"shard {shard} of {num_shards}: the unlabeled preprocessing in {folder} was made with other plans "
                f"({path.name}: configuration {old.get('configuration')!r}, plans fingerprint "
                f"{old['plans_fingerprint'][:12]}, now {fingerprint[:12]}). Shards run concurrently and never move "
                f"it: move it aside once before starting them (mv {folder} {folder}.old), or run `{how}` without "
                "--shard (the old folder is moved aside, not deleted).")
        if not replace_stale:
            raise UnlabeledDataError(
                f"the unlabeled preprocessing in {folder} was made with other plans (configuration "
                f"{old.get('configuration')!r}, plans fingerprint {old['plans_fingerprint'][:12]}, now "
                f"{fingerprint[:12]}): the plans changed since. Re-run `{how}` (the old folder is moved aside, not "
                "deleted).")
        moved = _move_aside(folder, old["plans_fingerprint"])
        log(f"TAK: stale unlabeled preprocessing moved to {moved}")
        manifests = {}
    folder.mkdir(parents=True, exist_ok=True)
    if not sharded:
        return folder, _preprocess_cases(folder, fingerprint, cases, sorted(cases), folder / MANIFEST, {}, manifests,
                                         plans, configuration, dataset_json, num_processes, progress, log)
    lock = _acquire_shard_lock(folder, shard, num_shards, log)
    try:
        _refuse_other_shard_counts(folder, shard, num_shards, preprocessed_dataset_folder_base, configuration)
        assigned = shard_cases(cases, shard, num_shards)
        log(f"TAK: shard {shard} of {num_shards}: {len(assigned)} of {len(cases)} unlabeled case(s)")
        _preprocess_cases(folder, fingerprint, cases, assigned, _part_file(folder, shard, num_shards),
                          {"shard": shard, "num_shards": num_shards}, _read_manifests(folder), plans,
                          configuration, dataset_json, num_processes, progress, log)
        return folder, assigned
    finally:
        _release_shard_lock(lock)


def _refuse_other_shard_counts(folder: Path, shard: int, num_shards: int, base: str | os.PathLike,
                               configuration: str) -> None:
    others = sorted({path.name for (_, n), path in [*_shard_files(folder, "json").items(),
                                                     *_shard_files(folder, "lock").items()] if n != num_shards})
    if others:
        raise UnlabeledDataError(
            f"shard {shard} of {num_shards}: {folder} holds shards of another --num-shards ({', '.join(others[:4])}"
            f"{' ...' if len(others) > 4 else ''}); a case belongs to another shard when N changes. Keep the "
            f"--num-shards of the first runs (a killed shard resumes with the same arguments), or, once no shard "
            f"runs, run `nnUNetv2_tak_preprocess_unlabeled -d {Path(base).name} -c {configuration}` without --shard: "
            "it does what is missing and folds the parts into tak_unlabeled.json; then any --num-shards works. "
            "Nothing preprocessed is lost either way.")


def _preprocess_cases(folder: Path, fingerprint: str, cases: Mapping[str, list[Path]], assigned: list[str],
                      own_path: Path, own_fields: dict, manifests: Mapping[Path, dict], plans: Mapping,
                      configuration: str, dataset_json: Mapping, num_processes: int, progress: bool,
                      log: Callable[[str], None]) -> list[str]:
    """Preprocesses the ``assigned`` cases not yet done (per any manifest), recording each in ``own_path``."""
    own = dict(manifests.get(own_path) or {})
    own.update({"format": MANIFEST_FORMAT, "plans_fingerprint": fingerprint, "configuration": configuration,
                "data_identifier": folder.name[:-len("_unlabeled")], "dataset_name": plans.get("dataset_name"),
                "plans_name": plans.get("plans_name"), **own_fields, "assigned": assigned,
                "num_cases": len(cases)})
    for gone in sorted(set(own.get("cases", {})) - set(cases)):
        log(f"TAK: unlabeled case {gone!r} is no longer in {UNLABELED_DIR}/; not used (its files are kept)")
    recorded: dict[str, list] = {}
    for manifest in manifests.values():
        for case, entry in manifest.get("cases", {}).items():
            recorded.setdefault(case, []).append(entry.get("source"))
    stamps = {case: _source_stamp(cases[case]) for case in assigned}
    done = own["cases"] = {case: {"source": stamps[case]} for case in assigned
                           if stamps[case] in recorded.get(case, []) and (folder / f"{case}.b2nd").is_file()}
    todo = [case for case in assigned if case not in done]
    _write_manifest(own_path, own)
    failures: list[str] = []
    if todo:
        log(f"TAK: preprocessing {len(todo)} unlabeled case(s) of {len(cases)} into {folder}")
        _remove_dead_temporaries(folder, todo)
        jobs = [_Job(case, [str(f) for f in cases[case]], str(folder / case), dict(plans), configuration,
                     dict(dataset_json)) for case in todo]
        for case, error in _run_jobs(jobs, num_processes, progress):
            if error is not None:
                failures.append(error)
                continue
            done[case] = {"source": stamps[case]}
            _write_manifest(own_path, own)
        _write_manifest(own_path, own)
    if failures:
        shown = "\n  ".join(failures[:10])
        raise UnlabeledDataError(
            f"{len(failures)} unlabeled case(s) could not be preprocessed ({len(done)} of {len(assigned)} are done "
            f"and kept in {folder}):\n  {shown}{chr(10) + '  ...' if len(failures) > 10 else ''}\nFix or remove "
            "these files and run again: only the cases not yet done are processed.")
    if "shard" not in own_fields:
        _fold_in_shard_parts(folder, log)
    return assigned


def _write_manifest(path: Path, manifest: dict) -> None:
    manifest["complete"] = all(case in manifest["cases"] for case in manifest["assigned"])
    _write_json_atomic(path, manifest)


def _fold_in_shard_parts(folder: Path, log: Callable[[str], None]) -> None:
    """After a complete run without --shard (tak_unlabeled.json records every case): drop the shard parts, except
    those of shards still holding their lock."""
    locks = _shard_files(folder, "lock")
    for key, path in _shard_files(folder, "json").items():
        if key in locks:
            log(f"TAK: shard {key[0]} of {key[1]} holds its lock ({locks[key].name}: "
                f"{_describe_lock(_read_lock(locks[key]))}); its manifest part is kept")
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _folder_and_fingerprint(preprocessed_dataset_folder_base: str | os.PathLike, plans: Mapping, configuration: str,
                            dataset_json: Mapping) -> tuple[Path, str]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(dict(plans)).get_configuration(configuration).configuration  # follows inherits_from
    return (unlabeled_folder(preprocessed_dataset_folder_base, resolved["data_identifier"]),
            plans_fingerprint(plans, resolved, dataset_json))


def preprocessed_unlabeled_cases(preprocessed_dataset_folder_base: str | os.PathLike, plans: Mapping,
                                 configuration: str, dataset_json: Mapping) -> tuple[Path, list[str]] | None:
    """(folder, case ids) of an up-to-date unlabeled preprocessing when the raw images are not at hand: the
    union of every manifest (runs without --shard and each shard's part). None when there is none; an error
    when it is stale, or incomplete (a shard that never ran or did not finish)."""
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration,
                                                  dataset_json)
    manifests = _read_manifests(folder)
    if not manifests:
        return None
    for path, manifest in manifests.items():
        if manifest["plans_fingerprint"] != fingerprint:
            raise UnlabeledDataError(f"the unlabeled preprocessing in {folder} ({path.name}) was made with other plans "
                                     f"and the raw images ({UNLABELED_DIR}/) are not available to redo it; set "
                                     "nnUNet_raw.")
    recorded = {case for manifest in manifests.values() for case in manifest.get("cases", {})}
    problems = []
    for path, manifest in manifests.items():
        missing = [case for case in manifest.get("assigned", []) if case not in recorded]
        if missing:
            problems.append(f"{_what(manifest)} ({path.name}) did not finish: {len(missing)} of "
                            f"{len(manifest['assigned'])} case(s) missing, e.g. {missing[:3]}")
    main = manifests.get(folder / MANIFEST)
    if main is None or not set(main.get("assigned", main.get("cases", {}))) <= recorded:
        for num_shards in sorted({m["num_shards"] for m in manifests.values() if "num_shards" in m}):
            have = {m["shard"] for m in manifests.values() if m.get("num_shards") == num_shards}
            problems += [f"shard {i} of {num_shards} has not run (no {_part_file(folder, i, num_shards).name})"
                         for i in range(num_shards) if i not in have]
    if problems:
        raise UnlabeledDataError(
            f"the unlabeled preprocessing in {folder} is incomplete:\n  " + "\n  ".join(problems) + "\nRun these "
            f"shards (again) where nnUNet_raw/{plans.get('dataset_name')}/{UNLABELED_DIR} is available: "
            f"nnUNetv2_tak_preprocess_unlabeled -d {plans.get('dataset_name')} -c {configuration} --shard I "
            "--num-shards N (a run without --shard does every missing case).")
    return folder, sorted(recorded)


def _run_jobs(jobs: list[_Job], num_processes: int, progress: bool) -> Iterable[tuple[str, str | None]]:
    """(case, None) for each finished case, (case, message) for a case that failed with UnlabeledDataError;
    any other exception propagates."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="TAK unlabeled preprocessing", disable=not progress)
    try:
        if num_processes <= 1 or len(jobs) == 1:
            for job in jobs:
                try:
                    yield _preprocess_case(job), None
                except UnlabeledDataError as exc:
                    yield job.case, str(exc)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_preprocess_case, job): job.case for job in jobs}
            for future in as_completed(futures):
                try:
                    yield future.result(), None
                except UnlabeledDataError as exc:
                    yield futures[future], str(exc)
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
    "check_image_file",
    "check_shard_arguments",
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
