"""Evidence benchmark: few labels + unlabeled scans, stock nnU-Net vs TAK and its ablations, one command.

    python examples/benchmark.py                                   # CPU profile, seed 0, 5 methods
    python examples/benchmark.py --seeds 0 1 2 --methods stock tak tak_notext

Protocol (all through the stock nnU-Net commands):
  1. a seeded synthetic abdominal CT cohort in AMOS label order (15 organs, realistic relative sizes)
     with a training pool and a held-out test set (imagesTs/labelsTs) that no step ever looks at
     before the final evaluation;
  2. plan and preprocess once; every method trains on the same (shrunk, CPU-sized) plans;
  3. per seed, a few-label split of the pool (``--labeled`` cases keep labels, ``--val`` cases
     validate, the rest are unlabeled; their labels are never read) and a reference split that uses
     every pool case with labels (the fully supervised upper bound);
  4. train each method for the same number of iterations with the same optimizer;
  5. predict the test set from ``checkpoint_final.pth`` (no model selection on test data) with the
     stock ``nnUNetv2_predict`` and evaluate per class on the original image grid: Dice, NSD at
     ``--nsd-mm`` and HD95 in mm;
  6. print and save per-class tables (CSV and Markdown), means over all organs and over the large
     and small organs (by median volume in the test labels), and a bar plot per class and method.

Profiles: "cpu" (default; about 87 minutes on 2 CPU cores for the five default methods and one seed):
a 24x48x48 cohort at 10x6x6 mm, plans shrunk to 8..64 features (whole-volume patch, batch 2), 40 x 25
iterations; "gpu": a 96x192x192 cohort at 2.5x1.5x1.5 mm with the network nnU-Net plans, 400 x 25
iterations on CUDA (not run by the authors yet). Every method trains with the schedule of
``nnunetv2_tak.benchmark_trainers`` (AdamW 3e-3 with poly decay, intensity augmentation only).

Text: "tak" uses the real CLIP text embeddings of ``--text-embeddings`` (16 AMOS classes, imported
with ``nnUNetv2_tak_encode_prompts --embeddings``); "tak_randomtext" seeded random text;
"tak_notext" learned class embeddings. Without the embeddings file "tak" stops with an error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nnunetv2_tak.workspace import use_workspace

DATASET_ID = 510
BIN = Path(sys.executable).parent
DEFAULT_EMBEDDINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tak_amos_text_embeddings.pth"

# method -> (trainer, split kind)
METHODS = {
    "reference": ("nnUNetTrainer_Bench", "reference"),  # all pool labels: the upper bound
    "stock": ("nnUNetTrainer_Bench", "few"),  # labeled cases only
    "tak": ("nnUNetTrainerTAK_Bench", "few"),
    "tak_notext": ("nnUNetTrainerTAK_NoText_Bench", "few"),
    "tak_randomtext": ("nnUNetTrainerTAK_RandomText_Bench", "few"),
    "tak_nocontrastive": ("nnUNetTrainerTAK_NoContrastive_Bench", "few"),
    "tak_nounlabeled": ("nnUNetTrainerTAK_NoUnlabeled_Bench", "few"),
    "tak_unsup_dicece": ("nnUNetTrainerTAK_ConfidentDiceCE_Bench", "few"),  # pseudo-label loss alternative
}
PROFILES = {  # cohort shape/spacing, network width (None: as planned), batch, epochs of 25 iterations, device
    "cpu": {"shape": (24, 48, 48), "spacing": (10.0, 6.0, 6.0), "features": (8, 64), "batch": 2, "epochs": 40,
            "device": "cpu"},
    "gpu": {"shape": (96, 192, 192), "spacing": (2.5, 1.5, 1.5), "features": None, "batch": None, "epochs": 400,
            "device": "cuda"},
}


def run(*cmd: str, log: Path | None = None) -> float:
    """Run a console script of this environment; returns wall seconds; output to ``log``."""
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def prepare(work: Path, args: argparse.Namespace) -> Path:
    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import CohortSpec, generate_dataset

    profile = PROFILES[args.profile]
    raw = work / "nnUNet_raw"
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    dataset = existing[0] if existing else generate_dataset(
        raw, DATASET_ID, "TAKBenchmark", num_training=args.pool, num_test=args.test,
        spec=CohortSpec(shape=profile["shape"], spacing=profile["spacing"]), seed=1000)
    pre = work / "nnUNet_preprocessed" / dataset.name
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2",
            log=work / "logs" / "plan_and_preprocess.txt")
        if profile["features"]:
            shrink_plans_file(pre / "nnUNetPlans.json", "3d_fullres", base_features=profile["features"][0],
                              max_features=profile["features"][1], batch_size=profile["batch"])
    if any(METHODS[m][0].startswith("nnUNetTrainerTAK_Bench") for m in args.methods):
        if not Path(args.text_embeddings).is_file():
            raise SystemExit(f"method 'tak' needs real text embeddings; {args.text_embeddings} does not exist "
                             "(pass --text-embeddings FILE or leave 'tak' out of --methods)")
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--embeddings", str(args.text_embeddings),
            "--force", log=work / "logs" / "encode_prompts.txt")
    return dataset


def write_splits(pre: Path, pool: list[str], args: argparse.Namespace) -> None:
    """Per seed s: fold 2s = few-label split (``--labeled`` labeled, ``--val`` validation, the rest
    unlabeled), fold 2s+1 = the same validation cases with every other pool case labeled (reference)."""
    from nnunetv2_tak.splits import few_label_split

    splits = []
    for seed in range(max(args.seeds) + 1):
        order = np.random.default_rng(seed).permutation(pool).tolist()
        few = few_label_split(pool, labeled=order[:args.labeled], val=order[args.labeled:args.labeled + args.val])
        splits += [few, {"train": sorted(few["train"] + few["unlabeled"]), "val": few["val"]}]
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=1))


def evaluate(pred_dir: Path, gt_dir: Path, labels: dict[int, str], tolerance: float) -> dict[int, dict[str, float]]:
    """Mean over test cases per label of Dice / NSD / HD95 (NaN where a class is absent from both)."""
    import SimpleITK as sitk

    from nnunetv2_tak.metrics import case_metrics

    per_label: dict[int, dict[str, list[float]]] = {k: {"dice": [], "nsd": [], "hd95": []} for k in labels}
    for gt_file in sorted(gt_dir.glob("*.nii.gz")):
        gt_img = sitk.ReadImage(str(gt_file))
        pred_img = sitk.ReadImage(str(pred_dir / gt_file.name))
        spacing = tuple(reversed(gt_img.GetSpacing()))
        gt, pred = sitk.GetArrayFromImage(gt_img), sitk.GetArrayFromImage(pred_img)
        for label, m in case_metrics(pred, gt, spacing, list(labels), tolerance).items():
            per_label[label]["dice"].append(m.dice)
            per_label[label]["nsd"].append(m.nsd)
            per_label[label]["hd95"].append(m.hd95)
    with np.errstate(all="ignore"):
        return {k: {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                    for name, v in vals.items()} for k, vals in per_label.items()}


def training_stats(fold_dir: Path) -> dict[str, float]:
    """From nnU-Net's log in checkpoint_final.pth: median epoch seconds and, for TAK, the final
    confident pseudo-label fraction of the unlabeled voxels (NaN where not logged)."""
    import torch

    log = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    epoch_s = np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"])
    coverage = log.get("tak_pl_coverage") or [float("nan")]
    return {"epochs": len(epoch_s), "epoch_s": float(np.median(epoch_s)), "pl_coverage": float(coverage[-1])}


def organ_groups(gt_dir: Path, labels: dict[int, str], threshold_ml: float) -> tuple[list[int], list[int]]:
    """(large, small) labels by median volume in the test labels."""
    import SimpleITK as sitk

    volumes: dict[int, list[float]] = {k: [] for k in labels}
    for gt_file in sorted(gt_dir.glob("*.nii.gz")):
        img = sitk.ReadImage(str(gt_file))
        voxel_ml = float(np.prod(img.GetSpacing())) / 1000.0
        counts = np.bincount(sitk.GetArrayFromImage(img).ravel(), minlength=max(labels) + 1)
        for k in labels:
            if counts[k]:
                volumes[k].append(counts[k] * voxel_ml)
    median = {k: float(np.median(v)) if v else 0.0 for k, v in volumes.items()}
    small = [k for k in labels if median[k] < threshold_ml]
    return [k for k in labels if k not in small], small


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="benchmark_work")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS)[:5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pool", type=int, default=20, help="training pool (labeled + unlabeled + validation)")
    p.add_argument("--labeled", type=int, default=4)
    p.add_argument("--val", type=int, default=2)
    p.add_argument("--test", type=int, default=6)
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs (x 25 iterations)")
    p.add_argument("--nsd-mm", type=float, default=6.0, help="NSD tolerance in mm (default: one in-plane voxel "
                                                              "of the CPU profile)")
    p.add_argument("--small-ml", type=float, default=100.0, help="organs with median volume below are 'small'")
    p.add_argument("--reuse", action="store_true", help="reuse trainings that already have checkpoint_final.pth "
                                                          "in --work-dir (only after a run with the same settings)")
    p.add_argument("--text-embeddings", default=os.environ.get("TAK_TEXT_EMBEDDINGS", str(DEFAULT_EMBEDDINGS)))
    args = p.parse_args(argv)

    work = Path(args.work_dir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    use_workspace(work)  # nnU-Net folders inside work/, CPU-friendly defaults
    profile = PROFILES[args.profile]
    os.environ["TAK_BENCH_EPOCHS"] = str(args.epochs or profile["epochs"])
    from nnunetv2.utilities.file_path_utilities import get_output_folder  # reads nnUNet_results at import

    started = time.time()
    dataset = prepare(work, args)
    pre = work / "nnUNet_preprocessed" / dataset.name
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    labels = {int(v): k for k, v in dataset_json["labels"].items() if int(v) > 0}
    pool = sorted(f.name[:-len("_0000.nii.gz")] for f in (dataset / "imagesTr").glob("*_0000.nii.gz"))
    write_splits(pre, pool, args)
    large, small = organ_groups(dataset / "labelsTs", labels, args.small_ml)

    rows, costs = [], []
    for seed in args.seeds:
        for method in args.methods:
            trainer, kind = METHODS[method]
            fold = 2 * seed + (1 if kind == "reference" else 0)
            tag = f"{method}_seed{seed}"
            output = Path(get_output_folder(DATASET_ID, trainer, "nnUNetPlans", "3d_fullres", fold))
            if args.reuse and (output / "checkpoint_final.pth").is_file():
                print(f"{tag}: reusing the finished training in {output}", flush=True)
                train_s = float("nan")
            else:
                train_s = run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", str(fold), "-tr", trainer, "-device",
                              profile["device"], log=work / "logs" / f"train_{tag}.txt")
            pred = work / "predictions" / tag
            predict_s = run("nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(pred), "-d",
                            str(DATASET_ID), "-c", "3d_fullres", "-f", str(fold), "-tr", trainer, "-chk",
                            "checkpoint_final.pth", "-device", profile["device"], "--disable_tta", "-npp", "1",
                            "-nps", "1", log=work / "logs" / f"predict_{tag}.txt")
            scores = evaluate(pred, dataset / "labelsTs", labels, args.nsd_mm)
            for label, metric in scores.items():
                rows.append({"method": method, "seed": seed, "label": label, "organ": labels[label], **metric})
            costs.append({"method": method, "seed": seed, "train_min": train_s / 60, "predict_s": predict_s,
                          **training_stats(output)})
            print(f"{tag}: train {train_s / 60:.1f} min, predict {predict_s:.0f} s, mean Dice "
                  f"{np.nanmean([s['dice'] for s in scores.values()]):.3f}", flush=True)
            write_report(work, rows, costs, labels, large, small, args)
    print(f"\ntotal wall time {(time.time() - started) / 60:.1f} min; report in {work / 'report'}")
    return 0


def write_report(work: Path, rows: list[dict], costs: list[dict], labels: dict[int, str], large: list[int],
                 small: list[int], args: argparse.Namespace) -> None:
    """CSV of every (method, seed, organ) and of the costs; Markdown table of per-organ means (spread over
    seeds) and of the cost ratios to the stock trainer; plot."""
    out = work / "report"
    out.mkdir(exist_ok=True)
    for name, table in (("per_class.csv", rows), ("cost.csv", costs)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def cell(method: str, group: list[int], metric: str) -> str:
        per_seed = []
        for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
            values = [r[metric] for r in rows if r["method"] == method and r["seed"] == seed and r["label"] in group]
            with np.errstate(all="ignore"):
                per_seed.append(float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"))
        finite = [v for v in per_seed if np.isfinite(v)]
        if not finite:
            return "nan"
        digits = 1 if metric == "hd95" else 3
        spread = f" ± {np.std(finite):.{digits}f}" if len(finite) > 1 else ""
        return f"{np.mean(finite):.{digits}f}{spread}"

    lines = [f"Seeds {args.seeds}; test set {args.test} scans; NSD tolerance {args.nsd_mm} mm; small organs "
             f"(median volume < {args.small_ml} ml): {', '.join(labels[k] for k in small)}.", ""]
    for metric, title in (("dice", "Dice"), ("nsd", f"NSD@{args.nsd_mm}mm"), ("hd95", "HD95 [mm]")):
        lines += [f"### {title}", "", "| organ | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for label, name in labels.items():
            lines.append(f"| {name} | " + " | ".join(cell(m, [label], metric) for m in methods) + " |")
        for group, gname in ((list(labels), "**mean**"), (large, "**large organs**"), (small, "**small organs**")):
            lines.append(f"| {gname} | " + " | ".join(cell(m, group, metric) for m in methods) + " |")
        lines.append("")
    lines += cost_table(costs)
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines[:len(labels) + 9] + cost_table(costs)))
    _plot(out, rows, labels, methods)


def cost_table(costs: list[dict]) -> list[str]:
    """Markdown lines: per method the median epoch time, prediction wall time of the test set, and their
    ratios to the stock trainer's (same plans, same iterations, one machine, one run)."""
    def median(method: str, key: str) -> float:
        values = [c[key] for c in costs if c["method"] == method]
        return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")

    methods = list(dict.fromkeys(c["method"] for c in costs))
    base = "stock" if "stock" in methods else methods[0]
    lines = [f"### Cost (median over seeds; ratios to {base})", "",
             "| method | s / epoch | x | predict test set [s] | x | confident pseudo-labels (last epoch) |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        epoch_s, predict_s, coverage = median(m, "epoch_s"), median(m, "predict_s"), median(m, "pl_coverage")
        lines.append(f"| {m} | {epoch_s:.1f} | {epoch_s / median(base, 'epoch_s'):.2f} | {predict_s:.1f} | "
                     f"{predict_s / median(base, 'predict_s'):.2f} | "
                     f"{'-' if np.isnan(coverage) else f'{coverage:.1%}'} |")
    return [*lines, ""]


def _plot(out: Path, rows: list[dict], labels: dict[int, str], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(18, 6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        means = []
        for label in labels:
            values = [r["dice"] for r in rows if r["method"] == method and r["label"] == label]
            with np.errstate(all="ignore"):
                means.append(np.nanmean(values) if np.isfinite(values).any() else 0.0)
        ax.bar(np.arange(len(labels)) + i * width, means, width, label=method)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, [labels[k] for k in labels], rotation=45, ha="right")
    ax.set_ylabel("Dice (test set, mean over cases and seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dice_per_class.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
