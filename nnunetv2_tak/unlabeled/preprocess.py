"""Preprocessing of unlabeled images with the dataset's own plans into
``<data_identifier>_unlabeled/``, resumable, shardable, every file written to a temporary name first, every
finished case recorded with the sizes and checksums of its files (and checked against them on every run)."""


from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nnunetv2_tak.fileio import atomic_write
from nnunetv2_tak.unlabeled.files import (
    MANIFEST,
    MANIFEST_FORMAT,
    UNLABELED_DIR,
    UnlabeledDataError,
    check_image_file,
    find_unlabeled_images,
    non_finite_error,
    non_finite_problem,
    plans_fingerprint,
    source_stamp,
    unlabeled_folder,
    write_json_atomic,
)
from nnunetv2_tak.unlabeled.integrity import CHECKSUM, SIZE, file_record, output_names, verify_cases
from nnunetv2_tak.unlabeled.shards import (
    acquire_shard_lock,
    check_shard_arguments,
    describe_lock,
    host,
    part_file,
    pid_alive,
    read_lock,
    read_manifests,
    release_shard_lock,
    shard_cases,
    shard_files,
    what,
)

logger = logging.getLogger(__name__)

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
    return f"{output_truncated}.tmp-{host()}-{os.getpid()}{suffix}"


TEMPORARY_PATTERN = re.compile(r"^(?P<case>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)\.(b2nd|pkl)$")


