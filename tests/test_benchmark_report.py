"""The evidence benchmark's own helpers (examples/benchmark/): splits, organ groups, evaluation on files,
and the report tables. The training runs themselves are the stock CLI (test_benchmark_runs.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cohort import organ_groups, write_splits
from methods import COMPARISONS, cost_row, parse_externals
from report import write_report
from scoring import evaluate_cases, keeps_snapshots, mean_over_cases


def _write_labels(path: Path, labels: np.ndarray, spacing_zyx: tuple[float, float, float]) -> None:
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path))


def test_splits_few_label_and_reference_share_validation(tmp_path):
    pool = [f"case_{i:03d}" for i in range(10)]
    write_splits(tmp_path, pool, argparse.Namespace(seeds=[0, 1], labeled=3, val=2))
    splits = json.loads((tmp_path / "splits_final.json").read_text())
    assert len(splits) == 4  # per seed: few-label fold 2s, reference fold 2s+1
    for seed in (0, 1):
        few, reference = splits[2 * seed], splits[2 * seed + 1]
        assert len(few["train"]) == 3 and len(few["val"]) == 2 and len(few["unlabeled"]) == 5
        assert not (set(few["train"]) & set(few["val"]) or set(few["unlabeled"]) & set(few["train"] + few["val"]))
        assert set(few["train"] + few["val"] + few["unlabeled"]) == set(pool)
        assert reference["val"] == few["val"]
        assert sorted(reference["train"]) == sorted(few["train"] + few["unlabeled"])
        assert "unlabeled" not in reference
    assert splits[0]["train"] != splits[2]["train"]  # seeds draw different labeled cases
    write_splits(tmp_path, pool, argparse.Namespace(seeds=[0], labeled=3, val=2))  # a later run, fewer seeds
    assert json.loads((tmp_path / "splits_final.json").read_text()) == splits  # seed 1's folds are kept


def test_organ_groups_by_median_test_volume(tmp_path):
    # spacing 10 x 10 x 10 mm: one voxel is 1 ml
    for i, (big, tiny) in enumerate(((200, 5), (150, 0), (300, 9))):
        labels = np.zeros(1000, np.uint8)
        labels[:big] = 1
        labels[big:big + tiny] = 2
        _write_labels(tmp_path / f"case_{i}.nii.gz", labels.reshape(10, 10, 10), (10.0, 10.0, 10.0))
    large, small = organ_groups(tmp_path, {1: "liver", 2: "adrenal", 3: "absent"}, threshold_ml=100.0)
    assert large == [1]
    assert small == [2, 3]  # median of the cases containing it (7 ml); never present counts as small


def test_evaluate_reads_files_on_their_grid(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[1:3, 2:6, 2:6] = 1  # 32 voxels
    pred = np.zeros_like(gt)
    pred[1:3, 2:6, 2:4] = 1  # half of it
    _write_labels(gt_dir / "a.nii.gz", gt, (5.0, 1.0, 1.0))
    _write_labels(pred_dir / "a.nii.gz", pred, (5.0, 1.0, 1.0))
    labels = {1: "liver", 2: "spleen"}
    scores = mean_over_cases(evaluate_cases(pred_dir, gt_dir, labels, tolerance=1.0), labels)
    assert list(evaluate_cases(pred_dir, gt_dir, {1: "liver"}, tolerance=1.0)) == ["a"]
    assert scores[1]["dice"] == pytest.approx(2 * 16 / (32 + 16))
    assert scores[1]["hd95"] == pytest.approx(2.0)  # the missed half lies up to 2 mm in x from the prediction
    assert np.isnan(scores[2]["dice"])  # absent from both: not counted


def test_evaluation_counts_where_each_true_voxel_was_predicted(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[0, :2] = 1  # 8 voxels of label 1
    pred = gt.copy()
    pred[0, 0, :3] = 2  # 3 of them predicted as label 2
    pred[1, 3, 3] = 1  # one background voxel predicted as 1
    for folder, data in ((gt_dir, gt), (pred_dir, pred)):
        _write_labels(folder / "a.nii.gz", data, (1.0, 1.0, 1.0))
        _write_labels(folder / "b.nii.gz", gt, (1.0, 1.0, 1.0))  # a second, perfect case
    counts = np.zeros((3, 3), dtype=np.int64)
    evaluate_cases(pred_dir, gt_dir, {1: "liver", 2: "spleen"}, tolerance=1.0, confusion=counts)
    assert counts.tolist() == [[2 * 24 - 1, 1, 0], [0, 5 + 8, 3], [0, 0, 0]]


def test_which_trainers_keep_teacher_snapshots():
    assert keeps_snapshots("nnUNetTrainerTAK_Bench")
    assert keeps_snapshots("nnUNetTrainerTAK_RawText_Bench")
    assert not keeps_snapshots("nnUNetTrainerTAK_NoUnlabeled_Bench")  # no teacher
    assert not keeps_snapshots("nnUNetTrainer_Bench")


def test_report_means_spread_groups_and_cost_ratios(tmp_path):
    labels = {1: "liver", 2: "adrenal"}
    rows = []
    for seed, (liver, adrenal) in enumerate(((0.9, 0.1), (0.7, 0.3))):
        rows += [{"method": "stock", "seed": seed, "label": 1, "organ": "liver", "dice": liver, "nsd": liver,
                  "hd95": 10.0},
                 {"method": "stock", "seed": seed, "label": 2, "organ": "adrenal", "dice": adrenal, "nsd": adrenal,
                  "hd95": 20.0},
                 {"method": "tak", "seed": seed, "label": 1, "organ": "liver", "dice": liver, "nsd": liver,
                  "hd95": 10.0},
                 {"method": "tak", "seed": seed, "label": 2, "organ": "adrenal", "dice": float("nan"),
                  "nsd": float("nan"), "hd95": float("nan")}]
    stats = {"stock": {"epochs": 2, "epoch_s": 4.0, "train_wall_min": 2.0, "pl_coverage": float("nan")},
             "tak": {"epochs": 2, "epoch_s": 10.0, "train_wall_min": 5.0, "pl_coverage": 0.5},
             "selftrain": {"epochs": 2, "epoch_s": 4.0, "train_wall_min": 3.0, "pl_coverage": float("nan")}}
    extra = {"selftrain": {"first_train_wall_min": 2.0, "pseudo_label_predict_s": 30.0, "preprocess_s": 30.0}}
    costs = [cost_row(m, s, 60.0, {"tak": 12.0}.get(m, 10.0), stats[m], extra.get(m, {}))
             for m in ("stock", "tak", "selftrain") for s in (0, 1)]
    assert costs[-1]["total_min"] == pytest.approx(2.0 + 0.5 + 0.5 + 3.0)  # stock + pool prediction + dataset + own
    args = argparse.Namespace(seeds=[0, 1], test=6, nsd_mm=2.0, small_ml=100.0, bootstrap=200)
    write_report(tmp_path, rows, costs, labels, [1], [2], args, n_test=3)

    report = (tmp_path / "report" / "results.md").read_text().splitlines()
    assert "Test set: 3 scans (labelsTs)" in report[0]  # counted, not the generation argument
    dice = report[report.index("### Dice"):]
    assert dice[2] == "Large organs (median test volume >= 100.0 ml): liver. Small organs (< 100.0 ml): adrenal."
    assert "| liver | 0.800 ± 0.100 | 0.800 ± 0.100 |" in dice
    assert "| adrenal | 0.200 ± 0.100 | nan |" in dice
    assert "| **mean** | 0.500 ± 0.000 | 0.800 ± 0.100 |" in dice  # per-seed means, then over seeds
    assert "| **small organs** | 0.200 ± 0.100 | nan |" in dice
    assert "| stock | 4.0 | 1.00 | 2.0 | 2.0 | 1.00 | 10.0 | 1.00 | - |" in report
    assert "| tak | 10.0 | 2.50 | 5.0 | 5.0 | 2.50 | 12.0 | 1.20 | 50.0% |" in report
    assert "| selftrain | 4.0 | 1.00 | 3.0 | 6.0 | 3.00 | 10.0 | 1.00 | - |" in report
    assert ("selftrain's total: the stock training it starts from 2.0 min + the pool's pseudo-labels "
            "(nnUNetv2_predict) 30 s + its dataset (nnUNetv2_move_plans_between_datasets, nnUNetv2_preprocess) "
            "30 s + its own training 3.0 min.") in report
    assert len((tmp_path / "report" / "per_class.csv").read_text().splitlines()) == 1 + len(rows)
    assert len((tmp_path / "report" / "cost.csv").read_text().splitlines()) == 1 + len(costs)
    assert (tmp_path / "report" / "dice_per_class.png").stat().st_size > 0


def _case_rows(method: str, seeds: list[int], liver: float, adrenal: float, zero_adrenal_seed: int | None = None):
    """3 test cases per seed; case difficulty shifts every method alike (pairing must cancel it)."""
    rows = []
    for seed in seeds:
        for c, shift in enumerate((0.0, -0.2, -0.4)):
            a = 0.0 if seed == zero_adrenal_seed else adrenal + shift / 2
            rows += [{"method": method, "seed": seed, "case": f"case_{c}", "label": 1, "dice": liver + shift / 4,
                      "nsd": 0.5, "hd95": 5.0},
                     {"method": method, "seed": seed, "case": f"case_{c}", "label": 2, "dice": a, "nsd": 0.5,
                      "hd95": 5.0}]
    return rows


def _mean_rows(case_rows: list[dict]) -> list[dict]:
    rows = {}
    for r in case_rows:
        key = (r["method"], r["seed"], r["label"])
        rows.setdefault(key, []).append(r["dice"])
    return [{"method": m, "seed": s, "label": k, "organ": {1: "liver", 2: "adrenal"}[k], "dice": float(np.mean(v)),
             "nsd": 0.5, "hd95": 5.0} for (m, s, k), v in rows.items()]


def test_report_paired_differences_gap_stuck_organs_and_partial_results(tmp_path):
    labels = {1: "liver", 2: "adrenal"}
    case_rows = (_case_rows("reference", [0, 1], 0.9, 0.7)
                 + _case_rows("stock", [0, 1], 0.8, 0.3, zero_adrenal_seed=1)  # stock misses it in seed 1
                 + _case_rows("tak", [0, 1], 0.8, 0.4)
                 + _case_rows("tak_notext", [0], 0.85, 0.4, zero_adrenal_seed=0))  # one seed only
    for r in case_rows:
        if r["method"] == "tak" and r["seed"] == 1 and r["label"] == 2:
            r["dice"] = 0.1  # tak - stock = +0.1 on the adrenal on every scan and seed
    rows = _mean_rows(case_rows)
    costs = [{"method": m, "seed": 0, "train_min": 1.0, "predict_s": 10.0, "epochs": 2, "epoch_s": 4.0,
              "pl_coverage": float("nan")} for m in ("reference", "stock", "tak", "tak_notext")]
    counts = [[[0] * 3, [10, 0, 0], [10, 4, 5]], [[8, 4, 1], [10, 5, 1], [10, 4, 2]]]  # [epoch][3][C=3]
    pl_epoch5_only = [{"epoch": 5, "counts": counts[0]}]
    pl = {("tak", 0): [{"epoch": 5, "counts": counts[0]}, {"epoch": 10, "counts": counts[1]}],
          ("tak_notext", 0): pl_epoch5_only, ("tak", 1): []}
    args = argparse.Namespace(seeds=[0, 1], test=6, nsd_mm=2.0, small_ml=100.0, bootstrap=300)
    confusion = {m: np.array([[90, 5, 5], [10, 80, 10], [0, 2, 8]]) for m in ("reference", "stock", "tak_notext")}
    confusion["tak"] = np.array([[90, 5, 5], [10, 60, 30], [0, 2, 8]])  # a third of the liver called adrenal
    confusions = {(m, s): c for m, c in confusion.items() for s in (0, 1)}
    write_report(tmp_path, rows, costs, labels, [1], [2], args, n_test=3, case_rows=case_rows,
                       pl_quality=pl, epochs=40, reference_epochs=120, confusions=confusions)
    report = (tmp_path / "report" / "results.md").read_text()

    assert "except the fully supervised reference: 120 epochs" in report
    assert "| stock | none | adrenal |" in report  # stuck organs per seed
    assert "| tak_notext | adrenal | - |" in report  # seed 1 not run
    lines = report.splitlines()
    assert ("- **tak - stock** (6 (seed, case) pairs of seeds [0, 1]; too few pairs for a bootstrap interval to "
            "mean much):") in lines
    assert ("  - tak - stock on small organs: +0.100 [0.100, 0.100], resolved (tak better); seeds resampled as "
            "clusters [0.100, 0.100], resolved") in lines
    assert any(line.startswith("  - tak - stock on large organs: +0.000 [0.000, 0.000], not resolved")
               for line in lines)
    assert ("- **tak - tak_notext** (3 (seed, case) pairs of seeds [0]; seeds [1] skipped: only one of the two "
            "has them; too few pairs for a bootstrap interval to mean much):") in lines
    assert ("- Not compared (one side has no results): tak - selftrain, tak - meanteacher, tak - tak_randomtext, "
            "tak - tak_shuffledtext, tak - tak_rawtext, tak - tak_nounlabeled, tak - tak_nocontrastive, "
            "tak_rawtext - stock, tak_unsup_dicece - tak.") in lines
    assert "  - organs worse with tak than with tak_notext beyond the interval: liver -0.05 [-0.05, -0.05]" in lines
    assert ("  - where those organs' test voxels went (tak / tak_notext, seeds [0]): liver: adrenal 30% / 10%, "
            "background 10% / 10%") in lines
    csv_rows = (tmp_path / "report" / "confusion.csv").read_text().splitlines()
    assert csv_rows[0] == "method,seed,true_label,predicted_label,voxels" and "tak,1,1,2,30" in csv_rows
    assert "| adrenal | **+0.10 [0.10, 0.10]** |" in report  # per-organ table, first column tak - stock
    # adrenal: the reference is 0.4 above stock in seed 0 and 0.7/0.6/0.5 in seed 1 (stock 0): 0.1 / 0.5
    gap = next(line for line in lines if line.startswith("- tak (seeds"))
    assert "large organs: +0.00 [0.00, 0.00]" in gap
    assert "small organs: +0.20 [" in gap

    pl_lines = report[report.index("### Pseudo-label quality"):].splitlines()
    assert "| 5 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |" in pl_lines  # classes: (bg,) liver, adrenal
    assert "| 10 | 0.78 | 0.89 | 0.67 | 0.89 | 0.67 |" in pl_lines
    assert "| predicted / true voxels, last snapshot | | | | 1.25 | 0.50 |" in pl_lines  # over / under-segmented
    assert "Classes the teacher does not predict at all at its last snapshot: seed 0 (epoch 10): none." in pl_lines
    assert "No teacher snapshots (trained before the benchmark trainers kept them): tak seed 1." in pl_lines
    assert (tmp_path / "report" / "pseudo_label_quality.png").stat().st_size > 0
    assert len((tmp_path / "report" / "per_case.csv").read_text().splitlines()) == 1 + len(case_rows)
    assert "Classes the teacher does not predict at all at its last snapshot: seed 0 (epoch 5): liver, adrenal." \
        in pl_lines  # tak_notext
    assert len((tmp_path / "report" / "pseudo_label_quality.csv").read_text().splitlines()) == 1 + 3 * 2


def test_external_predictions_are_named_checked_and_compared_with_stock_and_tak(tmp_path):
    assert parse_externals(["old=runs/tak_seed{seed}"]) == {"old": "runs/tak_seed{seed}"}
    for bad, says in (("old=runs/tak_seed0", "{seed}"), ("runs/tak_seed{seed}", "NAME=FOLDER"),
                      ("tak=runs/{seed}", "taken"), ("=runs/{seed}", "NAME=FOLDER")):
        with pytest.raises(SystemExit, match=says):
            parse_externals([bad])
    with pytest.raises(SystemExit, match="taken"):
        parse_externals(["old=a{seed}", "old=b{seed}"])

    labels = {1: "liver", 2: "adrenal"}
    case_rows = (_case_rows("stock", [0, 1], 0.8, 0.3) + _case_rows("tak", [0, 1], 0.8, 0.4)
                 + _case_rows("old", [0, 1], 0.8, 0.35))
    args = argparse.Namespace(seeds=[0, 1], test=6, nsd_mm=2.0, small_ml=100.0, bootstrap=200)
    comparisons = [*COMPARISONS, ("old", "stock"), ("tak", "old")]
    write_report(tmp_path, _mean_rows(case_rows), [], labels, [1], [2], args, n_test=3,
                       case_rows=case_rows, comparisons=comparisons)
    lines = (tmp_path / "report" / "results.md").read_text().splitlines()
    assert any(line.startswith("  - old - stock on small organs: +0.050 [0.050, 0.050], resolved (old better)")
               for line in lines)
    assert any(line.startswith("  - tak - old on small organs: +0.050 [0.050, 0.050], resolved (tak better)")
               for line in lines)
    assert "| liver | 0.750 ± 0.000 | 0.750 ± 0.000 | 0.750 ± 0.000 |" in lines  # three method columns
