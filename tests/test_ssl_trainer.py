"""The semi-supervised trainer in-process and through the stock CLI: the unlabeled stream, resume
with teacher and SSL state, refused resumes, the variants, logging, and a paper-style split whose
unlabeled cases have no labels on disk at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATASET_ID, nnunet_cli
from test_trainer import new_trainer

from nnunetv2_tak.cli.make_splits import main as make_splits_main
from nnunetv2_tak.model.network import unwrap_network
from nnunetv2_tak.semisupervised.losses import GADiceLoss, GALoss
from nnunetv2_tak.trainers import (
    PLANS_KEY,
    SSLSettingsError,
    nnUNetTrainerTAK_RandomText_Debug,
)
from nnunetv2_tak.unlabeled import UnlabeledDataError, preprocess_unlabeled


class ResumeTrainer(nnUNetTrainerTAK_RandomText_Debug):
    """Own class name: own results folder."""


class ResumeOtherDecay(ResumeTrainer):
    ema_decay = 0.9


def resume_and_compare_teachers(first, nnunet_env):
    """A new trainer of ``first``'s class resumed from its checkpoint_final.pth, its EMA teacher (step and every
    weight) checked against ``first``'s."""
    resumed = new_trainer(type(first), nnunet_env)
    resumed.load_checkpoint(str(Path(first.output_folder) / "checkpoint_final.pth"))
    assert resumed.teacher.step == first.teacher.step == 2  # one EMA update per iteration
    for (name, a), b in zip(first.teacher.module.state_dict().items(),
                            resumed.teacher.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    return resumed


def test_one_epoch_then_resume_restores_teacher_optimizer_and_logs(nnunet_env):
    first = new_trainer(ResumeTrainer, nnunet_env)
    first.run_training()
    final = Path(first.output_folder) / "checkpoint_final.pth"
    assert first.teacher.step == 2  # one EMA update per iteration

    log = first.logger.get_value
    assert len(log("tak_pl_coverage", None)) == 1 and 0.0 <= log("tak_pl_coverage", 0) <= 1.0
    assert len(log("tak_pl_share", 0)) == 16
    assert log("tak_contrast_weight", 0) == pytest.approx(0.1)  # _Debug switches it on at once
    assert np.isfinite(log("tak_contrast_loss", 0)) and log("tak_contrast_loss", 0) > 0
    assert (Path(first.output_folder) / "progress.png").is_file()
    text = Path(first.log_file).read_text()
    assert "TAK losses: supervised" in text and "TAK pseudo-labels:" in text and "3 unlabeled case(s)" in text

    resumed = resume_and_compare_teachers(first, nnunet_env)
    assert not all(torch.equal(a, b) for a, b in zip(first.teacher.module.state_dict().values(),
                                                     unwrap_network(first.network).state_dict().values(),
                                                     strict=True))  # the teacher is not the student
    opt_a, opt_b = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        torch.testing.assert_close(state["momentum_buffer"], opt_b["state"][key]["momentum_buffer"])
    assert resumed.current_epoch == 1

    other = new_trainer(ResumeOtherDecay, nnunet_env)
    other.initialize()
    before = {k: v.clone() for k, v in other.teacher.module.state_dict().items()}
    with pytest.raises(SSLSettingsError, match=r"ema_decay: checkpoint 0.99, now 0.9"):
        other.load_checkpoint(str(final))
    assert all(torch.equal(before[k], v) for k, v in other.teacher.module.state_dict().items())
    assert final.is_file()


class NoUnlabeledAnywhere(nnUNetTrainerTAK_RandomText_Debug):
    pass


def test_missing_unlabeled_data_is_a_clear_error_and_preprocessed_data_serves_without_raw(nnunet_env, monkeypatch,
                                                                                         tmp_path):
    dataset_json = nnunet_env.dataset_json()
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    folder, cases = preprocess_unlabeled(nnunet_env.raw, nnunet_env.preprocessed, plans, "3d_fullres", dataset_json,
                                         progress=False)
    raw = tmp_path / "raw"  # nnUNet_raw without imagesUnlabeled/
    shutil.copytree(nnunet_env.raw, raw / nnunet_env.name, ignore=shutil.ignore_patterns("imagesUnlabeled"))
    monkeypatch.setenv("nnUNet_raw", str(raw))

    aside = tmp_path / "aside"
    shutil.move(folder, aside)
    try:
        trainer = new_trainer(NoUnlabeledAnywhere, nnunet_env)
        with pytest.raises(UnlabeledDataError, match=r"has none.*imagesUnlabeled.*nnUNetTrainerTAK_NoUnlabeled"):
            trainer.on_train_start()
    finally:
        shutil.move(aside, folder)

    trainer = new_trainer(NoUnlabeledAnywhere, nnunet_env)  # e.g. only nnUNet_preprocessed copied to a cluster
    trainer.initialize()
    assert trainer.find_unlabeled_cases().identifiers == cases
    assert "not found; using the preprocessed unlabeled cases" in Path(trainer.log_file).read_text()


class NoTextDebug(nnUNetTrainerTAK_RandomText_Debug):
    text_source = "learned"


class NoUnlabeledDebug(nnUNetTrainerTAK_RandomText_Debug):
    use_unlabeled = False


class NoContrastiveDebug(nnUNetTrainerTAK_RandomText_Debug):
    contrastive_weight = 0.0


class GALossDebug(nnUNetTrainerTAK_RandomText_Debug):
    supervised_loss = "ga"
    unsup_loss = "dice_ce_confident"


@pytest.mark.parametrize("cls", [NoTextDebug, NoUnlabeledDebug, NoContrastiveDebug, GALossDebug])
def test_variants_train_a_step(nnunet_env, cls):
    trainer = new_trainer(cls, nnunet_env)
    trainer.on_train_start()
    try:
        net = unwrap_network(trainer.network)
        text_before = net.text_prior.text_embeddings.detach().clone()
        trainer.on_train_epoch_start()
        out = trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(out["loss"])
        contrast_grad = net.contrast.voxel[0][0].weight.grad
        if cls is NoTextDebug:
            assert isinstance(net.text_prior.text_embeddings, torch.nn.Parameter)
            assert not torch.equal(text_before, net.text_prior.text_embeddings)  # learned
            assert trainer.plans_manager.plans["configurations"]["3d_fullres"][PLANS_KEY]["text"]["source"] \
                == "learned"
        if cls is NoUnlabeledDebug:
            assert trainer.teacher is None and trainer.dataloader_unlabeled is None
            assert np.isnan(out["tak_pl"]).all()
            assert "labeled data only" in Path(trainer.log_file).read_text()
        if cls is NoContrastiveDebug:
            assert contrast_grad is None and out["tak_terms"][2] == 0
        if cls is GALossDebug:
            assert isinstance(trainer.loss.loss, GALoss)  # inside nnU-Net's deep-supervision wrapper
            assert trainer.loss.weight_factors[0] > 0 and not isinstance(trainer.unsup_criterion, GADiceLoss)
        else:
            assert isinstance(trainer.unsup_criterion, GADiceLoss) or trainer.teacher is None
    finally:
        trainer.on_train_end()


def test_split_unlabeled_cases_train_with_their_labels_deleted(prepared_dataset, tmp_path, monkeypatch):
    """Paper-style protocol through the stock CLI: the unlabeled cases' label files, preprocessed
    segmentations and properties (which hold class locations) are deleted; training still runs."""
    env = dict(prepared_dataset.env)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
        monkeypatch.setenv(var, env[var])
    shutil.copytree(prepared_dataset.raw, tmp_path / "nnUNet_raw" / prepared_dataset.name,
                    ignore=shutil.ignore_patterns("imagesUnlabeled"))
    shutil.copytree(prepared_dataset.preprocessed, tmp_path / "nnUNet_preprocessed" / prepared_dataset.name,
                    ignore=shutil.ignore_patterns("*_unlabeled", "splits_final.json"))
    assert make_splits_main(["-d", str(DATASET_ID), "--labeled-fraction", "0.4", "--num-val", "1"]) == 0
    pre = tmp_path / "nnUNet_preprocessed" / prepared_dataset.name
    (split,) = json.loads((pre / "splits_final.json").read_text())
    assert len(split["unlabeled"]) == 3
    for case in split["unlabeled"]:
        (tmp_path / "nnUNet_raw" / prepared_dataset.name / "labelsTr" / f"{case}.nii.gz").unlink()
        (pre / "gt_segmentations" / f"{case}.nii.gz").unlink()
        (pre / "nnUNetPlans_3d_fullres" / f"{case}_seg.b2nd").unlink()
        (pre / "nnUNetPlans_3d_fullres" / f"{case}.pkl").unlink()
    proc = nnunet_cli("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr",
                      "nnUNetTrainerTAK_RandomText_Debug", "-device", "cpu", env=env)
    assert "TAK: 3 unlabeled case(s), 3 streamed by this process" in proc.stdout
    assert (tmp_path / "nnUNet_results" / prepared_dataset.name / "nnUNetTrainerTAK_RandomText_Debug__nnUNetPlans__"
            "3d_fullres" / "fold_0" / "checkpoint_final.pth").is_file()


def test_ramps_follow_the_reference_schedule():
    """Threshold over 100 of 160 epochs (62.5%), pseudo-label weight over all 160 (reference code)."""
    import math

    from nnunetv2_tak.semisupervised.teacher import sigmoid_rampup
    from nnunetv2_tak.trainers import nnUNetTrainerTAK

    trainer = object.__new__(nnUNetTrainerTAK)  # the class's knobs, no nnU-Net set-up
    trainer.num_epochs = 160
    at_100 = nnUNetTrainerTAK.ssl_weights(trainer, 100)
    assert at_100["threshold"] == pytest.approx(math.log(2))  # fully ramped at epoch 100
    assert at_100["unsup"] == pytest.approx(0.1 * sigmoid_rampup(100, 160))  # still ramping
    assert nnUNetTrainerTAK.ssl_weights(trainer, 50)["threshold"] == pytest.approx(
        math.log(2) * (0.75 + 0.25 * math.exp(-5 * 0.5 ** 2)))
    assert nnUNetTrainerTAK.ssl_weights(trainer, 19)["contrast"] == 0.0  # on after 12% (19.2 epochs)
    assert nnUNetTrainerTAK.ssl_weights(trainer, 20)["contrast"] == pytest.approx(0.1)