def _remove_dead_temporaries(folder: Path, cases: Iterable[str]) -> None:
    """Half-written temporaries of these cases left by killed processes of this machine."""
    cases = set(cases)
    for path in folder.iterdir():
        match = TEMPORARY_PATTERN.match(path.name)
        if (match and match["case"] in cases and match["host"] == host() and int(match["pid"]) != os.getpid()
                and not pid_alive(int(match["pid"]))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _preprocess_case(job: _Job) -> dict[str, dict]:
    """Worker: checks the files, then nnU-Net's own preprocessor on an image without segmentation, saved like
    nnU-Net saves data (temporary files moved into place: a killed worker never leaves half a case). Returns the
    manifest's records (size, sha256) of the files written."""
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import write_pickle
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for file in job.files:
        check_image_file(file, job.dataset_json)
    plans_manager = PlansManager(job.plans)
    configuration_manager = plans_manager.get_configuration(job.configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    what = f"unlabeled case {job.case!r} ({', '.join(job.files)})"
    try:
        images, properties = plans_manager.image_reader_writer_class().read_images(job.files)
    except Exception as exc:  # unreadable or corrupt file: name it
        raise UnlabeledDataError(f"could not read {what}: {type(exc).__name__}: {exc}. Fix or remove these files.") \
            from exc
    _check_channels(job, images.shape)
    _check_finite(job, images)
    try:
        if type(preprocessor).run_case is DefaultPreprocessor.run_case:  # what run_case does, on the images read
            data, _, properties = preprocessor.run_case_npy(images, None, properties, plans_manager,
                                                            configuration_manager, job.dataset_json)
        else:  # a preprocessor with its own run_case reads the files itself
            data, _, properties = preprocessor.run_case(job.files, None, plans_manager, configuration_manager,
                                                        job.dataset_json)
    except Exception as exc:
        raise UnlabeledDataError(f"could not preprocess {what}: {type(exc).__name__}: {exc}. Fix or remove these "
                                 "files.") from exc
    data = np.ascontiguousarray(data, dtype=np.float32)
    _check_not_constant(job, data)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    blosc2.set_nthreads(1)
    records: dict[str, dict] = {}

    image_name, properties_name = output_names(job.case)
    folder = Path(job.output_truncated).parent

    def write_properties(tmp: str) -> None:
        write_pickle(properties, tmp)
        records[properties_name] = file_record(tmp)

    def write_image_then_properties(tmp: str) -> None:
        # both files are written before either replaces its previous version, so a write that fails (a full
        # disk) leaves the previous case as it was; the temporary names carry host and pid, so a later run removes
        # those of processes that died, never those of a shard still writing on another machine
        blosc2.asarray(data, urlpath=tmp, chunks=chunks, blocks=blocks,
                       cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1})
        records[image_name] = file_record(tmp)
        atomic_write(folder / properties_name, write_properties, _temporary(job.output_truncated, ".pkl"))

    try:
        atomic_write(folder / image_name, write_image_then_properties, _temporary(job.output_truncated, ".b2nd"))
    except OSError as exc:  # e.g. a full disk: the previous files of the case, if any, are as they were
        raise UnlabeledDataError(f"could not write {what} into {folder} ({type(exc).__name__}: {exc}). Free space "
                                 "(or fix the folder's permissions) and run again.") from exc
    return {name: records[name] for name in output_names(job.case)}


def _check_channels(job: _Job, shape: tuple[int, ...]) -> None:
    expected = len(job.dataset_json["channel_names"])
    if shape[0] != expected:
        raise UnlabeledDataError(
            f"unlabeled case {job.case!r} ({', '.join(job.files)}): the file(s) hold {shape[0]} channels (array shape "
            f"{list(shape)}), the dataset has {expected} {dict(job.dataset_json['channel_names'])}; nnU-Net expects "
            f"one 3D file per channel ({job.case}_0000, {job.case}_0001, ...). Fix or remove these files.")


def _check_finite(job: _Job, images: np.ndarray) -> None:
    """Refuses NaN or infinite voxels as read (readers other than SimpleITK's NIfTI reader keep them; NIfTI files
    are counted by check_image_file), naming each channel file and the count."""
    problems = []
    for file, channel in zip(job.files, images, strict=True):
        finite = np.isfinite(channel)
        if not finite.all():
            nan = int(np.count_nonzero(np.isnan(channel)))
            problems.append(non_finite_problem(file, nan, channel.size - int(np.count_nonzero(finite)) - nan,
                                               channel.size))
    if problems:
        raise non_finite_error(job.case, problems)


def _check_not_constant(job: _Job, data: np.ndarray) -> None:
    for file, channel in zip(job.files, data, strict=True):
        low, high = float(channel.min()), float(channel.max())
        if low == high:
            raise UnlabeledDataError(
                f"unlabeled case {job.case!r}: {file} is constant after preprocessing (every voxel {low:g}): a blank "
                "scan teaches the model nothing and would be trained on as an image. Check the file (an empty "
                "export?), or remove the case.")


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
                         num_shards: int | None = None, verify: str = SIZE) -> tuple[Path, list[str]]:
    """Preprocess ``imagesUnlabeled/`` with the dataset's plans; only new or changed cases are processed.

    Returns (folder, case ids): every case, or with ``shard``/``num_shards`` the cases of that shard
    (``shard_cases``), which may run concurrently with the other shards on other machines. Each run records
    every finished case at once in its own manifest (``tak_unlabeled.json`` without shards,
    ``tak_unlabeled.shard-I-of-N.json`` per shard; readers merge them), so a killed run resumes where it
    stopped. A run without shards also finishes what shards left and folds their parts into
    ``tak_unlabeled.json``. Bad files (truncated, several channels in one file, unreadable) are named in one
    error at the end; so are images with NaN or infinite voxels and images constant after preprocessing; every
    other case is done and kept. Preprocessing made with other plans is stale: an error, unless ``replace_stale``
    (not with shards), which moves the stale folder aside (``<folder>.stale-<hash>``) and starts afresh; nothing is
    deleted or overwritten in place.

    Every case already done is checked against the sizes and checksums its manifest records (``verify``: ``"size"``,
    cheap, for training start-up; ``"checksum"``, every byte read, for the command) and preprocessed again when its
    files are damaged (each named in the log). Cases recorded without sizes and checksums are decompressed
    completely once and then recorded. Everything done is reported through ``log`` (default: this module's logger).
    """
    log = log or logger.info
    sharded = shard is not None or num_shards is not None
    if sharded:
        check_shard_arguments(shard, num_shards)
    cases = find_unlabeled_images(raw_dataset_folder, dataset_json)
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration, dataset_json)
    manifests = read_manifests(folder)
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
                                         plans, configuration, dataset_json, num_processes, progress, log, verify)
    lock = acquire_shard_lock(folder, shard, num_shards, log)
    try:
        _refuse_other_shard_counts(folder, shard, num_shards, preprocessed_dataset_folder_base, configuration)
        assigned = shard_cases(cases, shard, num_shards)
        log(f"TAK: shard {shard} of {num_shards}: {len(assigned)} of {len(cases)} unlabeled case(s)")
        _preprocess_cases(folder, fingerprint, cases, assigned, part_file(folder, shard, num_shards),
                          {"shard": shard, "num_shards": num_shards}, read_manifests(folder), plans,
                          configuration, dataset_json, num_processes, progress, log, verify)
        return folder, assigned
    finally:
        release_shard_lock(lock)


