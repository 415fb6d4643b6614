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
     and small organs (by median volume in the test labels), and a bar plot per class and method;
  7. paired differences between methods (TAK - stock, TAK - each ablation, raw text - stock) on the
     mean, the small-organ mean and each organ, with a bootstrap 95% interval over (seed, test case)
     pairs that both methods have (evidence), the fraction of the stock-to-reference gap
     closed, and per method and seed the organs stuck at 0 Dice;
  8. pseudo-label quality over training: the TAK benchmark trainers keep the EMA teacher's weights every
     5 epochs; after training, each snapshot predicts the unlabeled pool cases of the few-label split
     (nnU-Net's sliding-window predictor on the preprocessed case) and its argmax is scored per class
     against those cases' labels, which training never read (pseudo_label_quality.csv/.png).

With ``--reference-epochs N`` the fully supervised reference trains N epochs (its own results folder,
trainer nnUNetTrainer_BenchReference) instead of the shared budget, so that it is an upper bound; the
report says so. ``--external NAME=FOLDER{seed}`` scores another build's (or tool's) test predictions as one
more method, paired with stock and tak on the same scans (e.g. an earlier release of this plugin).
``--report-only`` trains nothing: it predicts and reports whatever of ``--methods`` x ``--seeds`` has finished
(e.g. while other seeds still train; the splits file keeps every seed's folds and is replaced atomically).

Profiles: "cpu" (default; about 87 minutes on 2 CPU cores for the five default methods and one seed):
a 24x48x48 cohort at 10x6x6 mm, plans shrunk to 8..64 features (whole-volume patch, batch 2), 40 x 25
iterations; "gpu": a 96x192x192 cohort at 2.5x1.5x1.5 mm with the network nnU-Net plans, 400 x 25
iterations on CUDA (not run by the authors yet). Every method trains with the schedule of
``bench_trainers`` (AdamW 3e-3 with poly decay, intensity augmentation only).

Text: "tak" uses the real CLIP text embeddings of ``--text-embeddings`` (16 AMOS classes, imported
with ``nnUNetv2_tak_encode_prompts --embeddings``), centred across classes as the plugin's default;
"tak_rawtext" the same text uncentred (the reference code's handling); "tak_randomtext" seeded random text;
"tak_notext" learned class embeddings. Without the embeddings file the methods that read the text stop
with an error.
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
from workspace import use_workspace

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
    "tak_rawtext": ("nnUNetTrainerTAK_RawText_Bench", "few"),  # the CLIP text uncentred (the reference's)
    "tak_unsup_dicece": ("nnUNetTrainerTAK_ConfidentDiceCE_Bench", "few"),  # pseudo-label loss alternative
}
REFERENCE_LONG = "nnUNetTrainer_BenchReference"  # the reference with --reference-epochs
# paired differences reported (a - b), where both methods have results
COMPARISONS = [("tak", "stock"), ("tak", "tak_notext"), ("tak", "tak_randomtext"), ("tak", "tak_rawtext"),
               ("tak", "tak_nounlabeled"), ("tak", "tak_nocontrastive"), ("tak_rawtext", "stock"),
               ("tak_unsup_dicece", "tak")]
TEXT_FREE = ("tak_notext", "tak_randomtext")  # TAK methods that do not read the prompts' text
STUCK_DICE = 0.01  # an organ whose test mean Dice is below this is "stuck at 0"
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
    reading_text = [m for m in args.methods if m.startswith("tak") and m not in TEXT_FREE]
    if reading_text:
        if not Path(args.text_embeddings).is_file():
            raise SystemExit(f"{', '.join(reading_text)} need(s) real text embeddings; {args.text_embeddings} does "
                             f"not exist (pass --text-embeddings FILE or leave them out of --methods)")
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--embeddings", str(args.text_embeddings),
            "--force", log=work / "logs" / "encode_prompts.txt")
    return dataset


