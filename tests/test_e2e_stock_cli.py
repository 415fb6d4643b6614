"""End to end through the stock nnU-Net entry points in subprocesses, with the installed package:
plan/preprocess (fixture, with imagesUnlabeled/) -> encode prompts -> nnUNetv2_train -tr
nnUNetTrainerTAK_Debug (semi-supervised; unlabeled scans preprocessed on first use) ->
nnUNetv2_predict from the checkpoint alone -> nnUNetv2_evaluate_folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DATASET_ID, assert_predictions_on_label_grid, nnunet_cli

pytestmark = pytest.mark.e2e

TRAINER = "nnUNetTrainerTAK_Debug"


@pytest.fixture(scope="module")
def trained(prepared_dataset):
    env = prepared_dataset.env
    assert "nnUNet_extTrainer" not in env  # discovery must come from the installed .pth hook alone
    nnunet_cli("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--pretrained", "random-init", env=env)
    shutil.rmtree(prepared_dataset.preprocessed / "nnUNetPlans_3d_fullres_unlabeled", ignore_errors=True)  # first use
    proc = nnunet_cli("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu",
                      env=env)
    model = prepared_dataset.results / f"{TRAINER}__nnUNetPlans__3d_fullres"
    return prepared_dataset, model, proc.stdout


def test_training_through_stock_cli(trained):
    data, model, stdout = trained
    assert f"Using trainer '{TRAINER}'" in stdout
    # says which text it used, and that random encoder weights carry no knowledge
    assert "TAK text source: open_clip ViT-B-32 / random-init (RANDOM encoder weights" in stdout
    # the unlabeled scans of imagesUnlabeled/ were preprocessed on first use and streamed
    assert "TAK: preprocessing 3 unlabeled case(s) of 3" in stdout
    assert "TAK: 3 unlabeled case(s), 3 streamed by this process" in stdout
    assert (data.preprocessed / "nnUNetPlans_3d_fullres_unlabeled" / "tak_unlabeled.json").is_file()
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    assert ckpt["tak_ssl"]["teacher"]["step"] == 2 and ckpt["tak_ssl"]["num_unlabeled"] == 3
    cache = torch.load(data.preprocessed / "tak_text_embeddings.pt", weights_only=True)
    torch.testing.assert_close(ckpt["network_weights"]["text_prior.text_embeddings"], cache["embeddings"])
    entry = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["tak_text_prior"]
    assert entry["head"]["num_kinds"] == 2 and entry["head"]["embed_dim"] == 512
    assert entry["text"]["pretrained"] == "random-init" and entry["text"]["prompt_sha256"]
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {str(i) for i in range(1, 16)}


def test_predict_from_checkpoint_alone_and_evaluate(trained, tmp_path):
    """No prompts, no open_clip, no embedding cache, no raw/preprocessed data at prediction time."""
    data, model, _ = trained
    blocker = tmp_path / "blocker"
    (blocker / "open_clip").mkdir(parents=True)
    (blocker / "open_clip" / "__init__.py").write_text("raise ImportError('open_clip must not be needed to predict')")
    env = {k: v for k, v in data.env.items() if k not in ("nnUNet_raw",)}
    env["nnUNet_preprocessed"] = str(tmp_path / "empty_preprocessed")
    env["PYTHONPATH"] = str(blocker)
    images = tmp_path / "imagesTs"
    shutil.copytree(data.raw / "imagesTs", images)
    pred = tmp_path / "pred"
    nnunet_cli("nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", str(DATASET_ID), "-c", "3d_fullres",
               "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-chk", "checkpoint_final.pth", env=env)
    assert_predictions_on_label_grid(pred, data.raw / "labelsTs", 16)

    nnunet_cli("nnUNetv2_evaluate_folder", str(data.raw / "labelsTs"), str(pred), "-djfile",
               str(model / "dataset.json"), "-pfile", str(model / "plans.json"), "-np", "1", env=env)
    summary = json.loads((pred / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(list((data.raw / "labelsTs").glob("*.nii.gz")))
    assert set(summary["mean"]) == {str(i) for i in range(1, 16)}
    assert all("Dice" in v for v in summary["mean"].values())


def test_user_subclass_found_like_any_variant_and_picklable(prepared_dataset, tmp_path):
    user_dir = tmp_path / "my_trainers"
    user_dir.mkdir()
    (user_dir / "my_tak.py").write_text(textwrap.dedent("""
        from nnunetv2_tak.trainers import nnUNetTrainerTAK

        class MyTAKTrainer(nnUNetTrainerTAK):
            epochs = 3
    """))
    script = textwrap.dedent("""
        import os, pickle
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        mine = recursive_find_trainer_class_by_name("MyTAKTrainer")
        ours = recursive_find_trainer_class_by_name("nnUNetTrainerTAK")
        assert pickle.loads(pickle.dumps(ours)) is ours
        assert ours.__module__ == "nnunetv2_tak.trainers.tak"  # its home module, not a lookup shim
        assert issubclass(mine, ours) and mine.epochs == 3
        print("EXT=" + os.environ["nnUNet_extTrainer"])
    """)
    env = dict(prepared_dataset.env, nnUNet_extTrainer=str(user_dir))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ext = proc.stdout.split("EXT=")[1].strip().split(os.pathsep)
    assert ext[0] == str(user_dir) and ext[-1].endswith("_trainer_shim")  # user's value kept, ours appended
