"""Preprocessed unlabeled cases are verified before they are trusted: the manifest records the size and sha256 of
every file; a case cut short, overwritten with random bytes or corrupted mid-file is named by the command
(``--check-only``), by training's start-up check and by the loader, and preprocessed again by the command. Scans
with NaN voxels or constant after preprocessing are refused by name. A write that fails halfway leaves the previous
manifest and case as they were."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
from test_unlabeled_shards import CONFIG, Shared, make_shared

from nnunetv2_tak.cli.preprocess_unlabeled import main as preprocess_main
from nnunetv2_tak.unlabeled import (
    MANIFEST,
    UNLABELED_DIR,
    ImageOnlyDataset,
    UnlabeledDataError,
    preprocess_unlabeled,
    preprocessed_unlabeled_cases,
)


@pytest.fixture(scope="module")
def pristine(prepared_dataset, tmp_path_factory) -> Shared:
    """Two unlabeled cases (u000, u001) preprocessed once; each test works on a copy."""
    shared = make_shared(prepared_dataset, tmp_path_factory.mktemp("pristine"), 2)
    shared.run()
    return shared


@pytest.fixture
def shared(pristine, tmp_path, monkeypatch) -> Shared:
    """A copy of the pristine folders (times kept: the cases stay done), nnU-Net's variables pointing at it."""
    root = Path(pristine.env["nnUNet_raw"]).parent
    shutil.copytree(root, tmp_path / "copy")
    env = {**pristine.env, **{var: str(tmp_path / "copy" / var) for var in ("nnUNet_raw", "nnUNet_preprocessed")}}
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, env[var])
    rebase = {"raw": Path(env["nnUNet_raw"]) / pristine.raw.name, "base": Path(env["nnUNet_preprocessed"]) /
              pristine.base.name}
    return replace(pristine, env=env, **rebase)


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "cut in half":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    else:  # 2,000 bytes corrupted in the middle: same size, the header intact
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + np.random.default_rng(1).bytes(2000) + raw[middle + 2000:])


def check_only(shared: Shared) -> int:
    return preprocess_main(["-d", shared.raw.name, "-c", CONFIG, "--check-only"])


@pytest.mark.parametrize("how", ["cut in half", "random bytes", "2000 bytes mid-file"])
def test_command_names_a_damaged_case_and_preprocesses_it_again(pristine, shared, how, caplog):
    caplog.set_level(logging.INFO)
    image = shared.folder / "u001.b2nd"
    manifest = json.loads((shared.folder / MANIFEST).read_text())
    assert manifest["format"] == "nnunetv2_tak.unlabeled/2"
    assert manifest["cases"]["u001"]["files"]["u001.b2nd"]["size"] == image.stat().st_size
    damage(image, how)

    assert check_only(shared) == 1
    damaged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("damaged:")]
    assert len(damaged) == 1 and "'u001'" in damaged[0] and str(image) in damaged[0], damaged
    caplog.clear()
    assert preprocess_main(["-d", shared.raw.name, "-c", CONFIG, "-np", "1"]) == 0
    assert any(f"unlabeled case 'u001' is damaged ({image}" in r.getMessage() for r in caplog.records), caplog.text
    assert any("1 preprocessed now" in r.getMessage() for r in caplog.records), caplog.text
    np.testing.assert_array_equal(blosc2.open(str(image), mode="r")[:],
                                  blosc2.open(str(pristine.folder / "u001.b2nd"), mode="r")[:])
    assert check_only(shared) == 0


def test_start_up_check_names_every_damaged_case_and_training_redoes_them(shared):
    damage(shared.folder / "u000.b2nd", "cut in half")
    damage(shared.folder / "u001.b2nd", "random bytes")
    # without the raw images (only nnUNet_preprocessed copied to a cluster): both named, nothing used
    with pytest.raises(UnlabeledDataError, match=r"2 preprocessed unlabeled case\(s\) in .* are damaged") as info:
        preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json)
    message = str(info.value)
    assert f"u000: {shared.folder / 'u000.b2nd'} has " in message and "the manifest records" in message
    assert f"u001: {shared.folder / 'u001.b2nd'} cannot be opened" in message
    assert f"nnUNetv2_tak_preprocess_unlabeled -d {shared.plans['dataset_name']} -c {CONFIG}" in message
    # with them (training's call, size check): both preprocessed again and named in the log
    log: list[str] = []
    shared.run(log=log.append)
    assert all(any(f"unlabeled case '{case}' is damaged" in line for line in log) for case in ("u000", "u001")), log
    assert preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json) == \
        (shared.folder, ["u000", "u001"])


def test_manifest_without_sizes_and_checksums_is_accepted_checked_and_recorded(shared, caplog):
    caplog.set_level(logging.INFO)
    path = shared.folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format"] = "nnunetv2_tak.unlabeled/1"
    for entry in manifest["cases"].values():
        del entry["files"]
    path.write_text(json.dumps(manifest))
    log: list[str] = []
    assert preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json, log=log.append) == \
        (shared.folder, ["u000", "u001"])
    assert any("2 unlabeled case(s)" in line and "no recorded sizes and checksums" in line for line in log), log
    assert check_only(shared) == 0 and "2 case(s) have no recorded sizes and checksums" in caplog.text

    stamps = {p.name: p.stat().st_mtime_ns for p in shared.folder.glob("u00*")}
    damage(shared.folder / "u001.b2nd", "2000 bytes mid-file")  # no checksum to compare: found by reading it
    assert check_only(shared) == 1
    log.clear()
    shared.run(log=log.append)
    assert any("unlabeled case 'u001' is damaged" in line and "cannot be read completely" in line for line in log)
    assert any("1 unlabeled case(s) had no recorded sizes and checksums" in line for line in log), log
    assert (shared.folder / "u000.b2nd").stat().st_mtime_ns == stamps["u000.b2nd"]  # recorded, not redone
    manifest = json.loads(path.read_text())
    assert manifest["format"] == "nnunetv2_tak.unlabeled/2"
    assert all(set(entry["files"]) == {f"{case}.b2nd", f"{case}.pkl"} for case, entry in manifest["cases"].items())