def _refuse_other_shard_counts(folder: Path, shard: int, num_shards: int, base: str | os.PathLike,
                               configuration: str) -> None:
    others = sorted({path.name for (_, n), path in [*shard_files(folder, "json").items(),
                                                     *shard_files(folder, "lock").items()] if n != num_shards})
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
                      log: Callable[[str], None], verify: str) -> list[str]:
    """Preprocesses the ``assigned`` cases not yet done (per any manifest, with intact files), recording each in
    ``own_path``."""
    own = dict(manifests.get(own_path) or {})
    own.update({"format": MANIFEST_FORMAT, "plans_fingerprint": fingerprint, "configuration": configuration,
                "data_identifier": folder.name[:-len("_unlabeled")], "dataset_name": plans.get("dataset_name"),
                "plans_name": plans.get("plans_name"), **own_fields, "assigned": assigned,
                "num_cases": len(cases)})
    for gone in sorted(set(own.get("cases", {})) - set(cases)):
        log(f"TAK: unlabeled case {gone!r} is no longer in {UNLABELED_DIR}/; not used (its files are kept)")
    stamps = {case: source_stamp(cases[case]) for case in assigned}
    recorded = {}  # the entry made from the current source files, from whichever manifest has one
    for manifest in manifests.values():
        for case, entry in manifest.get("cases", {}).items():
            if case in stamps and entry.get("source") == stamps[case] and "files" not in recorded.get(case, {}):
                recorded[case] = entry
    done, damaged = verify_cases(folder, recorded, verify, read_unrecorded=True)
    own["cases"] = done
    for case, problem in sorted(damaged.items()):
        log(f"TAK: unlabeled case {case!r} is damaged ({problem}); preprocessing it again")
    unrecorded = sorted(case for case in done if "files" not in recorded[case])
    if unrecorded:
        log(f"TAK: {len(unrecorded)} unlabeled case(s) had no recorded sizes and checksums (e.g. {unrecorded[:3]}); "
            "read completely and recorded now")
    todo = [case for case in assigned if case not in done]
    _write_manifest(own_path, own)
    failures: list[str] = []
    if todo:
        log(f"TAK: preprocessing {len(todo)} unlabeled case(s) of {len(cases)} into {folder}")
        _remove_dead_temporaries(folder, todo)
        jobs = [_Job(case, [str(f) for f in cases[case]], str(folder / case), dict(plans), configuration,
                     dict(dataset_json)) for case in todo]
        for case, files, error in _run_jobs(jobs, num_processes, progress):
            if error is not None:
                failures.append(error)
                continue
            done[case] = {"source": stamps[case], "files": files}
            _write_manifest(own_path, own)
        _write_manifest(own_path, own)
    if failures:
        shown = "\n  ".join(failures[:10])
        raise UnlabeledDataError(
            f"{len(failures)} unlabeled case(s) could not be preprocessed ({len(done)} of {len(assigned)} are done "
            f"and kept in {folder}):\n  {shown}{chr(10) + '  ...' if len(failures) > 10 else ''}\nFix or remove "
            "these files and run again: only the cases not yet done are processed.")
    log(f"TAK: {len(assigned)} unlabeled case(s) ready in {folder}: {len(assigned) - len(todo)} checked ({verify}s "
        f"as recorded), {len(todo)} preprocessed now")
    if "shard" not in own_fields:
        _fold_in_shard_parts(folder, log)
    return assigned


