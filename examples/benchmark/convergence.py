"""Has a schedule converged? What each finished benchmark training's own log says, without predicting again.

    python examples/benchmark/convergence.py --work-dir bench160 --seeds 0 1 \\
        --methods reference stock selftrain tak meanteacher

Per (method, seed) with a finished training (``checkpoint_final.pth``) in the work folder:

- nnU-Net's online validation pseudo-Dice (``ema_fg_dice``: the exponential moving average nnU-Net plots and
  selects ``checkpoint_best.pth`` by) at 1/4, 1/2, 3/4 and all of the schedule, and its change over the last
  quarter: a schedule whose last quarter still gains had not converged;
- the organs whose online pseudo-Dice (``dice_per_class_or_region``, averaged over the last ``--tail`` epochs)
  is 0: organs the network had not found on the validation patches when training stopped;
- the final validation of the whole validation cases (``validation/summary.json``, nnU-Net's own, written at the
  end of ``nnUNetv2_train``): mean foreground Dice and the organs at 0 there.

Everything here is on the validation split (the test scans are not read), so a schedule or a setting chosen from
it is chosen without the test scans. The benchmark's validation split is small (``--val`` cases per seed):
read the per-seed values, not only their mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selftrain
from cohort import DATASET_ID
from methods import METHODS, benchmark_model
from runs import CONFIGURATION, PLANS

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def training_folder(work: Path, method: str, seed: int) -> Path | None:
    """Results folder of ``method``'s (final) training of ``seed`` in ``work``; None when its dataset is absent.
    Built from ``work`` rather than ``Model.folder``, which reads nnU-Net's results path from the environment."""
    model = benchmark_model(method, seed)
    if method == "selftrain":
        model = selftrain.second_model(seed, model.trainer)
    datasets = sorted((work / "nnUNet_results").glob(f"Dataset{model.dataset_id:03d}_*"))
    return (datasets[0] / f"{model.trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{model.fold}"
            if datasets else None)


def read_training(folder: Path, labels: dict[int, str], tail: int) -> dict:
    """The convergence figures of one finished training (see the module docstring)."""
    import torch

    log = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    ema = np.asarray(log["ema_fg_dice"], dtype=float)
    epochs = len(ema)
    at = {f: float(ema[max(round(f * epochs) - 1, 0)]) for f in FRACTIONS}
    per_class = np.asarray(log["dice_per_class_or_region"][-tail:], dtype=float).mean(axis=0)  # [organs]
    organs = sorted(labels)
    if len(per_class) != len(organs):
        raise SystemExit(f"{folder}: the log has {len(per_class)} organs' pseudo-Dice, dataset.json {len(organs)} "
                         "labels; pass the --dataset-json this training was made from")
    row = {"epochs": epochs, **{f"ema_{round(100 * f)}pct": at[f] for f in FRACTIONS},
           "last_quarter_gain": at[1.0] - at[0.75],
           "online_zero": " ".join(labels[o] for o, d in zip(organs, per_class, strict=True) if d == 0)}
    summary = folder / "validation" / "summary.json"
    if summary.is_file():
        val = json.loads(summary.read_text())
        row["val_dice"] = float(val["foreground_mean"]["Dice"])
        row["val_zero"] = " ".join(labels[o] for o in organs
                                   if val["mean"].get(str(o), {}).get("n_ref", 0) > 0
                                   and val["mean"][str(o)]["Dice"] == 0)
    else:
        row["val_dice"], row["val_zero"] = float("nan"), "(no final validation)"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True, help="the benchmark's --work-dir")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["reference", "stock", "selftrain", "tak", "meanteacher"],
                   choices=sorted(METHODS))
    p.add_argument("--tail", type=int, default=10, help="epochs averaged for the organs' final online pseudo-Dice")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="default: WORK/nnUNet_raw/Dataset510_*/dataset.json (the organs' names)")
    p.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    dataset_json = args.dataset_json or next(iter(sorted(
        (args.work_dir / "nnUNet_raw").glob(f"Dataset{DATASET_ID:03d}_*/dataset.json"))), None)
    if dataset_json is None or not dataset_json.is_file():
        raise SystemExit(f"no dataset.json under {args.work_dir / 'nnUNet_raw'}; is {args.work_dir} a benchmark "
                         "work folder? (or pass --dataset-json)")
    labels = {v: k for k, v in json.loads(dataset_json.read_text())["labels"].items() if isinstance(v, int) and v > 0}
    rows, missing = [], []
    for method in args.methods:
        for seed in args.seeds:
            folder = training_folder(args.work_dir, method, seed)
            if folder is None or not (folder / "checkpoint_final.pth").is_file():
                missing.append(f"{method}_seed{seed}")
                continue
            rows.append({"method": method, "seed": seed, **read_training(folder, labels, args.tail)})
    if not rows:
        raise SystemExit(f"no finished training of {args.methods} seeds {args.seeds} in {args.work_dir}")
    cols = ["method", "seed", "epochs", *(f"ema_{round(100 * f)}pct" for f in FRACTIONS), "last_quarter_gain",
            "val_dice", "online_zero", "val_zero"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:+.3f}" if c == "last_quarter_gain" else
                                f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) or "-"
                                for c in cols) + " |")
    if missing:
        print(f"\nnot finished (skipped): {' '.join(missing)}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
