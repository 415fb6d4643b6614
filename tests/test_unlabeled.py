"""Unlabeled data on real nnU-Net plans: preprocessing equals nnU-Net's own, bad files are named,
stale preprocessing is detected and never overwritten in place, images load without labels."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_tak.cli.make_splits import main as make_splits_main
from nnunetv2_tak.cli.preprocess_unlabeled import main as preprocess_main
from nnunetv2_tak.plans import shrink_configuration
from nnunetv2_tak.unlabeled import (
    MANIFEST,
    UNLABELED_DIR,
    ImageOnlyDataset,
    UnlabeledDataError,
    check_image_file,
    find_unlabeled_images,
    preprocess_unlabeled,
)


@pytest.fixture
def scratch(prepared_dataset, tmp_path):
    """A private raw folder (dataset.json + imagesUnlabeled made of training images) and preprocessed base."""
    raw = tmp_path / "raw"
    (raw / UNLABELED_DIR).mkdir(parents=True)
    shutil.copy(prepared_dataset.raw / "dataset.json", raw / "dataset.json")
    base = tmp_path / "preprocessed"
    base.mkdir()
    plans = json.loads((prepared_dataset.preprocessed / "nnUNetPlans.json").read_text())
    return raw, base, plans, prepared_dataset


def _copy_training_image(data, raw: Path, case: str, as_case: str) -> None:
    shutil.copy(data.raw / "imagesTr" / f"{case}_0000.nii.gz", raw / UNLABELED_DIR / f"{as_case}_0000.nii.gz")


def test_unlabeled_preprocessing_equals_nnunet_preprocessing_of_the_same_image(scratch):
    raw, base, plans, data = scratch
    case = sorted(p.name[:-len(".b2nd")] for p in (data.preprocessed / "nnUNetPlans_3d_fullres").glob("*.b2nd")
                  if not p.name.endswith("_seg.b2nd"))[0]
    _copy_training_image(data, raw, case, "unl_a")
    folder, cases = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    assert cases == ["unl_a"] and folder == base / "nnUNetPlans_3d_fullres_unlabeled"
    ours = blosc2.open(str(folder / "unl_a.b2nd"), mode="r")[:]
    nnunet = blosc2.open(str(data.preprocessed / "nnUNetPlans_3d_fullres" / f"{case}.b2nd"), mode="r")[:]
    assert ours.shape == nnunet.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, nnunet, rtol=0, atol=1e-6)


def test_second_run_reuses_and_new_images_are_added(scratch):
    raw, base, plans, data = scratch
    _copy_training_image(data, raw, "case_0000", "u1")
    folder, _ = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    stamp = (folder / "u1.b2nd").stat().st_mtime_ns
    _copy_training_image(data, raw, "case_0001", "u2")
    log: list[str] = []
    _, cases = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False,
                                    log=log.append)
    assert cases == ["u1", "u2"]
    assert (folder / "u1.b2nd").stat().st_mtime_ns == stamp  # untouched
    assert any("preprocessing 1 unlabeled case(s) of 2" in line for line in log)


def test_stale_preprocessing_is_detected_and_moved_aside_not_overwritten(scratch):
    raw, base, plans, data = scratch
    _copy_training_image(data, raw, "case_0000", "u1")
    folder, _ = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    old = (folder / "u1.b2nd").read_bytes()
    changed = json.loads(json.dumps(plans))
    changed["configurations"]["3d_fullres"]["spacing"] = [12.0, 8.0, 8.0]
    with pytest.raises(UnlabeledDataError, match=r"made with other plans.*--replace-stale"):
        preprocess_unlabeled(raw, base, changed, "3d_fullres", data.dataset_json(), progress=False)
    assert (folder / "u1.b2nd").read_bytes() == old
    preprocess_unlabeled(raw, base, changed, "3d_fullres", data.dataset_json(), progress=False, replace_stale=True)
    aside = [p for p in base.iterdir() if p.name.startswith("nnUNetPlans_3d_fullres_unlabeled.stale-")]
    assert len(aside) == 1 and (aside[0] / "u1.b2nd").read_bytes() == old
    assert blosc2.open(str(folder / "u1.b2nd"), mode="r").shape != blosc2.open(str(aside[0] / "u1.b2nd")).shape


def test_network_changes_do_not_make_preprocessing_stale(scratch):
    raw, base, plans, data = scratch
    _copy_training_image(data, raw, "case_0000", "u1")
    folder, _ = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    stamp = (folder / "u1.b2nd").stat().st_mtime_ns
    plans["configurations"]["3d_fullres"]["tak_text_prior"] = {"head": {}, "text": {}}  # written by training
    shrink_configuration(plans, "3d_fullres", base_features=2, max_features=8, batch_size=1)  # other network
    preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    assert (folder / "u1.b2nd").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(("name", "message"), [
    ("u1_0000.nrrd", "is not named <case>_<XXXX>.nii.gz"),
    ("u1.nii.gz", "is not named <case>_<XXXX>.nii.gz"),
    ("u1_0001.nii.gz", "has channel files \\[1\\]"),
])
def test_badly_named_or_missing_channel_files_are_named(scratch, name, message):
    raw, _, _, data = scratch
    (raw / UNLABELED_DIR / name).write_bytes(b"x")
    with pytest.raises(UnlabeledDataError, match=message) as info:
        find_unlabeled_images(raw, data.dataset_json())
    assert name.split("_")[0].split(".")[0] in str(info.value)


def test_unreadable_image_is_named_and_earlier_work_is_kept(scratch):
    raw, base, plans, data = scratch
    _copy_training_image(data, raw, "case_0000", "good")
    folder, _ = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    (raw / UNLABELED_DIR / "zbroken_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(UnlabeledDataError, match=r"zbroken_0000\.nii\.gz"):
        preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    assert (folder / "good.b2nd").is_file()
    assert "good" in json.loads((folder / MANIFEST).read_text())["cases"]


@pytest.mark.parametrize("cut", ["half", "200 bytes"])
def test_truncated_nifti_is_named_before_preprocessing_and_other_cases_are_kept(scratch, cut):
    raw, base, plans, data = scratch
    _copy_training_image(data, raw, "case_0000", "good")
    folder, _ = preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    whole = (data.raw / "imagesTr" / "case_0001_0000.nii.gz").read_bytes()
    (raw / UNLABELED_DIR / "cut_0000.nii.gz").write_bytes(whole[:len(whole) // 2] if cut == "half" else whole[:200])
    _copy_training_image(data, raw, "case_0002", "zlater")  # processed after the bad case, and kept
    with pytest.raises(UnlabeledDataError, match=r"1 unlabeled case\(s\) could not be preprocessed \(2 of 3 are done"
                                                 r"(.|\n)*cut_0000\.nii\.gz is truncated or corrupt"):
        preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    assert sorted(json.loads((folder / MANIFEST).read_text())["cases"]) == ["good", "zlater"]
    assert (folder / "zlater.b2nd").is_file() and not (folder / "cut.b2nd").exists()


def _small_image(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(array, isVector=False)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_header_announcing_more_voxels_than_stored_is_named(tmp_path):
    """The stream may end properly and still hold too few bytes (a cut .nii, compressed again or not)."""
    dataset_json = {"channel_names": {"0": "CT"}, "file_ending": ".nii"}
    path = _small_image(tmp_path, "x_0000.nii", np.ones((4, 5, 6), np.int16))
    check_image_file(path, dataset_json)  # complete: passes
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UnlabeledDataError, match=r"x_0000\.nii is truncated: its header announces 6 x 5 x 4 "
                                                 r"voxels of 16 bits after a 352-byte header \(592 bytes\), the "
                                                 r"file holds 582"):
        check_image_file(path, dataset_json)
    gz = tmp_path / "x_0000.nii.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(UnlabeledDataError, match=r"holds 582 once decompressed"):
        check_image_file(gz, {**dataset_json, "file_ending": ".nii.gz"})
    gz.write_bytes(gz.read_bytes()[:60])
    with pytest.raises(UnlabeledDataError, match=r"x_0000\.nii\.gz is truncated or corrupt"):
        check_image_file(gz, {**dataset_json, "file_ending": ".nii.gz"})


def test_channels_stacked_in_one_4d_file_are_explained(scratch):
    raw, base, plans, data = scratch
    one = sitk.GetArrayFromImage(sitk.ReadImage(str(data.raw / "imagesTr" / "case_0000_0000.nii.gz")))
    _small_image(raw / UNLABELED_DIR, "two_0000.nii.gz", np.stack([one, one]))  # [2, z, y, x]: 2 channels
    with pytest.raises(UnlabeledDataError) as info:
        preprocess_unlabeled(raw, base, plans, "3d_fullres", data.dataset_json(), progress=False)
    message = str(info.value)
    assert "two_0000.nii.gz has 4 dimensions" in message and "2 channels or time points in one file" in message
    assert "one 3D file per channel (two_0000.nii.gz, two_0001.nii.gz, ...)" in message
    assert "this dataset has 1 channel(s) {'0': 'CT'}" in message and "IndexError" not in message


def test_image_only_dataset_never_needs_labels_or_properties(prepared_dataset, tmp_path):
    source = prepared_dataset.preprocessed / "nnUNetPlans_3d_fullres"
    shutil.copy(source / "case_0000.b2nd", tmp_path / "case_0000.b2nd")  # no _seg.b2nd, no .pkl
    dataset = ImageOnlyDataset.from_folders([(tmp_path, ["case_0000"])])
    data, target, prev, properties = dataset.load_case("case_0000")
    assert data.shape[1:] == target.shape[1:] and not target.any() and prev is None
    assert properties == {"class_locations": {}}
    with pytest.raises(UnlabeledDataError, match="no preprocessed image for unlabeled case 'missing'"):
        ImageOnlyDataset.from_folders([(tmp_path, ["missing"])])


def test_cli_preprocess_and_make_splits(nnunet_env, tmp_path, monkeypatch):
    # a copy of the dataset so the session's preprocessed folder keeps its own splits
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(Path(nnunet_env.env[var]) / nnunet_env.name, tmp_path / var / nnunet_env.name,
                        ignore=shutil.ignore_patterns("*_unlabeled", "splits_final.json"))  # made by other tests
        monkeypatch.setenv(var, str(tmp_path / var))
    assert preprocess_main(["-d", "501", "-c", "3d_fullres"]) == 0
    folder = tmp_path / "nnUNet_preprocessed" / nnunet_env.name / "nnUNetPlans_3d_fullres_unlabeled"
    assert len(json.loads((folder / MANIFEST).read_text())["cases"]) == 3
    assert make_splits_main(["-d", "501", "--labeled-fraction", "0.4", "--seed", "0"]) == 0
    splits_file = tmp_path / "nnUNet_preprocessed" / nnunet_env.name / "splits_final.json"
    (split,) = json.loads(splits_file.read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 2 and len(split["unlabeled"]) == 3
    assert make_splits_main(["-d", "501", "--labeled-fraction", "0.4"]) == 2  # exists: refuses
    assert make_splits_main(["-d", "501", "--labeled", "case_0000", "--val", "case_0001", "--force"]) == 0
    assert len(list(splits_file.parent.glob("splits_final.json.bak-*"))) == 1
