"""Evidence benchmark: few labels + unlabeled scans, stock nnU-Net vs TAK and its ablations, one command.

    python examples/benchmark/benchmark.py                          # CPU profile, seed 0, 5 methods
    python examples/benchmark/benchmark.py --seeds 0 1 2 --methods stock tak selftrain meanteacher

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
  7. paired differences between methods (TAK - stock, TAK - self-training, TAK - mean teacher, TAK - each
     ablation, raw text - stock) on the
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
iterations on CUDA (not run by the authors yet). Every method trains with the schedule of the benchmark's
trainers (trainers/bench_trainers.py: AdamW 3e-3 with poly decay, intensity augmentation only), which
this script makes findable by name through ``nnUNet_extTrainer``.

Baselines besides stock: "meanteacher", a plain mean teacher (nnU-Net's network, EMA teacher, pseudo-label
loss on the unlabeled cases, no text); "selftrain", nnU-Net's self-training from stock commands only: the
seed's stock model pseudo-labels the unlabeled pool cases, and a second stock training on the labeled and
pseudo-labeled cases (a dataset of its own, same plans) is the result (selftrain.py; no fine-tuning step).

Text: "tak" uses the real CLIP text embeddings of ``--text-embeddings`` (16 AMOS classes, imported
with ``nnUNetv2_tak_encode_prompts --embeddings``), centred across classes as the plugin's default;
"tak_rawtext" the same text uncentred (the reference code's handling); "tak_shuffledtext" the same text with
the organs' descriptions permuted among the organs; "tak_randomtext" seeded random text; "tak_notext" learned
class embeddings. The file is the TAK authors' released embeddings (CLIP/amos_embedding_shape_location.pth in
their public repository); without it the methods that read the text stop with an error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from cohort import PROFILES, import_text, organ_groups, pool_cases, prepare, write_splits
from methods import COMPARISONS, METHODS, parse_externals, run_method, score_external, text_methods
from report import write_report
from runs import Bench, use_bench_trainers
from scoring import Results

EXAMPLES = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    p.add_argument("--text-embeddings", default=os.environ.get("TAK_TEXT_EMBEDDINGS"),
                   help="the TAK authors' released text embeddings (CLIP/amos_embedding_shape_location.pth in their "
                        "public repository), for the methods that read text (default: $TAK_TEXT_EMBEDDINGS)")
    p.add_argument("--external", action="append", default=[], metavar="NAME=FOLDER",
                   help="score the test-set predictions of another build or tool as one more method, paired with "
                        "the others on the same scans; FOLDER holds one file per test scan and contains {seed} "
                        "(e.g. tak_release01=../old/predictions/tak_seed{seed}); compared with stock and tak")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> Bench:
    """The work folder as nnU-Net's, the benchmark's trainers findable and their schedule set; the cohort,
    its plans, text and splits; returns what the methods' runs share."""
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))  # examples/workspace.py
    from workspace import use_workspace

    work = Path(args.work_dir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    use_workspace(work)  # nnU-Net folders inside work/, CPU-friendly defaults
    use_bench_trainers()  # before any nnU-Net command or in-process trainer lookup
    profile = PROFILES[args.profile]
    epochs = args.epochs or profile["epochs"]
    os.environ["TAK_BENCH_EPOCHS"] = str(epochs)
    os.environ["TAK_BENCH_REFERENCE_EPOCHS"] = str(args.reference_epochs or epochs)
    dataset = prepare(work, profile, args.pool, args.test)
    import_text(work, args.text_embeddings, text_methods(args.methods))
    pre = work / "nnUNet_preprocessed" / dataset.name
    write_splits(pre, pool_cases(dataset), args)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    labels = {int(v): k for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items() if int(v) > 0}
    return Bench(work, dataset, json.loads((pre / "splits_final.json").read_text()),
                 pre / plans["configurations"]["3d_fullres"]["data_identifier"], labels, profile["device"], epochs,
                 args.reference_epochs or epochs, reuse=args.reuse, report_only=args.report_only, nsd_mm=args.nsd_mm,
                 score_pseudo_labels=not args.no_pseudo_label_quality)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    externals = parse_externals(args.external)
    started = time.time()
    bench = setup(args)
    large, small = organ_groups(bench.dataset / "labelsTs", bench.labels, args.small_ml)
    results = Results()
    report = functools.partial(
        write_report, bench.work, results.rows, results.costs, bench.labels, large, small, args,
        n_test=len(list((bench.dataset / "labelsTs").glob("*.nii.gz"))), case_rows=results.case_rows,
        pl_quality=results.pl_quality, epochs=bench.epochs, reference_epochs=bench.reference_epochs,
        comparisons=COMPARISONS + [pair for name in externals for pair in ((name, "stock"), ("tak", name))],
        confusions=results.confusions)
    for seed in args.seeds:
        for method in args.methods:
            if run_method(bench, method, seed, results) and not args.report_only:
                report()  # after every training, for partial results
        for name, pattern in externals.items():
            score_external(bench, name, pattern, seed, results)
    report()
    if results.skipped:
        print(f"\nnot in the report (no finished training or predictions): {', '.join(results.skipped)}")
    print(f"\ntotal wall time {(time.time() - started) / 60:.1f} min; report in {bench.work / 'report'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
