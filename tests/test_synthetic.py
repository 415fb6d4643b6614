"""Synthetic cohort generator: nnU-Net raw layout, determinism, class imbalance, no overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_tak.synthetic import AMOS_LABELS, CohortSpec, generate_dataset, make_case

SMALL = CohortSpec(shape=(24, 48, 48), spacing=(10.0, 6.0, 6.0))


def test_layout_and_dataset_json(tmp_path):
    folder = generate_dataset(tmp_path, 42, "Synth", num_training=3, num_test=1, num_unlabeled=2, spec=SMALL)
    assert folder.name == "Dataset042_Synth"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {name: i for i, name in enumerate(AMOS_LABELS)}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir())[0] == "case_0000_0000.nii.gz"
    assert len(list((folder / "labelsTr").iterdir())) == 3
    assert len(list((folder / "imagesUnlabeled").iterdir())) == 2
    image = sitk.ReadImage(str(folder / "imagesTr" / "case_0000_0000.nii.gz"))
    label = sitk.ReadImage(str(folder / "labelsTr" / "case_0000.nii.gz"))
    assert image.GetSize() == label.GetSize() == (48, 48, 24)  # SimpleITK order x, y, z
    np.testing.assert_allclose(image.GetSpacing(), (6.0, 6.0, 10.0))
    with pytest.raises(FileExistsError, match="Dataset042_Synth"):
        generate_dataset(tmp_path, 42, "Synth", num_training=1, spec=SMALL)


def test_same_seed_same_case_whatever_the_cohort_size(tmp_path):
    a = generate_dataset(tmp_path / "a", 1, "A", num_training=2, spec=SMALL, seed=3)
    b = generate_dataset(tmp_path / "b", 1, "A", num_training=4, spec=SMALL, seed=3)
    for sub in ("imagesTr/case_0001_0000.nii.gz", "labelsTr/case_0001.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a / sub))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(b / sub))))


def test_class_imbalance_and_overlapping_intensities():
    image, label = make_case(np.random.default_rng(0), CohortSpec(fov_crop_probability=0.0))
    counts = np.bincount(label.ravel(), minlength=16)
    assert (counts[1:] > 0).all(), counts  # every organ present in an uncropped case
    liver, adrenal = AMOS_LABELS.index("liver"), AMOS_LABELS.index("right adrenal gland")
    assert counts[liver] > 50 * counts[adrenal]  # heavy class imbalance
    means = {i: image[label == i].mean() for i in (liver, AMOS_LABELS.index("spleen"))}
    assert abs(means[liver] - list(means.values())[1]) < 40  # intensity alone cannot separate them
