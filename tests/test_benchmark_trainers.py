"""The benchmark trainers in-process: teacher snapshots during training (cheap: teacher weights only)
and the benchmark's pseudo-label quality evaluation of those snapshots on labeled preprocessed cases,
through nnU-Net's own predictor."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_trainers import (
    nnUNetTrainer_BenchReference,
    nnUNetTrainerTAK_RandomText_Bench,
    teacher_snapshots,
)
from test_trainer import new_trainer

from nnunetv2_tak.model.network import unwrap_network

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class SnapshotTrainer(nnUNetTrainerTAK_RandomText_Bench):
    """Own results folder; 3 epochs of 2 iterations, a snapshot every 2 epochs (and at the last)."""

    bench_iterations = 2
    teacher_snapshot_every = 2


def test_teacher_snapshots_are_small_and_hold_the_teacher_then_evaluate(nnunet_env, monkeypatch):
    monkeypatch.setenv("TAK_BENCH_EPOCHS", "3")
    trainer = new_trainer(SnapshotTrainer, nnunet_env)
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    folder = Path(trainer.output_folder)
    snapshots = teacher_snapshots(folder)
    assert [epoch for epoch, _ in snapshots] == [2, 3]  # every 2 epochs and the last one
    last = torch.load(snapshots[-1][1], map_location="cpu", weights_only=True)
    assert last["epoch"] == 3
    teacher = trainer.teacher.module.state_dict()
    assert set(last["teacher"]) == set(unwrap_network(trainer.network).state_dict())
    for key, value in teacher.items():
        torch.testing.assert_close(last["teacher"][key], value.cpu(), msg=key)
    first = torch.load(snapshots[0][1], map_location="cpu", weights_only=True)["teacher"]
    assert any(not torch.equal(first[k], last["teacher"][k]) for k in first)  # the teacher moved
    # teacher weights only: much smaller than the checkpoint (student + teacher + AdamW moments)
    assert snapshots[-1][1].stat().st_size < 0.4 * (folder / "checkpoint_final.pth").stat().st_size

    # the benchmark's evaluation: the teacher's argmax on preprocessed cases vs their labels, per snapshot.
    # nnU-Net's predictor finds the trainer by the checkpoint's name: this test's class is not findable
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = nnUNetTrainerTAK_RandomText_Bench.__name__
    torch.save(checkpoint, folder / "checkpoint_final.pth")
    spec = importlib.util.spec_from_file_location("tak_benchmark_example", EXAMPLES / "benchmark" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    data_folder = nnunet_env.preprocessed / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = sorted(p.name.split(".")[0] for p in data_folder.glob("*.pkl"))[:2]
    quality = bench.pseudo_label_quality(folder, 0, cases, data_folder, num_classes=16, device="cpu")
    assert [q["epoch"] for q in quality] == [2, 3]
    for q in quality:
        counts = np.asarray(q["counts"])
        assert counts.shape == (3, 16)
        labels = counts[2]
        assert labels.sum() == sum(_labeled_voxels(data_folder, c) for c in cases)  # every voxel counted once
        assert counts[1].sum() == labels.sum()  # one prediction per voxel
        assert (counts[0] <= np.minimum(counts[1], counts[2])).all()
    # the stock baseline's row: the trained network of checkpoint_final.pth at its last epoch
    final = bench.pseudo_label_quality(folder, 0, cases, data_folder, num_classes=16, device="cpu", final_model=True)
    assert [q["epoch"] for q in final] == [3]
    assert np.asarray(final[0]["counts"])[1].sum() == np.asarray(quality[-1]["counts"])[2].sum()


def _labeled_voxels(data_folder: Path, case: str) -> int:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    _, seg, _, _ = infer_dataset_class(str(data_folder))(str(data_folder), [case]).load_case(case)
    return int((np.asarray(seg) >= 0).sum())


@pytest.mark.parametrize("env, expected", [({"TAK_BENCH_EPOCHS": "3"}, 40),
                                           ({"TAK_BENCH_EPOCHS": "3", "TAK_BENCH_REFERENCE_EPOCHS": "7"}, 7)])
def test_reference_schedule_reads_its_own_epochs(nnunet_env, monkeypatch, env, expected):
    monkeypatch.delenv("TAK_BENCH_REFERENCE_EPOCHS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert new_trainer(nnUNetTrainer_BenchReference, nnunet_env).num_epochs == expected
