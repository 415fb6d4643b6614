"""Resuming (--c) in-process on the tiny dataset: a cut checkpoint is named with the intact ones beside it,
and a finished run continues for more epochs only when allowed, with its schedules recomputed and logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint
from test_trainer import new_trainer

from nnunetv2_tak.semisupervised.teacher import sigmoid_rampup
from nnunetv2_tak.trainers import SSLSettingsError, nnUNetTrainerTAK_RandomText_Debug
from nnunetv2_tak.trainers.resume import EXTEND_ENV, CheckpointError


class CutCheckpointTrainer(nnUNetTrainerTAK_RandomText_Debug):
    """Own class name: own results folder."""


def test_cut_latest_checkpoint_names_the_file_and_the_intact_best(nnunet_env):
    trainer = new_trainer(CutCheckpointTrainer, nnunet_env)
    trainer.initialize()
    folder = Path(trainer.output_folder)
    trainer.save_checkpoint(str(folder / "checkpoint_best.pth"))
    trainer.current_epoch = 3
    trainer.save_checkpoint(str(folder / "checkpoint_latest.pth"))
    (folder / "checkpoint_final.pth").unlink(missing_ok=True)
    latest = folder / "checkpoint_latest.pth"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # a job killed while copying the folder

    resumed = new_trainer(CutCheckpointTrainer, nnunet_env)
    with pytest.raises(CheckpointError) as info:
        maybe_load_checkpoint(resumed, True, False)  # nnU-Net's --c: final, else latest, else best
    message = str(info.value)
    assert f"cannot read the checkpoint {latest} ({len(data) // 2} bytes" in message
    assert "checkpoint_best.pth (resumes at epoch 1)" in message
    assert f"mv {latest} {latest}.broken" in message and "rerun with --c" in message
    assert isinstance(info.value.__cause__, Exception)  # torch's own error kept as the cause

    latest.rename(f"{latest}.broken")  # what the message says to do
    maybe_load_checkpoint(resumed, True, False)
    assert resumed.current_epoch == 1

    best = folder / "checkpoint_best.pth"
    best.write_bytes(best.read_bytes()[:200])  # nothing intact left
    with pytest.raises(CheckpointError, match=r"checkpoint_best.pth \(200 bytes.*No intact checkpoint"):
        new_trainer(CutCheckpointTrainer, nnunet_env).load_checkpoint(str(best))


class ExtendTrainer(nnUNetTrainerTAK_RandomText_Debug):
    pass


class ExtendAllowedTrainer(ExtendTrainer):
    allow_extend_epochs = True


def test_finished_run_extends_only_when_allowed_with_ramps_recomputed(nnunet_env, monkeypatch):
    monkeypatch.delenv(EXTEND_ENV, raising=False)
    first = new_trainer(ExtendTrainer, nnunet_env)
    first.run_training()
    final = Path(first.output_folder) / "checkpoint_final.pth"
    assert first.current_epoch == 1

    monkeypatch.setattr(ExtendTrainer, "epochs", 2)  # the user edits the schedule of the same trainer
    refused = new_trainer(ExtendTrainer, nnunet_env)
    with pytest.raises(SSLSettingsError) as info:
        refused.load_checkpoint(str(final))
    message = str(info.value)
    assert "num_epochs: checkpoint 1, now 2" in message
    assert f"{EXTEND_ENV}=1 nnUNetv2_train ... -tr ExtendTrainer --c" in message
    assert "allow_extend_epochs = True" in message and "recomputed for 2 epochs" in message
    assert refused.current_epoch == 0 and refused.teacher.step == 0  # nothing loaded

    monkeypatch.setattr(ExtendAllowedTrainer, "epochs", 2)  # the class switch alone
    allowed = new_trainer(ExtendAllowedTrainer, nnunet_env)
    allowed.load_checkpoint(str(final))
    assert allowed.current_epoch == 1
    # nnU-Net's --c prefers checkpoint_final.pth: the old one is moved aside so a preempted extension resumes
    folder = Path(first.output_folder)
    kept = folder / "checkpoint_final_epoch1.pth"
    assert not final.exists() and kept.is_file()
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and latest["tak_ssl"]["teacher"]["step"] == 2
    kept.replace(final)  # undo, for the checks below
    (folder / "checkpoint_latest.pth").unlink()

    monkeypatch.setattr(ExtendTrainer, "epochs", 1)
    monkeypatch.setattr(ExtendTrainer, "iterations_per_epoch", 3)  # other settings stay refused
    with pytest.raises(SSLSettingsError, match=r"num_iterations_per_epoch: checkpoint 2, now 3"):
        new_trainer(ExtendTrainer, nnunet_env).load_checkpoint(str(final))
    monkeypatch.setattr(ExtendTrainer, "iterations_per_epoch", 2)

    monkeypatch.setattr(ExtendTrainer, "epochs", 2)
    monkeypatch.setenv(EXTEND_ENV, "1")
    resumed = new_trainer(ExtendTrainer, nnunet_env)
    resumed.load_checkpoint(str(final))
    assert resumed.current_epoch == 1 and resumed.teacher.step == 2
    log = Path(resumed.log_file).read_text()
    assert "TAK: extending ExtendTrainer from 1 to 2 epochs at epoch 1" in log
    lr = resumed.initial_lr * 0.5 ** 0.9
    assert f"learning rate 0 -> {lr:.4g}" in log  # poly LR: 0 at the old end, rises again
    resumed.run_training()
    assert resumed.current_epoch == 2 and resumed.teacher.step == 4
    assert kept.is_file() and torch.load(final, map_location="cpu", weights_only=False)["current_epoch"] == 2
    weight = resumed.logger.get_value("tak_unsup_weight", 1)
    assert weight == pytest.approx(resumed.ssl_weights(1)["unsup"])  # the ramp over 2 epochs, not 1
    assert resumed.ssl_weights(1)["unsup"] < resumed.unsup_weight * sigmoid_rampup(1, 1)
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["tak_ssl"]["settings"]["num_epochs"] == 2

    monkeypatch.setattr(ExtendTrainer, "epochs", 1)  # shortening stays refused, with the reason
    with pytest.raises(SSLSettingsError, match=r"Shortening a run \(2 -> 1 epochs\) is not supported"):
        new_trainer(ExtendTrainer, nnunet_env).load_checkpoint(str(final))
