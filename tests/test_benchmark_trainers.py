"""The benchmark trainers (examples/benchmark/trainers/): found by name by nnU-Net's own lookup through
nnUNet_extTrainer, next to the plugin's folder and whatever the user set; their schedules; teacher snapshots
during training (cheap: teacher weights only) and the benchmark's pseudo-label quality evaluation of those
snapshots on labeled preprocessed cases, through nnU-Net's own predictor."""

from __future__ import annotations

import json
import os
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import TRAINERS_FOLDER, bench_trainers, use_bench_trainers
from scoring import keeps_snapshots, pseudo_label_quality
from test_trainer import new_trainer

from nnunetv2_tak._discovery import SHIM_FOLDER
from nnunetv2_tak.model.network import unwrap_network

trainers = bench_trainers()


def test_bench_folder_is_appended_to_what_is_set_and_holds_only_trainers():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    env = {"nnUNet_extTrainer": "/my/trainers"}
    expected = os.pathsep.join(["/my/trainers", SHIM_FOLDER, str(TRAINERS_FOLDER)])
    assert use_bench_trainers(env) == expected == env["nnUNet_extTrainer"]
    assert use_bench_trainers(env) == expected  # once only
    assert use_bench_trainers({}) == os.pathsep.join([SHIM_FOLDER, str(TRAINERS_FOLDER)])
    # nnU-Net imports every module of the folder at each lookup: trainer modules only
    assert [m.name for m in pkgutil.iter_modules([str(TRAINERS_FOLDER)])] == ["bench_trainers"]
    assert all(issubclass(getattr(trainers, name), nnUNetTrainer) for name in trainers.__all__)


@pytest.mark.parametrize("name", ["nnUNetTrainer_Bench", "nnUNetTrainerTAK_ShuffledText_Bench",
                                  "nnUNetTrainerMeanTeacher_Bench", "nnUNetTrainerTAK_RandomText_Short"])
def test_nnunet_finds_the_bench_trainers_by_name(nnunet_env, monkeypatch, name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", use_bench_trainers(dict(os.environ)))
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(trainers, name)  # the module this process imported before the lookup
    assert recursive_find_trainer_class_by_name("nnUNetTrainerTAK").__module__ == "nnunetv2_tak.trainers.tak"
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_FOLDER)  # the plugin's folder alone does not have them
    with pytest.raises(RuntimeError, match=f"Could not find requested nnunet trainer {name}"):
        recursive_find_trainer_class_by_name(name)


@pytest.mark.parametrize("name, base", [("nnUNetTrainerTAK_ShuffledText_Bench", "nnUNetTrainerTAK_ShuffledText"),
                                        ("nnUNetTrainerMeanTeacher_Bench", "nnUNetTrainerMeanTeacher")])
def test_new_bench_trainers_have_the_shared_schedule_and_keep_snapshots(nnunet_env, monkeypatch, name, base):
    import nnunetv2_tak.trainers

    monkeypatch.setenv("TAK_BENCH_EPOCHS", "3")
    cls = getattr(trainers, name)
    assert issubclass(cls, getattr(nnunetv2_tak.trainers, base))
    trainer = new_trainer(cls, nnunet_env)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.initial_lr) == (3, 25, 3e-3)
    assert keeps_snapshots(name)


class SnapshotTrainer(trainers.nnUNetTrainerTAK_RandomText_Bench):
    """Own results folder; 3 epochs of 2 iterations, a snapshot every 2 epochs (and at the last)."""

    bench_iterations = 2
    teacher_snapshot_every = 2


def test_teacher_snapshots_are_small_and_hold_the_teacher_then_evaluate(nnunet_env, monkeypatch):
    monkeypatch.setenv("TAK_BENCH_EPOCHS", "3")
    trainer = new_trainer(SnapshotTrainer, nnunet_env)
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    folder = Path(trainer.output_folder)
    snapshots = trainers.teacher_snapshots(folder)
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
    checkpoint["trainer_name"] = "nnUNetTrainerTAK_RandomText_Bench"
    torch.save(checkpoint, folder / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_extTrainer", use_bench_trainers(dict(os.environ)))
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    data_folder = nnunet_env.preprocessed / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = sorted(p.name.split(".")[0] for p in data_folder.glob("*.pkl"))[:2]
    quality = pseudo_label_quality(folder, 0, cases, data_folder, num_classes=16, device="cpu")
    assert [q["epoch"] for q in quality] == [2, 3]
    for q in quality:
        counts = np.asarray(q["counts"])
        assert counts.shape == (3, 16)
        labels = counts[2]
        assert labels.sum() == sum(_labeled_voxels(data_folder, c) for c in cases)  # every voxel counted once
        assert counts[1].sum() == labels.sum()  # one prediction per voxel
        assert (counts[0] <= np.minimum(counts[1], counts[2])).all()
    # the stock baseline's row: the trained network of checkpoint_final.pth at its last epoch
    final = pseudo_label_quality(folder, 0, cases, data_folder, num_classes=16, device="cpu", final_model=True)
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
    assert new_trainer(trainers.nnUNetTrainer_BenchReference, nnunet_env).num_epochs == expected
