"""The benchmark's self-training baseline (examples/benchmark/selftrain.py): its dataset is built with the stock
nnU-Net commands from the benchmark's plans, holds the pseudo-labels of the unlabeled pool cases and never
reads those cases' true labels; then the whole method through the benchmark's command line, once trained
and once reused."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cohort import DATASET_ID
from runs import training_stats
from selftrain import build_raw_dataset, dataset_id, dataset_name, preprocess

BENCHMARK = Path(__file__).resolve().parents[1] / "examples" / "benchmark" / "benchmark.py"


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _pseudo_label(image: Path, out: Path, label: int) -> np.ndarray:
    """A label map on ``image``'s grid: one box of ``label`` (what a model might have predicted)."""
    img = sitk.ReadImage(str(image))
    labels = np.zeros(tuple(reversed(img.GetSize())), np.uint8)
    labels[2:-2, 10:30, 10:30] = label
    out_img = sitk.GetImageFromArray(labels)
    out_img.CopyInformation(img)
    sitk.WriteImage(out_img, str(out))
    return labels


def test_selftrain_dataset_has_the_pseudo_labels_and_never_reads_the_pool_labels(prepared_dataset, tmp_path,
                                                                                monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    source_name = f"Dataset{DATASET_ID:03d}_TAKBenchmark"
    source = tmp_path / "nnUNet_raw" / source_name
    shutil.copytree(prepared_dataset.raw, source)
    (tmp_path / "nnUNet_preprocessed" / source_name).mkdir()
    for name in ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(prepared_dataset.preprocessed / name, tmp_path / "nnUNet_preprocessed" / source_name / name)
    cases = sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    split = {"train": cases[:2], "val": cases[2:3], "unlabeled": cases[3:6]}
    true = {case: _labels(source / "labelsTr" / f"{case}.nii.gz") for case in split["train"] + split["val"]}
    pseudo_dir = tmp_path / "pseudo_labels"
    pseudo_dir.mkdir()
    pseudo = {case: _pseudo_label(source / "imagesTr" / f"{case}_0000.nii.gz", pseudo_dir / f"{case}.nii.gz", k)
              for k, case in enumerate(split["unlabeled"], start=1)}
    # the pool cases' true labels: gone, unreadable, or valid but wrong; none of it may reach the new dataset
    missing, garbage, wrong = split["unlabeled"]
    (source / "labelsTr" / f"{missing}.nii.gz").unlink()
    (source / "labelsTr" / f"{garbage}.nii.gz").write_bytes(b"not an image")
    _pseudo_label(source / "imagesTr" / f"{wrong}_0000.nii.gz", source / "labelsTr" / f"{wrong}.nii.gz", 15)

    target = tmp_path / "nnUNet_raw" / dataset_name(0)
    dataset_json = build_raw_dataset(source, target, split, pseudo_dir)
    preprocess(DATASET_ID, dataset_id(0), dataset_name(0), split, dataset_json, tmp_path)

    assert dataset_json["numTraining"] == 6 and json.loads((target / "dataset.json").read_text()) == dataset_json
    assert sorted(p.name for p in (target / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases[:6]]
    for case, labels in {**true, **pseudo}.items():
        np.testing.assert_array_equal(_labels(target / "labelsTr" / f"{case}.nii.gz"), labels, err_msg=case)
    pre = tmp_path / "nnUNet_preprocessed" / dataset_name(0)
    source_plans = json.loads((prepared_dataset.preprocessed / "nnUNetPlans.json").read_text())
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans == {**source_plans, "dataset_name": dataset_name(0)}  # the benchmark's network and preprocessing
    assert (pre / "dataset_fingerprint.json").read_bytes() == (
        prepared_dataset.preprocessed / "dataset_fingerprint.json").read_bytes()
    assert json.loads((pre / "splits_final.json").read_text()) == [
        {"train": sorted(split["train"] + split["unlabeled"]), "val": split["val"]}]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
    dataset = infer_dataset_class(str(data))(str(data), cases[:6])
    for case in (missing, garbage, wrong):  # nnU-Net trains on the pseudo-labels (same grid: no resampling)
        seg = np.asarray(dataset.load_case(case)[1])[0]
        assert seg.shape == pseudo[case].shape
        np.testing.assert_array_equal(seg, pseudo[case])


def test_selftrain_stops_when_a_pseudo_label_is_missing(prepared_dataset, tmp_path):
    cases = sorted(p.name[:-len(".nii.gz")] for p in (prepared_dataset.raw / "labelsTr").glob("*.nii.gz"))
    split = {"train": cases[:2], "val": cases[2:3], "unlabeled": cases[3:4]}
    with pytest.raises(SystemExit, match=f"no pseudo-label .*{cases[3]}.nii.gz"):
        build_raw_dataset(prepared_dataset.raw, tmp_path / "Dataset511_X", split, tmp_path)


def _benchmark(work: Path, *args: str) -> str:
    """Run examples/benchmark/benchmark.py as a user does (no nnUNet_extTrainer set); its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "TAK_TEXT_EMBEDDINGS")}
    env.update({"nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f", "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, str(BENCHMARK), "--work-dir", str(work), "--methods", "selftrain", "--labeled", "2",
           "--val", "1", "--epochs", "1", "--no-pseudo-label-quality", "--bootstrap", "20", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.e2e
def test_selftrain_through_the_benchmark_then_reused_step_by_step(prepared_dataset, tmp_path):
    work = tmp_path / "bench"
    source_name = f"Dataset{DATASET_ID:03d}_TAKBenchmark"  # the tiny planned cohort as the benchmark's
    shutil.copytree(prepared_dataset.raw, work / "nnUNet_raw" / source_name)
    shutil.copytree(prepared_dataset.preprocessed, work / "nnUNet_preprocessed" / source_name)
    plans_file = work / "nnUNet_preprocessed" / source_name / "nnUNetPlans.json"
    plans_file.write_text(json.dumps({**json.loads(plans_file.read_text()), "dataset_name": source_name}))
    first = _benchmark(work)
    commands = [line.split()[1] for line in first.splitlines() if line.startswith("$ ")]
    # the stock model it starts from, its pseudo-labels, the dataset, the second training, the test set
    assert commands == ["nnUNetv2_train", "nnUNetv2_predict", "nnUNetv2_move_plans_between_datasets",
                        "nnUNetv2_preprocess", "nnUNetv2_train", "nnUNetv2_predict"]
    splits = json.loads((work / "nnUNet_preprocessed" / source_name / "splits_final.json").read_text())
    assert len(splits[0]["unlabeled"]) == 3
    pseudo = work / "selftrain" / "seed0" / "pseudo_labels"
    assert sorted(p.name for p in pseudo.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in sorted(splits[0]["unlabeled"])]
    model = (work / "nnUNet_results" / dataset_name(0) / "nnUNetTrainer_Bench__nnUNetPlans__3d_fullres" / "fold_0"
             / "checkpoint_final.pth")
    assert model.is_file()
    records = {p.name: p.read_text() for p in (work / "selftrain" / "seed0").glob("*.json")}
    report = (work / "report" / "results.md").read_text()
    assert "| organ | selftrain |" in report and "selftrain's total: the stock training" in report

    again = _benchmark(work, "--reuse")
    commands = [line.split()[1] for line in again.splitlines() if line.startswith("$ ")]
    assert commands == ["nnUNetv2_predict"]  # the test set only: stock, pseudo-labels, dataset, training reused
    assert "stock_seed0: reusing the finished training" in again
    assert "selftrain_seed0: reusing the finished training" in again
    assert {p.name: p.read_text() for p in (work / "selftrain" / "seed0").glob("*.json")} == records
    with open(work / "report" / "cost.csv") as f:
        (selftrain,) = list(csv.DictReader(f))
    stock = work / "nnUNet_results" / source_name / "nnUNetTrainer_Bench__nnUNetPlans__3d_fullres" / "fold_0"
    assert float(selftrain["first_train_wall_min"]) == pytest.approx(training_stats(stock)["train_wall_min"])
    assert float(selftrain["pseudo_label_predict_s"]) > 0 and float(selftrain["preprocess_s"]) > 0
    assert float(selftrain["total_min"]) > float(selftrain["train_wall_min"]) + float(selftrain["first_train_wall_min"])
