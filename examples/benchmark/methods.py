"""The benchmark's methods: which trainer trains each on which split, how one (method, seed) is trained or
reused, predicts the test set and is scored, and the other builds' predictions (--external) scored alongside."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import selftrain
from cohort import DATASET_ID
from runs import Bench, Model, bench_trainers, ensure_trained, predict, training_stats
from scoring import Results, keeps_snapshots, pseudo_label_quality

# method -> (trainer, split kind): "few" trains fold 2s (labeled cases; the unlabeled ones for the methods that
# use them), "reference" fold 2s+1 (every pool case labeled), "selftrain" the stock model of fold 2s, then
# its own dataset (selftrain.py)
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
    "tak_shuffledtext": ("nnUNetTrainerTAK_ShuffledText_Bench", "few"),  # the organs' descriptions permuted
    "meanteacher": ("nnUNetTrainerMeanTeacher_Bench", "few"),  # EMA teacher and pseudo-labels, no text
    "selftrain": ("nnUNetTrainer_Bench", "selftrain"),  # stock, its pseudo-labels, a second stock training
}
REFERENCE_LONG = "nnUNetTrainer_BenchReference"  # the reference with --reference-epochs
# paired differences reported (a - b), where both methods have results
COMPARISONS = [("tak", "stock"), ("tak", "selftrain"), ("tak", "meanteacher"), ("tak", "tak_notext"),
               ("tak", "tak_randomtext"), ("tak", "tak_shuffledtext"), ("tak", "tak_rawtext"),
               ("tak", "tak_nounlabeled"), ("tak", "tak_nocontrastive"), ("tak_rawtext", "stock"),
               ("tak_unsup_dicece", "tak")]
TEXT_FREE = ("tak_notext", "tak_randomtext")  # TAK methods that do not read the prompts' text


def text_methods(methods: list[str]) -> list[str]:
    """The ``methods`` that read the real text embeddings."""
    return [m for m in methods if m.startswith("tak") and m not in TEXT_FREE]


def benchmark_model(method: str, seed: int, long_reference: bool = False) -> Model:
    """``method``'s training of ``seed`` on the benchmark dataset (for selftrain: the stock training it starts
    from; ``selftrain.second_model`` is its second one); ``long_reference``: the reference ran --reference-epochs."""
    trainer, kind = METHODS["stock" if method == "selftrain" else method]
    if kind == "reference" and long_reference:
        trainer = REFERENCE_LONG
    return Model(DATASET_ID, trainer, 2 * seed + (1 if kind == "reference" else 0))


def train(bench: Bench, method: str, seed: int) -> Model | None:
    """Train (or reuse) ``method``'s model of ``seed`` on the benchmark dataset (not selftrain's second
    training); None with --report-only when it has not finished."""
    long_reference = METHODS[method][1] == "reference" and bench.reference_epochs != bench.epochs
    model = benchmark_model(method, seed, long_reference)
    epochs = bench.reference_epochs if long_reference else bench.epochs
    return None if ensure_trained(bench, model, f"{method}_seed{seed}", epochs) is None else model


def run_method(bench: Bench, method: str, seed: int, results: Results) -> bool:
    """Train or reuse, predict the test set, score it into ``results`` (per case, pseudo-label quality, cost).
    False (and listed as skipped) with --report-only when the training has not finished."""
    tag = f"{method}_seed{seed}"
    model, extra = train(bench, "stock" if method == "selftrain" else method, seed), {}
    if model is not None and method == "selftrain":
        model, extra = selftrain.train(bench, seed, model) or (None, {})
    if model is None:
        results.skipped.append(tag)
        return False
    train_s = bench.trained[(model.dataset_id, model.trainer, model.fold)]
    pred = bench.work / "predictions" / tag
    predict_s = predict(bench, model, bench.dataset / "imagesTs", pred, f"predict_{tag}.txt")
    scores = results.score(method, seed, pred, bench.dataset / "labelsTs", bench.labels, bench.nsd_mm)
    if bench.score_pseudo_labels:
        score_pseudo_labels(bench, method, seed, model, results)
    results.costs.append(cost_row(method, seed, train_s, predict_s, training_stats(model.folder), extra))
    print(f"{tag}: train {train_s / 60:.1f} min, predict {predict_s:.0f} s, mean Dice "
          f"{np.nanmean([s['dice'] for s in scores.values()]):.3f}", flush=True)
    return True


def cost_row(method: str, seed: int, train_s: float, predict_s: float, stats: dict[str, float],
             extra: dict[str, float]) -> dict[str, float | str | int]:
    """One row of cost.csv: this run's wall seconds of the training command (``train_s``, NaN: reused) and of
    the test prediction, the training's log (``stats``: runs.training_stats), selftrain's ``extra`` costs
    (selftrain.COSTS, NaN for the others) and ``total_min``: the method's own training plus, for selftrain,
    the stock training it starts from, the pool's pseudo-labelling and its dataset's preprocessing."""
    total = stats["train_wall_min"]
    if extra:
        total += extra["first_train_wall_min"] + (extra["pseudo_label_predict_s"] + extra["preprocess_s"]) / 60
    return {"method": method, "seed": seed, "train_min": train_s / 60, "predict_s": predict_s, **stats,
            "total_min": total, **{k: extra.get(k, math.nan) for k in selftrain.COSTS}}


def score_pseudo_labels(bench: Bench, method: str, seed: int, model: Model, results: Results) -> None:
    """For the methods with a teacher that keeps snapshots, each snapshot's labels of the seed's unlabeled pool
    cases, scored against their labels (which training never read); for stock, which has no teacher, its
    final network's: the labeled-only baseline of the pseudo-labels (and selftrain's pseudo-labels)."""
    final_model = method == "stock"
    if not (final_model or (METHODS[method][1] == "few" and keeps_snapshots(model.trainer))):
        return
    if not (final_model or bench_trainers().teacher_snapshots(model.folder)):
        results.pl_quality[(method, seed)] = []  # trained before the benchmark trainers kept snapshots
        return
    results.pl_quality[(method, seed)] = pseudo_label_quality(
        model.folder, model.fold, sorted(bench.splits[model.fold]["unlabeled"]), bench.data_folder,
        max(bench.labels) + 1, bench.device, cache=bench.work / "pseudo_label_quality" / f"{method}_seed{seed}.json",
        final_model=final_model)


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


def score_external(bench: Bench, name: str, pattern: str, seed: int, results: Results) -> None:
    """Score another build's test predictions of ``seed`` (``pattern`` with {seed}) as method ``name``."""
    folder = Path(pattern.format(seed=seed))
    if not folder.is_dir() and bench.report_only:
        results.skipped.append(f"{name}_seed{seed}")
        return
    if not folder.is_dir():
        raise SystemExit(f"--external {name}: {folder} (seed {seed}) is not a folder; give a pattern with "
                         "{seed} that names a prediction folder for every --seeds value")
    results.score(name, seed, folder, bench.dataset / "labelsTs", bench.labels, bench.nsd_mm)  # stops on a missing scan
