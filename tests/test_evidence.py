"""The benchmark's statistics (evidence): paired bootstrap, gap fraction, stuck organs,
pseudo-label overlap counts. Pure numpy, exact expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from evidence import (
    Interval,
    bootstrap_indices,
    dice_from_counts,
    gap_fraction,
    group_statistic,
    overlap_counts,
    paired_difference,
    stuck_organs,
)


def test_constant_difference_has_a_zero_width_interval_whatever_the_case_effects():
    rng = np.random.default_rng(1)
    case_effect = rng.uniform(0.0, 0.9, size=(12, 1))  # cases differ a lot in difficulty ...
    b = case_effect + rng.uniform(0.0, 0.05, size=(12, 3))
    a = b + 0.1  # ... but a beats b by exactly 0.1 on every case and organ: pairing cancels the rest
    interval = paired_difference(a, b, resamples=500, seed=0)
    assert interval.estimate == pytest.approx(0.1)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)
    assert interval.resolved
    assert interval.describe() == "+0.100 [0.100, 0.100]"


def test_two_units_interval_spans_their_differences():
    # differences 0 and 1: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    a, b = np.array([[0.5], [1.0]]), np.array([[0.5], [0.0]])
    interval = paired_difference(a, b, resamples=4000, seed=3)
    assert interval.estimate == pytest.approx(0.5)
    assert (interval.low, interval.high) == (0.0, 1.0)
    assert not interval.resolved  # the interval touches 0


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 4)), rng.random((20, 4))
    assert paired_difference(a, b, seed=7, resamples=300) == paired_difference(a, b, seed=7, resamples=300)
    assert paired_difference(a, b, seed=7, resamples=300) != paired_difference(a, b, seed=8, resamples=300)
    np.testing.assert_array_equal(bootstrap_indices(5, 10, seed=2), bootstrap_indices(5, 10, seed=2))


def test_group_statistic_is_the_tables_mean_and_skips_nan():
    values = np.array([[1.0, np.nan, 0.2], [0.0, np.nan, 0.4]])  # organ 1 absent everywhere
    assert group_statistic(values) == pytest.approx((0.5 + 0.3) / 2)
    assert group_statistic(values, organs=[2]) == pytest.approx(0.3)
    assert math.isnan(float(group_statistic(values, organs=[1])))
    assert math.isnan(paired_difference(values, values, organs=[1]).estimate)


def test_clustered_resample_draws_whole_seeds():
    clusters = np.array([0, 0, 0, 1, 1, 1])
    idx = bootstrap_indices(6, 200, seed=0, clusters=clusters)
    assert idx.shape == (200, 6)
    only_one_seed = [len(set(clusters[row])) == 1 for row in idx]
    assert any(only_one_seed)  # a resample may hold one seed only (flat resampling almost never does)
    # seed 0 wins by 0.2 on every case, seed 1 loses by 0.2: the flat interval is narrow around 0,
    # the clustered one spans both seeds' values
    a = np.array([[0.7]] * 3 + [[0.3]] * 3)
    b = np.full((6, 1), 0.5)
    clustered = paired_difference(a, b, resamples=2000, seed=0, clusters=clusters)
    assert clustered.low == pytest.approx(-0.2) and clustered.high == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one id per unit"):
        bootstrap_indices(6, 2, seed=0, clusters=[0, 1])


def test_paired_difference_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match=r"\[units, organs\]"):
        paired_difference(np.zeros((3, 2)), np.zeros((4, 2)))


def test_gap_fraction_exact_and_undefined():
    base = np.array([[0.2, 0.1], [0.4, 0.3]])
    ref = base + 0.4
    method = base + 0.1  # closes a quarter of the gap on every unit
    fraction = gap_fraction(method, base, ref, resamples=300, seed=0)
    assert fraction.interval.estimate == pytest.approx(0.25)
    assert fraction.interval.low == pytest.approx(0.25) and fraction.interval.high == pytest.approx(0.25)
    assert fraction.unstable == 0.0
    worse_reference = gap_fraction(method, base, base - 0.1, resamples=50)
    assert math.isnan(worse_reference.interval.estimate)
    assert worse_reference.describe().startswith("n/a")


def test_stuck_organs():
    assert stuck_organs({1: 0.9, 2: 0.0, 3: float("nan"), 4: 0.004}) == [2, 4]


def test_overlap_counts_and_dice():
    gt = np.array([[0, 1, 1], [2, 2, -1]])
    pred = np.array([[0, 1, 0], [2, 1, 2]])
    counts = overlap_counts(pred, gt, num_classes=4)  # the -1 voxel is skipped
    np.testing.assert_array_equal(counts, [[1, 1, 1, 0], [2, 2, 1, 0], [1, 2, 2, 0]])
    dice = dice_from_counts(counts + overlap_counts(pred, gt, 4))  # summed over two "cases"
    np.testing.assert_allclose(dice[:3], [2 / 3, 0.5, 2 / 3])
    assert math.isnan(dice[3])
    with pytest.raises(ValueError, match="differ in size"):
        overlap_counts(pred[:1], gt, 4)


def test_interval_describe_nan():
    assert Interval(float("nan"), float("nan"), float("nan")).describe() == "n/a"


def test_compare_runs_pairs_the_shared_seed_case_units_of_two_files(tmp_path, capsys):
    """Two per-case files (two schedules): only the (seed, case) pairs both have are compared."""
    import compare_runs

    def write(path, method, cases, offset):
        rows = ["method,seed,case,label,dice,nsd,hd95"]
        rows += [f"{method},0,{case},{label},{0.1 * label + offset + 0.01 * i},0,0"
                 for i, case in enumerate(cases) for label in (1, 2)]
        path.write_text("\n".join(rows) + "\n")

    write(tmp_path / "long.csv", "tak", ["c0", "c1", "c2"], 0.3)
    write(tmp_path / "short.csv", "tak", ["c1", "c2", "c3"], 0.2)  # c1, c2 shared (the i-offsets differ)
    assert compare_runs.main(["--a", f"{tmp_path / 'long.csv'}:tak", "--b", f"{tmp_path / 'short.csv'}:tak",
                              "--small-labels", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 (seed, case) pairs, seeds [0]" in out
    assert "mean over organs: +0.110 [0.110, 0.110]" in out and "small organs: +0.110 [0.110, 0.110]" in out
    with pytest.raises(SystemExit, match="no rows of method 'stock'"):
        compare_runs.main(["--a", f"{tmp_path / 'long.csv'}:stock", "--b", f"{tmp_path / 'short.csv'}:tak"])


def test_compare_runs_joins_the_reports_of_several_seeds_and_refuses_a_unit_twice(tmp_path, capsys):
    """``FILE,FILE:METHOD``: each seed's report once; the same (seed, case, organ) in two files stops."""
    import compare_runs

    for seed, offset in ((0, 0.3), (1, 0.5)):
        rows = ["method,seed,case,label,dice,nsd,hd95"] + [f"{m},{seed},c0,1,{offset + d},0,0"
                                                         for m, d in (("tak", 0.1), ("stock", 0.0))]
        (tmp_path / f"seed{seed}.csv").write_text("\n".join(rows) + "\n")
    both = f"{tmp_path / 'seed0.csv'},{tmp_path / 'seed1.csv'}"
    assert compare_runs.main(["--a", f"{both}:tak", "--b", f"{both}:stock"]) == 0
    out = capsys.readouterr().out
    assert "2 (seed, case) pairs, seeds [0, 1]" in out and "mean over organs: +0.100 [0.100, 0.100]" in out
    with pytest.raises(SystemExit, match="seed 0 case c0 label 1 is also in another file"):
        compare_runs.main(["--a", f"{tmp_path / 'seed0.csv'},{tmp_path / 'seed0.csv'}:tak", "--b", f"{both}:stock"])