def _write_manifest(path: Path, manifest: dict) -> None:
    manifest["complete"] = all(case in manifest["cases"] for case in manifest["assigned"])
    try:
        write_json_atomic(path, manifest)
    except OSError as exc:  # e.g. a full disk: the previous manifest is as it was
        raise UnlabeledDataError(f"could not write the manifest {path} ({type(exc).__name__}: {exc}); the previous "
                                 "one is kept. Free space (or fix the folder's permissions) and run again: the cases "
                                 "it records are kept.") from exc


def _fold_in_shard_parts(folder: Path, log: Callable[[str], None]) -> None:
    """After a complete run without --shard (tak_unlabeled.json records every case): drop the shard parts, except
    those of shards still holding their lock."""
    locks = shard_files(folder, "lock")
    for key, path in shard_files(folder, "json").items():
        if key in locks:
            log(f"TAK: shard {key[0]} of {key[1]} holds its lock ({locks[key].name}: "
                f"{describe_lock(read_lock(locks[key]))}); its manifest part is kept")
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
                                 configuration: str, dataset_json: Mapping,
                                 log: Callable[[str], None] | None = None) -> tuple[Path, list[str]] | None:
    """(folder, case ids) of an up-to-date unlabeled preprocessing when the raw images are not at hand: the
    union of every manifest (runs without --shard and each shard's part). None when there is none; an error
    when it is stale, incomplete (a shard that never ran or did not finish), or when files of a case do not have the
    sizes its manifest records or its image does not open (every such case is named)."""
    log = log or logger.info
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration,
                                                  dataset_json)
    manifests = read_manifests(folder)
    if not manifests:
        return None
    _refuse_stale(folder, manifests, fingerprint, f"the raw images ({UNLABELED_DIR}/) are not available to redo it; "
                                                  "set nnUNet_raw.")
    recorded = _recorded_entries(manifests)
    problems = []
    for path, manifest in manifests.items():
        missing = [case for case in manifest.get("assigned", []) if case not in recorded]
        if missing:
            problems.append(f"{what(manifest)} ({path.name}) did not finish: {len(missing)} of "
                            f"{len(manifest['assigned'])} case(s) missing, e.g. {missing[:3]}")
    main = manifests.get(folder / MANIFEST)
    if main is None or not set(main.get("assigned", main.get("cases", {}))) <= set(recorded):
        for num_shards in sorted({m["num_shards"] for m in manifests.values() if "num_shards" in m}):
            have = {m["shard"] for m in manifests.values() if m.get("num_shards") == num_shards}
            problems += [f"shard {i} of {num_shards} has not run (no {part_file(folder, i, num_shards).name})"
                         for i in range(num_shards) if i not in have]
    dataset = plans.get("dataset_name")
    if problems:
        raise UnlabeledDataError(
            f"the unlabeled preprocessing in {folder} is incomplete:\n  " + "\n  ".join(problems) + "\nRun these "
            f"shards (again) where nnUNet_raw/{dataset}/{UNLABELED_DIR} is available: "
            f"nnUNetv2_tak_preprocess_unlabeled -d {dataset} -c {configuration} --shard I "
            "--num-shards N (a run without --shard does every missing case).")
    passed, damaged = verify_cases(folder, recorded, SIZE)
    if damaged:
        raise UnlabeledDataError(
            f"{len(damaged)} preprocessed unlabeled case(s) in {folder} are damaged:\n  "
            + "\n  ".join(f"{case}: {problem}" for case, problem in sorted(damaged.items()))
            + f"\nPreprocess them again where nnUNet_raw/{dataset}/{UNLABELED_DIR} is available: "
            f"nnUNetv2_tak_preprocess_unlabeled -d {dataset} -c {configuration} (it finds and redoes damaged cases; "
            "--check-only only names them), and copy the folder here again.")
    unrecorded = sorted(case for case, entry in passed.items() if not entry.get("files"))
    if unrecorded:
        log(f"TAK: {len(unrecorded)} unlabeled case(s) in {folder} have no recorded sizes and checksums (e.g. "
            f"{unrecorded[:3]}): checked only that their images open. Record them with nnUNetv2_tak_preprocess_"
            f"unlabeled -d {dataset} -c {configuration} where nnUNet_raw is available.")
    return folder, sorted(recorded)


