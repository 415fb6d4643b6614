"""Shared fixtures: one tiny synthetic multi-organ dataset, planned and preprocessed by the real
nnU-Net CLI once per session, with plans shrunk to a CPU-sized network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path[:0] = [str(EXAMPLES), str(EXAMPLES / "benchmark")]  # the examples' modules (quickstart, benchmark)
DATASET_ID = 501
TINY_SPEC = {"shape": (24, 48, 48), "spacing": (10.0, 6.0, 6.0)}  # whole abdomen at 1/4 resolution


def nnunet_cli(name: str, *args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a console script of this environment (stock nnU-Net or ours) and fail with its output."""
    exe = BIN / name
    assert exe.exists(), f"{exe} not installed"
    proc = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


@dataclass
class PreparedDataset:
    root: Path
    name: str
    env: dict[str, str]  # environment for subprocesses: nnU-Net paths, no nnUNet_extTrainer

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw" / self.name

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed" / self.name

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results" / self.name

    def dataset_json(self) -> dict:
        return json.loads((self.preprocessed / "dataset.json").read_text())


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> PreparedDataset:
    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import CohortSpec, generate_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}  # the .pth hook must set it
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        env[var] = str(root / var)
    env.update({"nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f", "HF_HUB_OFFLINE": "1"})
    folder = generate_dataset(root / "nnUNet_raw", DATASET_ID, "TAKTiny", num_training=6, num_test=2,
                              num_unlabeled=3, spec=CohortSpec(**TINY_SPEC), seed=0)
    nnunet_cli("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2",
               "--verify_dataset_integrity", env=env)
    data = PreparedDataset(root, folder.name, env)
    shrink_plans_file(data.preprocessed / "nnUNetPlans.json", "3d_fullres", base_features=4, max_features=32,
                      batch_size=2)
    return data


@pytest.fixture
def nnunet_env(prepared_dataset, monkeypatch) -> PreparedDataset:
    """In-process use of the prepared dataset: nnU-Net path variables set for this test."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile",
                "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, prepared_dataset.env[var])
    return prepared_dataset


def make_text_dataset(tmp_path: Path, monkeypatch, name: str, labels: dict[str, int]) -> tuple[Path, Path, dict]:
    """A dataset known to nnU-Net (raw + preprocessed folders with dataset.json), no images, offline hub:
    (raw folder, preprocessed folder, dataset.json)."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dataset_json = {"channel_names": {"0": "CT"}, "labels": dict(labels), "numTraining": 0, "file_ending": ".nii.gz"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        folder = tmp_path / var / name
        folder.mkdir()
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return tmp_path / "nnUNet_raw" / name, tmp_path / "nnUNet_preprocessed" / name, dataset_json


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str, module_name: str):
    """Import a script of examples/ as a module (they are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_predictions_on_label_grid(pred: Path, labels_dir: Path, num_classes: int) -> None:
    """Every reference label file has a prediction with its size, spacing, origin and direction, holding
    only labels in [0, num_classes)."""
    import numpy as np
    import SimpleITK as sitk

    cases = sorted(p.name for p in labels_dir.glob("*.nii.gz"))
    assert cases and sorted(p.name for p in pred.glob("*.nii.gz")) == cases
    for name in cases:
        ref, out = sitk.ReadImage(str(labels_dir / name)), sitk.ReadImage(str(pred / name))
        assert out.GetSize() == ref.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing())
        np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin())
        np.testing.assert_allclose(out.GetDirection(), ref.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= set(range(num_classes))