def test_loader_names_the_case_the_file_and_the_fix(shared):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    damage(shared.folder / "u000.b2nd", "2000 bytes mid-file")  # opens; a patch cannot be decompressed
    damage(shared.folder / "u001.b2nd", "cut in half")  # does not open
    plans = PlansManager(shared.plans)
    patch = plans.get_configuration(CONFIG).patch_size
    for case in ("u000", "u001"):
        dataset = ImageOnlyDataset.from_folders([(shared.folder, [case])])
        loader = nnUNetDataLoader(dataset, 1, patch, patch, plans.get_label_manager(shared.dataset_json),
                                  oversample_foreground_percent=0.0)
        with pytest.raises(UnlabeledDataError) as info:
            next(loader)
        message = str(info.value)
        assert f"unlabeled case {case!r}: its preprocessed image {shared.folder / f'{case}.b2nd'} cannot be read" \
            in message
        assert f"nnUNetv2_tak_preprocess_unlabeled -d {shared.base.name} -c <configuration>" in message


def _write_like(reference: Path, path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(reference)))
    sitk.WriteImage(image, str(path))


def test_non_finite_and_constant_scans_are_refused_by_name(shared, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source = shared.raw / UNLABELED_DIR / "u000_0000.nii.gz"
    scan = sitk.GetArrayFromImage(sitk.ReadImage(str(source))).astype(np.float32)
    part = scan.copy()
    part[0, :3, :4] = np.nan
    part[1, 0, 0] = np.inf
    for name, array in (("allnan", np.full_like(scan, np.nan)), ("partnan", part),
                        ("blank", np.full_like(scan, 100.0))):
        _write_like(source, shared.raw / UNLABELED_DIR / f"{name}_0000.nii.gz", array)
    assert preprocess_main(["-d", shared.raw.name, "-c", CONFIG, "-np", "1"]) == 2
    text = caplog.text
    assert "3 unlabeled case(s) could not be preprocessed (2 of 5 are done" in text
    assert f"allnan_0000.nii.gz: all {scan.size} voxels are not finite ({scan.size} NaN, 0 infinite)" in text
    assert f"partnan_0000.nii.gz: 13 of {scan.size} voxels are not finite (12 NaN, 1 infinite)" in text
    assert "blank_0000.nii.gz is constant after preprocessing" in text
    assert sorted(json.loads((shared.folder / MANIFEST).read_text())["cases"]) == ["u000", "u001"]
    assert not [p for p in shared.folder.iterdir() if p.name.startswith(("allnan", "partnan", "blank"))]
    # other formats: SimpleITK keeps NaN (only its NIfTI reader reads them as 0), the array read is checked
    mha = tmp_path / "mha"
    (mha / UNLABELED_DIR).mkdir(parents=True)
    _write_like(source, mha / UNLABELED_DIR / "partnan_0000.mha", part)
    with pytest.raises(UnlabeledDataError, match=rf"partnan_0000\.mha: 13 of {scan.size} voxels are not finite "
                                                 r"\(12 NaN, 1 infinite\)"):
        preprocess_unlabeled(mha, tmp_path / "mha_preprocessed", shared.plans, CONFIG,
                             {**shared.dataset_json, "file_ending": ".mha"}, progress=False)


def _disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_failed_writes_leave_the_previous_manifest_and_case_intact(shared, monkeypatch):
    before = {p.name: p.read_bytes() for p in shared.folder.iterdir()}

    def write_text_halfway(self, text, *args, **kwargs):
        Path.write_bytes(self, text.encode()[:len(text) // 2])
        raise _disk_full(self)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", write_text_halfway)
        with pytest.raises(UnlabeledDataError, match=rf"could not write the manifest {shared.folder / MANIFEST} "
                                                     r"\(OSError: \[Errno 28\] No space left on device"):
            shared.run()
    assert {p.name: p.read_bytes() for p in shared.folder.iterdir()} == before  # no temporary left behind
    assert preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json)[1] == ["u000", "u001"]

    raw = shared.raw / UNLABELED_DIR / "u001_0000.nii.gz"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))  # changed: u001 is redone

    def asarray_halfway(array, urlpath, **kwargs):
        Path(urlpath).write_bytes(b"\0" * 1000)
        raise _disk_full(urlpath)

    with monkeypatch.context() as patch:
        patch.setattr(blosc2, "asarray", asarray_halfway)
        with pytest.raises(UnlabeledDataError, match=r"could not write unlabeled case 'u001' .*No space left"):
            shared.run()
    after = {p.name: p.read_bytes() for p in shared.folder.iterdir()}
    assert sorted(after) == sorted(before)  # no temporary left behind
    assert {name: data for name, data in after.items() if name != MANIFEST} == \
        {name: data for name, data in before.items() if name != MANIFEST}  # the previous case, byte for byte
    assert blosc2.open(str(shared.folder / "u001.b2nd"), mode="r")[:].shape == \
        blosc2.open(str(shared.folder / "u000.b2nd"), mode="r")[:].shape