def test_convergence_reads_the_schedule_and_the_organs_at_zero_from_a_finished_training(tmp_path, capsys):
    """A results folder as nnU-Net writes it (checkpoint_final.pth's log, validation/summary.json): the
    pseudo-Dice at the schedule's quarters, the last quarter's gain and the organs at 0 online and in the
    final validation; a method without a finished training is listed as skipped."""
    import json

    import convergence
    import torch

    raw = tmp_path / "nnUNet_raw" / "Dataset510_TAKBenchmark"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "adrenal": 2}}))
    fold = tmp_path / "nnUNet_results" / raw.name / "nnUNetTrainer_Bench__nnUNetPlans__3d_fullres" / "fold_2"
    (fold / "validation").mkdir(parents=True)
    ema = [0.1 * e for e in range(1, 9)]  # 8 epochs: quarters at epochs 2, 4, 6, 8
    per_class = [[0.5, 0.2]] * 5 + [[0.9, 0.0]] * 3  # the adrenal lost in the last 3 epochs
    torch.save({"logging": {"ema_fg_dice": ema, "dice_per_class_or_region": per_class}}, fold / "checkpoint_final.pth")
    (fold / "validation" / "summary.json").write_text(json.dumps({
        "foreground_mean": {"Dice": 0.45},
        "mean": {"1": {"Dice": 0.9, "n_ref": 10.0}, "2": {"Dice": 0.0, "n_ref": 3.0}}}))
    out_csv = tmp_path / "conv.csv"
    assert convergence.main(["--work-dir", str(tmp_path), "--seeds", "1", "--methods", "stock", "tak",
                             "--tail", "3", "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "| stock | 1 | 8 | 0.200 | 0.400 | 0.600 | 0.800 | +0.200 | 0.450 | adrenal | adrenal |" in out
    assert "not finished (skipped): tak_seed1" in out
    assert out_csv.read_text().splitlines()[1].startswith("stock,1,8,")
    with pytest.raises(SystemExit, match="no finished training"):
        convergence.main(["--work-dir", str(tmp_path), "--seeds", "0", "--methods", "stock"])