def write_splits(pre: Path, pool: list[str], args: argparse.Namespace) -> None:
    """Per seed s: fold 2s = few-label split (``--labeled`` labeled, ``--val`` validation, the rest
    unlabeled), fold 2s+1 = the same validation cases with every other pool case labeled (reference)."""
    from nnunetv2_tak.unlabeled.splits import few_label_split

    path = pre / "splits_final.json"
    seeds = max(args.seeds) + 1
    if path.is_file():  # keep the folds of seeds other runs asked for (each seed's folds are fixed by the seed)
        seeds = max(seeds, len(json.loads(path.read_text())) // 2)
    splits = []
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(pool).tolist()
        few = few_label_split(pool, labeled=order[:args.labeled], val=order[args.labeled:args.labeled + args.val])
        splits += [few, {"train": sorted(few["train"] + few["unlabeled"]), "val": few["val"]}]
    from nnunetv2_tak.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(splits, indent=1))  # trainings may be reading it


def evaluate_cases(pred_dir: Path, gt_dir: Path, labels: dict[int, str], tolerance: float,
                   confusion: np.ndarray | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Per test case (file name without .nii.gz) and label: Dice / NSD / HD95 (NaN where a class is
    absent from both). ``confusion`` ([L, L], labels 0..L-1), if given, accumulates the [true label,
    predicted label] voxel counts of the same files."""
    import SimpleITK as sitk
    from metrics import case_metrics

    cases: dict[str, dict[int, dict[str, float]]] = {}
    for gt_file in sorted(gt_dir.glob("*.nii.gz")):
        gt_img = sitk.ReadImage(str(gt_file))
        pred_file = pred_dir / gt_file.name
        if not pred_file.is_file():
            raise SystemExit(f"no prediction {pred_file} for the test label {gt_file}; re-run the prediction")
        spacing = tuple(reversed(gt_img.GetSpacing()))
        gt, pred = sitk.GetArrayFromImage(gt_img), sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
        if confusion is not None:
            n = confusion.shape[0]
            pairs = gt.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel()
            confusion += np.bincount(pairs, minlength=n * n).reshape(n, n)
        cases[gt_file.name[:-len(".nii.gz")]] = {
            label: {"dice": m.dice, "nsd": m.nsd, "hd95": m.hd95}
            for label, m in case_metrics(pred, gt, spacing, list(labels), tolerance).items()}
    return cases


def mean_over_cases(cases: dict[str, dict[int, dict[str, float]]], labels: dict[int, str]
                    ) -> dict[int, dict[str, float]]:
    """Per label, the mean over cases of each metric (NaN where no case has a value)."""
    out = {}
    for k in labels:
        out[k] = {}
        for name in ("dice", "nsd", "hd95"):
            values = [c[k][name] for c in cases.values()]
            with np.errstate(all="ignore"):
                out[k][name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


def evaluate(pred_dir: Path, gt_dir: Path, labels: dict[int, str], tolerance: float) -> dict[int, dict[str, float]]:
    """Mean over test cases per label of Dice / NSD / HD95 (NaN where a class is absent from both)."""
    return mean_over_cases(evaluate_cases(pred_dir, gt_dir, labels, tolerance), labels)


def keeps_snapshots(trainer: str) -> bool:
    """Whether a benchmark trainer has a teacher and keeps its snapshots."""
    import bench_trainers as benchmark_trainers

    cls = getattr(benchmark_trainers, trainer, None)
    return (cls is not None and issubclass(cls, benchmark_trainers.TeacherSnapshots)
            and bool(getattr(cls, "use_unlabeled", False)) and cls.teacher_snapshot_every > 0)


def pseudo_label_quality(fold_dir: Path, fold: int, cases: list[str], data_folder: Path, num_classes: int,
                         device: str, cache: Path | None = None, final_model: bool = False) -> list[dict]:
    """Score every teacher snapshot of a finished training on labeled preprocessed cases.

    The training folder's plans and trainer rebuild the network (nnU-Net's predictor), each snapshot's
    teacher weights are loaded, and its argmax from nnU-Net's sliding window (no mirroring) on each
    preprocessed case [c, *S] is compared with the case's preprocessed labels. Returns, per snapshot,
    {"epoch", "counts" [3, num_classes] (intersection, predicted, true voxels over all cases)}. With
    ``cache`` (a JSON file) snapshots already scored on the same cases are not predicted again. With
    ``final_model`` the one "snapshot" is the trained network of checkpoint_final.pth at its last epoch
    (for stock nnU-Net: what labeled-only training knows about the same unlabeled cases)."""
    import torch
    from bench_trainers import teacher_snapshots
    from evidence import overlap_counts
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunetv2_tak.model.network import unwrap_network

    if final_model:
        final = fold_dir / "checkpoint_final.pth"
        snapshots, weights_key = [(int(training_stats(fold_dir)["epochs"]), final)], "network_weights"
    else:
        snapshots, weights_key = teacher_snapshots(fold_dir), "teacher"
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if known.get("cases") != cases:
        known = {"cases": cases, "snapshots": {}}
    todo = [(e, p) for e, p in snapshots
            if known["snapshots"].get(str(e), {}).get("mtime_ns") != p.stat().st_mtime_ns]
    if todo:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=device != "cpu", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(fold_dir.parent), use_folds=(fold,),
                                                       checkpoint_name="checkpoint_final.pth")
        dataset = infer_dataset_class(str(data_folder))(str(data_folder), cases)
        loaded = [dataset.load_case(case)[:2] for case in cases]
        for epoch, path in todo:
            state = torch.load(path, map_location="cpu", weights_only=not final_model)[weights_key]
            unwrap_network(predictor.network).load_state_dict(state)  # the predictor may have compiled it
            counts = np.zeros((3, num_classes))
            for data, seg in loaded:
                logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data)).float())
                counts += overlap_counts(logits.argmax(0).cpu().numpy(), np.asarray(seg)[0], num_classes)
            known["snapshots"][str(epoch)] = {"mtime_ns": path.stat().st_mtime_ns, "counts": counts.tolist()}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
    return [{"epoch": e, "counts": known["snapshots"][str(e)]["counts"]} for e, _ in snapshots]


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


def parse_externals(values: list[str]) -> dict[str, str]:
    """``["NAME=FOLDER{seed}", ...]`` -> {NAME: pattern}; names must be new and patterns must hold {seed}."""
    externals = {}
    for value in values:
        name, sep, pattern = value.partition("=")
        if not sep or not name or "{seed}" not in pattern:
            raise SystemExit(f"--external {value!r}: write NAME=FOLDER with {{seed}} in FOLDER, e.g. "
                             "tak_release01=old_work/predictions/tak_seed{seed}")
        if name in METHODS or name in externals:
            raise SystemExit(f"--external {value!r}: the name {name!r} is taken; choose another")
        externals[name] = pattern
    return externals


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
    p.add_argument("--reference-epochs", type=int, default=None,
                   help="train the fully supervised reference this many epochs instead of the shared budget "
                        "(own results folder; said in the report)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: predict and report the finished trainings of --methods x --seeds (the others "
                        "are skipped and listed)")
    p.add_argument("--no-pseudo-label-quality", action="store_true",
                   help="skip scoring the teacher snapshots on the unlabeled pool cases after training")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples of the intervals")
    p.add_argument("--nsd-mm", type=float, default=6.0, help="NSD tolerance in mm (default: one in-plane voxel "
                                                              "of the CPU profile)")
    p.add_argument("--small-ml", type=float, default=100.0, help="organs with median volume below are 'small'")
    p.add_argument("--reuse", action="store_true", help="reuse trainings that already have checkpoint_final.pth "
                                                          "in --work-dir (only after a run with the same settings)")
    p.add_argument("--text-embeddings", default=os.environ.get("TAK_TEXT_EMBEDDINGS", str(DEFAULT_EMBEDDINGS)))
    p.add_argument("--external", action="append", default=[], metavar="NAME=FOLDER",
                   help="score the test-set predictions of another build or tool as one more method, paired with "
                        "the others on the same scans; FOLDER holds one file per test scan and contains {seed} "
                        "(e.g. tak_release01=../old/predictions/tak_seed{seed}); compared with stock and tak")
    args = p.parse_args(argv)
    externals = parse_externals(args.external)

    work = Path(args.work_dir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    use_workspace(work)  # nnU-Net folders inside work/, CPU-friendly defaults
    profile = PROFILES[args.profile]
    epochs = args.epochs or profile["epochs"]
    os.environ["TAK_BENCH_EPOCHS"] = str(epochs)
    reference_epochs = args.reference_epochs or epochs
    os.environ["TAK_BENCH_REFERENCE_EPOCHS"] = str(reference_epochs)
    from nnunetv2.utilities.file_path_utilities import get_output_folder  # reads nnUNet_results at import

    started = time.time()
    dataset = prepare(work, args)
    pre = work / "nnUNet_preprocessed" / dataset.name
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    labels = {int(v): k for k, v in dataset_json["labels"].items() if int(v) > 0}
    pool = sorted(f.name[:-len("_0000.nii.gz")] for f in (dataset / "imagesTr").glob("*_0000.nii.gz"))
    write_splits(pre, pool, args)
    splits = json.loads((pre / "splits_final.json").read_text())
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    data_folder = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
    large, small = organ_groups(dataset / "labelsTs", labels, args.small_ml)
    n_test = len(list((dataset / "labelsTs").glob("*.nii.gz")))

    rows, case_rows, costs, pl_quality, skipped, confusions = [], [], [], {}, [], {}
    comparisons = COMPARISONS + [pair for name in externals for pair in ((name, "stock"), ("tak", name))]
    for seed in args.seeds:
        for method in args.methods:
            trainer, kind = METHODS[method]
            expected_epochs = epochs
            if kind == "reference" and reference_epochs != epochs:
                trainer, expected_epochs = REFERENCE_LONG, reference_epochs
            fold = 2 * seed + (1 if kind == "reference" else 0)
            tag = f"{method}_seed{seed}"
            output = Path(get_output_folder(DATASET_ID, trainer, "nnUNetPlans", "3d_fullres", fold))
            if args.report_only and not (output / "checkpoint_final.pth").is_file():
                skipped.append(tag)
                continue
            if (args.reuse or args.report_only) and (output / "checkpoint_final.pth").is_file():
                trained = training_stats(output)["epochs"]
                if trained != expected_epochs:
                    raise SystemExit(f"{tag}: the finished training in {output} ran {trained} epochs but this run "
                                     f"asks for {expected_epochs}; pass the settings it was trained with "
                                     "(--epochs/--reference-epochs) or move that folder away to train anew")
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
            confusions[(method, seed)] = np.zeros((max(labels) + 1,) * 2, dtype=np.int64)
            per_case = evaluate_cases(pred, dataset / "labelsTs", labels, args.nsd_mm, confusions[(method, seed)])
            scores = mean_over_cases(per_case, labels)
            for label, metric in scores.items():
                rows.append({"method": method, "seed": seed, "label": label, "organ": labels[label], **metric})
            case_rows += [{"method": method, "seed": seed, "case": case, "label": label, **metric}
                          for case, per_label in per_case.items() for label, metric in per_label.items()]
            final_model = method == "stock"  # no teacher: its final network is the baseline for the teachers
            if not args.no_pseudo_label_quality and (final_model or (kind == "few" and keeps_snapshots(trainer))):
                from bench_trainers import teacher_snapshots

                pl_quality[(method, seed)] = pseudo_label_quality(
                    output, fold, sorted(splits[fold]["unlabeled"]), data_folder, max(labels) + 1,
                    profile["device"], cache=work / "pseudo_label_quality" / f"{tag}.json", final_model=final_model) \
                    if final_model or teacher_snapshots(output) else []  # trained before the benchmark kept snapshots
            costs.append({"method": method, "seed": seed, "train_min": train_s / 60, "predict_s": predict_s,
                          **training_stats(output)})
            print(f"{tag}: train {train_s / 60:.1f} min, predict {predict_s:.0f} s, mean Dice "
                  f"{np.nanmean([s['dice'] for s in scores.values()]):.3f}", flush=True)
            if not args.report_only:  # a report after every training, for partial results
                write_report(work, rows, costs, labels, large, small, args, n_test=n_test, case_rows=case_rows,
                             pl_quality=pl_quality, epochs=epochs, reference_epochs=reference_epochs,
                             comparisons=comparisons, confusions=confusions)
        for name, pattern in externals.items():
            folder = Path(pattern.format(seed=seed))
            if not folder.is_dir() and args.report_only:
                skipped.append(f"{name}_seed{seed}")
                continue
            if not folder.is_dir():
                raise SystemExit(f"--external {name}: {folder} (seed {seed}) is not a folder; give a pattern with "
                                 "{seed} that names a prediction folder for every --seeds value")
            confusions[(name, seed)] = np.zeros((max(labels) + 1,) * 2, dtype=np.int64)
            per_case = evaluate_cases(folder, dataset / "labelsTs", labels, args.nsd_mm,  # stops on a missing scan
                                      confusions[(name, seed)])
            rows += [{"method": name, "seed": seed, "label": label, "organ": labels[label], **metric}
                     for label, metric in mean_over_cases(per_case, labels).items()]
            case_rows += [{"method": name, "seed": seed, "case": case, "label": label, **metric}
                          for case, per_label in per_case.items() for label, metric in per_label.items()]
    write_report(work, rows, costs, labels, large, small, args, n_test=n_test, case_rows=case_rows,
                 pl_quality=pl_quality, epochs=epochs, reference_epochs=reference_epochs, comparisons=comparisons,
                 confusions=confusions)
    if skipped:
        print(f"\nnot in the report (no finished training or predictions): {', '.join(skipped)}")
    print(f"\ntotal wall time {(time.time() - started) / 60:.1f} min; report in {work / 'report'}")
    return 0


def write_report(work: Path, rows: list[dict], costs: list[dict], labels: dict[int, str], large: list[int],
                 small: list[int], args: argparse.Namespace, *, n_test: int, case_rows: list[dict] | None = None,
                 pl_quality: dict[tuple[str, int], list[dict]] | None = None, epochs: int | None = None,
                 reference_epochs: int | None = None, comparisons: list[tuple[str, str]] | None = None,
                 confusions: dict[tuple[str, int], np.ndarray] | None = None) -> None:
    """CSV of every (method, seed, organ), of every (method, seed, case, organ) and of the costs; Markdown
    tables of per-organ means (spread over seeds), organs stuck at 0, paired differences with bootstrap
    intervals, fraction of the gap closed, pseudo-label quality and the cost ratios to the stock trainer;
    plots. ``confusions`` ((method, seed) -> [true, predicted] test voxel counts) says where the voxels of
    an organ that got worse went (confusion.csv)."""
    out = work / "report"
    out.mkdir(exist_ok=True)
    confusions = confusions or {}
    if confusions:
        with open(out / "confusion.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "seed", "true_label", "predicted_label", "voxels"])
            writer.writerows((m, s, t, p, int(n)) for (m, s), c in confusions.items() for (t, p), n in np.ndenumerate(c)
                             if n)
    for name, table in (("per_class.csv", rows), ("per_case.csv", case_rows or []), ("cost.csv", costs)):
        if table:
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

    seeds_per_method = "; ".join(f"{m}: {sorted({r['seed'] for r in rows if r['method'] == m})}" for m in methods)
    lines = [f"Seeds per method: {seeds_per_method}. Test set: {n_test} scans (labelsTs). NSD tolerance "
             f"{args.nsd_mm} mm. Values: mean over test scans, then mean ± std over seeds.", ""]
    if epochs is not None:
        schedule = f"Schedule: {epochs} epochs x 25 iterations for every method"
        if reference_epochs is not None and reference_epochs != epochs and "reference" in methods:
            schedule += (f", except the fully supervised reference: {reference_epochs} epochs (a longer schedule, "
                         "so that it is an upper bound; it is not a competitor at the shared budget)")
        lines += [schedule + ".", ""]
    groups = (f"Large organs (median test volume >= {args.small_ml} ml): {', '.join(labels[k] for k in large)}. "
              f"Small organs (< {args.small_ml} ml): {', '.join(labels[k] for k in small)}.")
    for metric, title in (("dice", "Dice"), ("nsd", f"NSD@{args.nsd_mm}mm"), ("hd95", "HD95 [mm]")):
        lines += [f"### {title}", "", groups, "", "| organ | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for label, name in labels.items():
            lines.append(f"| {name} | " + " | ".join(cell(m, [label], metric) for m in methods) + " |")
        for group, gname in ((list(labels), "**mean**"), (large, "**large organs**"), (small, "**small organs**")):
            lines.append(f"| {gname} | " + " | ".join(cell(m, group, metric) for m in methods) + " |")
        lines.append("")
    lines += stuck_table(rows, labels)
    if case_rows:
        lines += evidence_section(case_rows, labels, large, small, args.bootstrap, comparisons or COMPARISONS,
                                  confusions)
    if pl_quality:
        lines += pseudo_label_section(out, pl_quality, labels, large, small)
    lines += cost_table(costs)
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    _plot(out, rows, labels, methods)


def stuck_table(rows: list[dict], labels: dict[int, str]) -> list[str]:
    """Markdown lines: per method and seed, the organs whose test mean Dice is below STUCK_DICE."""
    from evidence import stuck_organs

    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"### Organs stuck at 0 Dice (test mean < {STUCK_DICE})", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in methods:
        cells = []
        for seed in seeds:
            dice = {r["label"]: r["dice"] for r in rows if r["method"] == m and r["seed"] == seed}
            cells.append(", ".join(labels[k] for k in stuck_organs(dice, STUCK_DICE)) or "none" if dice else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _dice_units(case_rows: list[dict], method: str, labels: dict[int, str]) -> dict[tuple[int, str], np.ndarray]:
    """(seed, case) -> Dice [K] in label order, for one method."""
    order = {k: i for i, k in enumerate(labels)}
    units: dict[tuple[int, str], np.ndarray] = {}
    for r in case_rows:
        if r["method"] == method:
            units.setdefault((r["seed"], r["case"]), np.full(len(labels), np.nan))[order[r["label"]]] = r["dice"]
    return units


def confusion_lines(confusions: dict[tuple[str, int], np.ndarray], a: str, b: str, seeds: list[int],
                    organs: list[int], labels: dict[int, str], top: int = 2) -> list[str]:
    """Markdown lines: for each organ, the share of its test voxels (summed over ``seeds``) that ``a`` and
    ``b`` predict as the ``top`` other labels where ``a`` or ``b`` sends most, background included."""
    if not all((m, s) in confusions for m in (a, b) for s in seeds):
        return []
    shares = {m: sum(confusions[m, s] for s in seeds) for m in (a, b)}
    names = {0: "background", **labels}
    said = []
    for k in organs:
        rows = {m: c[k] / max(c[k].sum(), 1) for m, c in shares.items()}
        others = [j for j in range(len(rows[a])) if j != k]
        chosen = sorted(others, key=lambda j: -max(rows[a][j], rows[b][j]))[:top]
        said.append(f"{labels[k]}: " + ", ".join(f"{names.get(j, j)} {rows[a][j]:.0%} / {rows[b][j]:.0%}"
                                                  for j in chosen))
    return [f"  - where those organs' test voxels went ({a} / {b}, seeds {seeds}): " + "; ".join(said)]


def evidence_section(case_rows: list[dict], labels: dict[int, str], large: list[int], small: list[int],
                     resamples: int, comparisons: list[tuple[str, str]] = COMPARISONS,
                     confusions: dict[tuple[str, int], np.ndarray] | None = None) -> list[str]:
    """Markdown lines: paired differences of ``comparisons`` (a - b) with bootstrap 95% intervals over (seed, case)
    pairs (and with seeds resampled as clusters), in words and per organ, with where the voxels of an organ
    that got worse went (from ``confusions``); fraction of the gap closed."""
    from evidence import gap_fraction, paired_difference

    present = list(dict.fromkeys(r["method"] for r in case_rows))
    units = {m: _dice_units(case_rows, m, labels) for m in present}
    index = {k: i for i, k in enumerate(labels)}
    groups = [("the mean", list(range(len(labels)))), ("large organs", [index[k] for k in large]),
              ("small organs", [index[k] for k in small])]

    def paired(methods: tuple[str, ...]) -> tuple[list[tuple[int, str]], list[np.ndarray]]:
        common = sorted(set.intersection(*(set(units[m]) for m in methods)))
        return common, [np.stack([units[m][u] for u in common]) if common else np.zeros((0, len(labels)))
                        for m in methods]

    lines = ["### Paired differences (Dice)", "",
             f"Bootstrap 95% percentile intervals ({resamples} resamples, seeded) over the (seed, test case) "
             "pairs that both methods have: each resample draws pairs with replacement and the same pairs for "
             "both methods, so what a scan or a seed does to both cancels. 'Resolved' means the interval "
             "excludes 0. The second interval resamples whole seeds first (then pairs within them): it also "
             "carries the seed-to-seed spread, which with few seeds the first one understates.", ""]
    table: dict[str, dict[int, str]] = {}
    not_run = [f"{a} - {b}" for a, b in comparisons if (a in present) != (b in present)]
    for a, b in comparisons:
        name = f"{a} - {b}"
        if a not in present or b not in present:
            continue
        common, (sa, sb) = paired((a, b))
        seeds = sorted({u[0] for u in common})
        unpaired = sorted({u[0] for u in set(units[a]) ^ set(units[b])})
        if not common:
            lines.append(f"- {name}: skipped, no seed with results for both.")
            continue
        clusters = [u[0] for u in common]
        note = f"; seeds {unpaired} skipped: only one of the two has them" if unpaired else ""
        if len(common) < 10:
            note += "; too few pairs for a bootstrap interval to mean much"
        lines.append(f"- **{name}** ({len(common)} (seed, case) pairs of seeds {seeds}{note}):")
        for gname, organs in groups:
            if not organs:
                continue
            flat = paired_difference(sa, sb, organs, resamples=resamples, seed=0)
            clustered = paired_difference(sa, sb, organs, resamples=resamples, seed=0, clusters=clusters)
            verdict = f"resolved ({a if flat.estimate > 0 else b} better)" if flat.resolved else "not resolved"
            lines.append(f"  - {name} on {gname}: {flat.describe()}, {verdict}; seeds resampled as clusters "
                         f"[{clustered.low:.3f}, {clustered.high:.3f}], "
                         f"{'resolved' if clustered.resolved else 'not resolved'}")
        worse, worse_labels = [], []
        table[name] = {}
        for k, i in index.items():
            organ = paired_difference(sa, sb, [i], resamples=resamples, seed=0)
            table[name][k] = (f"**{organ.describe(2)}**" if organ.resolved else organ.describe(2))
            if organ.resolved and organ.estimate < 0:
                worse.append(f"{labels[k]} {organ.describe(2)}")
                worse_labels.append(k)
        if worse:
            lines.append(f"  - organs worse with {a} than with {b} beyond the interval: {', '.join(worse)}")
            lines += confusion_lines(confusions or {}, a, b, seeds, worse_labels, labels)
    if not_run:
        lines.append(f"- Not compared (one side has no results): {', '.join(not_run)}.")
    if table:
        names = list(table)
        lines += ["", "Per organ (bold: interval excludes 0):", "", "| organ | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {labels[k]} | " + " | ".join(table[n][k] for n in names) + " |" for k in labels]
    lines.append("")

    if "reference" in present and "stock" in present:
        lines += ["### Fraction of the stock-to-reference gap closed (Dice)", "",
                  "(method - stock) / (reference - stock) on the same (seed, case) pairs, with its bootstrap 95% "
                  "interval.", ""]
        for m in present:
            if m in ("reference", "stock"):
                continue
            common, (sm, sb, sr) = paired((m, "stock", "reference"))
            if not common:
                lines.append(f"- {m}: skipped, no seed with results for {m}, stock and the reference.")
                continue
            said = [f"{gname}: {gap_fraction(sm, sb, sr, organs, resamples=resamples, seed=0).describe()}"
                    for gname, organs in groups if organs]
            lines.append(f"- {m} (seeds {sorted({u[0] for u in common})}): " + "; ".join(said) + ".")
        lines.append("")
    return lines


def pseudo_label_section(out: Path, pl_quality: dict[tuple[str, int], list[dict]], labels: dict[int, str],
                         large: list[int], small: list[int]) -> list[str]:
    """Markdown lines, CSV and plot of the teachers' pseudo-label Dice on the unlabeled pool cases per
    snapshot epoch (mean over seeds)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from evidence import dice_from_counts

    records = []
    for (method, seed), snapshots in pl_quality.items():
        for snap in snapshots:
            counts = np.asarray(snap["counts"])
            dice = dice_from_counts(counts)
            records += [{"method": method, "seed": seed, "epoch": snap["epoch"], "label": k, "organ": name,
                         "dice": float(dice[k]), "predicted_voxels": int(counts[1, k]),
                         "true_voxels": int(counts[2, k])} for k, name in labels.items()]
    lines = ["### Pseudo-label quality over training (unlabeled pool cases of the few-label split)", ""]
    without = [f"{m} seed {s}" for (m, s), snapshots in pl_quality.items() if not snapshots]
    if without:
        lines += [f"No teacher snapshots (trained before the benchmark trainers kept them): {', '.join(without)}.",
                  ""]
    if not records:
        return lines
    with open(out / "pseudo_label_quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)

    def mean(method: str, epoch: int, group: list[int]) -> float:
        per_seed = []
        for seed in sorted({r["seed"] for r in records if r["method"] == method}):
            values = [r["dice"] for r in records if r["method"] == method and r["seed"] == seed
                      and r["epoch"] == epoch and r["label"] in group]
            with np.errstate(all="ignore"):
                if values and np.isfinite(values).any():
                    per_seed.append(float(np.nanmean(values)))
        return float(np.mean(per_seed)) if per_seed else float("nan")

    last_epoch = {}  # (method, seed) -> epoch of its last snapshot
    for r in records:
        last_epoch[r["method"], r["seed"]] = max(last_epoch.get((r["method"], r["seed"]), r["epoch"]), r["epoch"])
    at_last = [r for r in records if r["epoch"] == last_epoch[r["method"], r["seed"]]]

    def volume_ratio(method: str, label: int) -> float:
        """Predicted / true voxels of a class at each seed's last snapshot, summed over seeds (> 1: the
        teacher over-segments it, < 1: under-segments)."""
        picked = [r for r in at_last if r["method"] == method and r["label"] == label]
        true = sum(r["true_voxels"] for r in picked)
        return sum(r["predicted_voxels"] for r in picked) / true if true else float("nan")

    lines += ["Dice of the EMA teacher's argmax (no noise, no confidence filter) against the labels of the "
             "unlabeled cases, which training never reads (for stock, which has no teacher: its final network on "
             "the same cases, the labeled-only baseline of the pseudo-labels); per class over all those voxels "
             "(preprocessed grid), mean over seeds. The plot is pseudo_label_quality.png, every number "
             "pseudo_label_quality.csv.", ""]
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(6 * (1 + len(methods)), 5), squeeze=False)
    for j, method in enumerate(methods):
        epochs = sorted({r["epoch"] for r in records if r["method"] == method})
        seeds = sorted({r["seed"] for r in records if r["method"] == method})
        lines += [f"{method} (seeds {seeds}):", "",
                  "| epoch | mean | large | small | " + " | ".join(labels.values()) + " |",
                  "|---|" + "---|" * (3 + len(labels))]
        for e in epochs:
            cells = [mean(method, e, list(labels)), mean(method, e, large), mean(method, e, small)]
            cells += [mean(method, e, [k]) for k in labels]
            lines.append(f"| {e} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
        lines.append("| predicted / true voxels, last snapshot | | | | " + " | ".join(
            f"{volume_ratio(method, k):.2f}" for k in labels) + " |")
        never = []
        for seed in seeds:
            missing = [r["organ"] for r in at_last if (r["method"], r["seed"]) == (method, seed)
                       and r["predicted_voxels"] == 0]
            never.append(f"seed {seed} (epoch {last_epoch[method, seed]}): {', '.join(missing) or 'none'}")
        lines += ["", "Classes the teacher does not predict at all at its last snapshot: " + "; ".join(never) + ".",
                  ""]
        axes[0, 0].plot(epochs, [mean(method, e, list(labels)) for e in epochs], marker="o", label=method)
        ax = axes[0, j + 1]
        for k, name in labels.items():
            ax.plot(epochs, [mean(method, e, [k]) for e in epochs], marker=".",
                    linestyle="-" if k in large else "--", label=name)
        ax.set_title(f"{method}: per class (dashed: small organs)")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    axes[0, 0].set_title("mean pseudo-label Dice")
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_ylabel("Dice vs hidden labels")
    axes[0, 0].set_ylim(0, 1)
    axes[0, 0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "pseudo_label_quality.png", dpi=90)
    plt.close(fig)
    return lines


def cost_table(costs: list[dict]) -> list[str]:
    """Markdown lines: per method the median epoch time, prediction wall time of the test set, and their
    ratios to the stock trainer's (same plans, same iterations, one machine, one run)."""
    def median(method: str, key: str) -> float:
        values = [c[key] for c in costs if c["method"] == method]
        return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")

    methods = list(dict.fromkeys(c["method"] for c in costs))
    if not methods:  # only external predictions: nothing trained here
        return []
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
