"""The quickstart's own pieces (examples/quickstart.py): the CPU demo trainer as nnU-Net finds it, the Dice
table and the overlay picture. The quickstart run itself (~10 min) is not part of the suite; its steps are
the stock CLI, tested end to end in test_e2e_stock_cli.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_example

NAMES = {0: "background", 1: "liver", 2: "right adrenal gland", 3: "aorta", 4: "pancreas", 5: "duodenum"}


@pytest.fixture(scope="module")
def quickstart():
    return load_example("quickstart.py", "tak_quickstart_example")


def test_dice_table_flags_organs_at_zero_and_averages_the_others(quickstart):
    dice = {1: 0.912, 2: 0.0, 3: math.nan, 4: 0.004, 5: 0.05}
    text, missed = quickstart.format_dice_table(dice, {k: v for k, v in NAMES.items() if k}, "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert missed == ["right adrenal gland", "pancreas"]
    liver = next(line for line in lines if "liver" in line)
    assert "0.912" in liver and "#" * 18 in liver and "stayed at 0" not in liver
    assert "stayed at 0" in next(line for line in lines if "adrenal" in line)
    assert "n/a" in next(line for line in lines if "aorta" in line)
    assert "barely found" in next(line for line in lines if "duodenum" in line)
    assert "0.242" in next(line for line in lines if "mean (foreground)" in line)  # (0.912 + 0 + 0.004 + 0.05) / 4
    assert lines[-1].startswith("  found 1 of 4 organs (Dice >= 0.1); barely found: duodenum; stayed at 0: "
                                "right adrenal gland, pancreas")


def test_class_dice_reads_an_nnunet_summary(quickstart):
    summary = {"mean": {"1": {"Dice": 0.5, "IoU": 0.33}, "2": {"Dice": float("nan")}}}
    dice = quickstart.class_dice(json.loads(json.dumps(summary)))
    assert dice[1] == 0.5 and math.isnan(dice[2])


def _toy_scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[Z, Y, X] = [6, 10, 12]: a liver block in slices 1-4, an aorta column in slices 2-3 only."""
    reference = np.zeros((6, 10, 12), dtype=np.uint8)
    reference[1:5, 2:6, 2:7] = 1
    reference[2:4, 7:9, 8:10] = 3
    prediction = reference.copy()
    prediction[prediction == 3] = 0  # the aorta is missed
    image = np.random.default_rng(0).normal(0, 1, reference.shape).astype(np.float32) + 3 * (reference > 0)
    return image, reference, prediction


def test_best_slice_shows_most_organs(quickstart):
    _, reference, _ = _toy_scan()
    assert quickstart._best_slice(reference, 0) in (2, 3)  # both organs
    assert quickstart._best_slice(reference, 1) in (2, 3, 4, 5)  # the liver rows (most foreground, one organ each)


def test_overlay_png_has_both_views_and_a_coloured_legend(quickstart, tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    image, reference, prediction = _toy_scan()
    path = quickstart.write_overlay_png(image, reference, prediction, (10.0, 6.0, 6.0), NAMES,
                                        tmp_path / "out" / "overlay.png", title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape[:2] == (750, 1000)
    tab20 = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:, :3]

    def shows(colour: np.ndarray) -> bool:
        return bool((np.abs(pixels - colour).max(axis=-1) < 0.02).any())

    assert shows(tab20[0]) and shows(tab20[2])  # legend patches of liver (1) and aorta (3, in the reference)
    assert not shows(tab20[1]) and not shows(tab20[3])  # adrenal gland and pancreas are in neither

    with pytest.raises(ValueError, match="same shape"):
        quickstart.write_overlay_png(image, reference[:-1], prediction, (10.0, 6.0, 6.0), NAMES, tmp_path / "x.png")


def test_cpu_demo_trainer_is_found_by_nnunet_with_its_own_fixed_schedule(nnunet_env, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_tak.trainers import nnUNetTrainerTAK
    from nnunetv2_tak.trainers.demo import nnUNetTrainerTAK_CPUDemo
    from nnunetv2_tak.trainers.schedules import CPUSchedule

    found = recursive_find_trainer_class_by_name("nnUNetTrainerTAK_CPUDemo")
    assert found is nnUNetTrainerTAK_CPUDemo and issubclass(found, CPUSchedule) and issubclass(found, nnUNetTrainerTAK)
    assert found.allow_random_text_encoder and not nnUNetTrainerTAK.allow_random_text_encoder
    monkeypatch.setenv("TAK_BENCH_EPOCHS", "3")  # the benchmark's override does not touch the demo

    def plans() -> dict:  # nnU-Net's run_training adds continue_training before building a trainer
        return {**json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text()), "continue_training": False}

    demo = found(plans(), "3d_fullres", 0, nnunet_env.dataset_json(), torch.device("cpu"))
    assert (demo.num_epochs, demo.num_iterations_per_epoch, demo.initial_lr) == (
        found.bench_epochs, found.bench_iterations, found.bench_learning_rate)
    stock = nnUNetTrainerTAK(plans(), "3d_fullres", 0, nnunet_env.dataset_json(), torch.device("cpu"))
    assert (stock.num_epochs, stock.num_iterations_per_epoch, stock.initial_lr) == (1000, 250, 1e-2)