def check_unlabeled(preprocessed_dataset_folder_base: str | os.PathLike, plans: Mapping, configuration: str,
                    dataset_json: Mapping, level: str = CHECKSUM) -> tuple[Path, dict[str, dict], dict[str, str]]:
    """Checks every recorded case of the unlabeled preprocessing against its manifest and changes nothing:
    (folder, {case: entry} of the intact cases, {case: what is wrong} of the damaged ones). Entries without
    recorded sizes and checksums are checked by decompressing them completely (an intact one is returned without
    records). An error when there is no preprocessing or it was made with other plans."""
    folder, fingerprint = _folder_and_fingerprint(preprocessed_dataset_folder_base, plans, configuration,
                                                  dataset_json)
    manifests = read_manifests(folder)
    if not manifests:
        raise UnlabeledDataError(f"there is no unlabeled preprocessing of configuration {configuration!r} in {folder}")
    _refuse_stale(folder, manifests, fingerprint, "rerun nnUNetv2_tak_preprocess_unlabeled with --replace-stale")
    recorded = _recorded_entries(manifests)
    passed, damaged = verify_cases(folder, recorded, level, read_unrecorded=True)
    return folder, {case: recorded[case] for case in passed}, damaged


def _refuse_stale(folder: Path, manifests: Mapping[Path, dict], fingerprint: str, how: str) -> None:
    for path, manifest in manifests.items():
        if manifest["plans_fingerprint"] != fingerprint:
            raise UnlabeledDataError(f"the unlabeled preprocessing in {folder} ({path.name}) was made with other plans;"
                                     f" {how}")


def _recorded_entries(manifests: Mapping[Path, dict]) -> dict[str, dict]:
    """Every recorded case of the manifests, an entry with records of its files preferred."""
    recorded: dict[str, dict] = {}
    for manifest in manifests.values():
        for case, entry in manifest.get("cases", {}).items():
            if "files" not in recorded.get(case, {}):
                recorded[case] = entry
    return recorded


def _run_jobs(jobs: list[_Job], num_processes: int,
              progress: bool) -> Iterable[tuple[str, dict[str, dict] | None, str | None]]:
    """(case, file records, None) for each finished case, (case, None, message) for a case that failed with
    UnlabeledDataError; any other exception propagates."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="TAK unlabeled preprocessing", disable=not progress)
    try:
        if num_processes <= 1 or len(jobs) == 1:
            for job in jobs:
                try:
                    yield job.case, _preprocess_case(job), None
                except UnlabeledDataError as exc:
                    yield job.case, None, str(exc)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_preprocess_case, job): job.case for job in jobs}
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except UnlabeledDataError as exc:
                    yield futures[future], None, str(exc)
                bar.update()
    finally:
        bar.close()
