"""The plain mean teacher (nnUNetTrainerMeanTeacher): nnU-Net's own network with TAK's unlabeled stream,
EMA teacher and pseudo-label loss, no text. Through the stock CLI on a dataset whose organs have no prompts,
predicted with the stock predictor; resumed in-process with teacher and settings checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATASET_ID, nnunet_cli
from test_ssl_trainer import resume_and_compare_teachers
from test_trainer import new_trainer

from nnunetv2_tak.trainers import (
    CHECKPOINT_KEY,
    SSLSettingsError,
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerMeanTeacher_Debug,
    nnUNetTrainerTAK,
)
from nnunetv2_tak.trainers.distributed import DistributedTrainerMixin
from nnunetv2_tak.trainers.settings import checked_knobs

TRAINER = "nnUNetTrainerMeanTeacher_Debug"


def test_mean_teacher_trains_and_predicts_through_the_stock_cli_without_prompts(prepared_dataset, tmp_path):
    """Labels renamed to names no prompt library knows: TAK would stop, the mean teacher needs no text."""
    env = dict(prepared_dataset.env)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
    raw = tmp_path / "nnUNet_raw" / prepared_dataset.name
    pre = tmp_path / "nnUNet_preprocessed" / prepared_dataset.name
    shutil.copytree(prepared_dataset.raw, raw)
    shutil.copytree(prepared_dataset.preprocessed, pre, ignore=shutil.ignore_patterns("*_unlabeled", "tak_*"))
    for folder in (raw, pre):
        dataset_json = json.loads((folder / "dataset.json").read_text())
        dataset_json["labels"] = {("background" if v == 0 else f"structure {v}"): v
                                  for v in dataset_json["labels"].values()}
        (folder / "dataset.json").write_text(json.dumps(dataset_json))

    proc = nnunet_cli("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu",
                      env=env)
    assert "TAK text source" not in proc.stdout
    assert "unlabeled case(s)" in proc.stdout and "TAK pseudo-labels:" in proc.stdout
    fold = tmp_path / "nnUNet_results" / prepared_dataset.name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    weights = checkpoint["network_weights"]
    assert not any(k.startswith(("text_prior.", "contrast.")) for k in weights)  # nnU-Net's own network
    assert any(".seg_layers." in k for k in weights)  # nnU-Net's segmentation layers
    ssl = checkpoint[CHECKPOINT_KEY]
    assert set(ssl["teacher"]["weights"]) == set(weights) and ssl["teacher"]["step"] == 2
    assert ssl["num_unlabeled"] == 3 and set(ssl["settings"]) == {*checked_knobs(nnUNetTrainerMeanTeacher),
                                                                  "num_epochs", "num_iterations_per_epoch"}
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert "tak_text_prior" not in plans["configurations"]["3d_fullres"]

    out = tmp_path / "pred"
    nnunet_cli("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c",
               "3d_fullres", "-f", "0", "-tr", TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu",
               "--disable_tta", "-npp", "1", "-nps", "1", env=env)
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz"))
    assert cases and sorted(p.name[:-len(".nii.gz")] for p in out.glob("*.nii.gz")) == cases


class ResumeMeanTeacher(nnUNetTrainerMeanTeacher_Debug):
    """Own class name: own results folder."""


class ResumeMeanTeacherOtherWeight(ResumeMeanTeacher):
    unsup_weight = 0.3


def test_mean_teacher_resumes_its_teacher_and_refuses_other_settings(nnunet_env, monkeypatch):
    first = new_trainer(ResumeMeanTeacher, nnunet_env)
    first.run_training()
    final = Path(first.output_folder) / "checkpoint_final.pth"
    assert first.logger.get_value("tak_contrast_weight", 0) == 0.0  # no contrastive term
    resume_and_compare_teachers(first, nnunet_env)
    with pytest.raises(SSLSettingsError, match=r"unsup_weight: checkpoint 0.1, now 0.3"):
        new_trainer(ResumeMeanTeacherOtherWeight, nnunet_env).load_checkpoint(str(final))

    # a checkpoint write that fails halfway (disk full) leaves the previous checkpoint intact and no stray file
    before, files = final.read_bytes(), sorted(p.name for p in final.parent.iterdir())
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            first.save_checkpoint(str(final))
    assert final.read_bytes() == before
    assert sorted(p.name for p in final.parent.iterdir()) == files
    new_trainer(ResumeMeanTeacher, nnunet_env).load_checkpoint(str(final))


def test_tak_is_the_mean_teacher_plus_text_and_contrast():
    """Every knob the mean teacher checks on resume, TAK checks too; TAK adds the text and contrastive ones.
    The names are the checkpoint format: checkpoints store exactly these settings."""
    mean_teacher, tak = set(checked_knobs(nnUNetTrainerMeanTeacher)), set(checked_knobs(nnUNetTrainerTAK))
    assert mean_teacher == {"use_unlabeled", "unlabeled_batch_size", "ema_decay", "teacher_noise_std",
                            "teacher_noise_clip", "entropy_threshold_base", "entropy_threshold_start",
                            "entropy_rampup_fraction", "unsup_weight", "unsup_rampup_fraction", "unsup_loss",
                            "supervised_loss", "ga_top_fraction", "ga_gamma"}
    assert tak - mean_teacher == {"text_source", "contrastive_weight", "contrastive_stage_reduction",
                                  "contrastive_start_fraction", "contrastive_temperature", "contrastive_anchors",
                                  "contrastive_on_unlabeled"}
    assert issubclass(nnUNetTrainerMeanTeacher, DistributedTrainerMixin)  # torchrun and -num_gpus building blocks


def test_checked_knobs_of_an_external_trainer_module_dropped_from_sys_modules(tmp_path, monkeypatch):
    """nnU-Net imports a trainer from an ``nnUNet_extTrainer`` folder and then drops its module from
    ``sys.modules``; the module's postponed annotations may also name types imported only for type checkers.
    The checkpoint's settings still come out, the subclass's own checked knob among them."""
    import sys

    (tmp_path / "user_trainer_module.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING, ClassVar\n"
        "from nnunetv2_tak.trainers import nnUNetTrainerTAK\n"
        "from nnunetv2_tak.trainers.settings import Checked\n"
        "if TYPE_CHECKING:\n"
        "    from somewhere_else import Helper\n"
        "class UserTAK(nnUNetTrainerTAK):\n"
        "    helper: Helper | None = None\n"
        "    my_weight: ClassVar[Checked[float]] = 0.5\n"
        "    unlabeled_batch_size: ClassVar[int] = 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_trainer_module

    user_tak = user_trainer_module.UserTAK
    del sys.modules["user_trainer_module"]  # what nnU-Net's trainer lookup does after importing it
    # the most derived declaration decides: unlabeled_batch_size redeclared without Checked is not checked
    assert set(checked_knobs(user_tak)) == (set(checked_knobs(nnUNetTrainerTAK)) | {"my_weight"}) - {
        "unlabeled_batch_size"}
