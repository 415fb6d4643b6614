"""The self-training baseline (method ``selftrain``), from stock nnU-Net commands only.

For seed s:

1. the ``stock`` model of the seed (nnUNetTrainer_Bench, fold 2s, labeled cases only) predicts the seed's
   unlabeled pool cases (the ``"unlabeled"`` key of fold 2s) from their raw images in imagesTr
   (``nnUNetv2_predict``, checkpoint_final.pth, no test-time mirroring): their pseudo-labels;
2. a new dataset (id ``DATASET_ID + 1 + s``) holds the labeled and validation cases with their true labels
   and the unlabeled cases with their pseudo-labels (images and true labels linked from the benchmark
   dataset; the unlabeled cases' true label files are never opened); the benchmark's (shrunk) plans are
   moved over with ``nnUNetv2_move_plans_between_datasets`` and ``nnUNetv2_preprocess`` preprocesses it, so
   network, normalisation and resampling are the benchmark's; its splits_final.json has one fold (0):
   train = labeled + pseudo-labeled cases, val = the seed's validation cases;
3. ``nnUNetTrainer_Bench`` trains it on the shared schedule (TAK_BENCH_EPOCHS), and the model predicts the
   test scans like every other method.

No fine-tuning on the labeled cases afterwards: it would be a third training on top of the two (more than
any other method's budget) and the recipe does not need it; the model of step 3 is the result.

Every step writes a record (``work``/selftrain/seedS/*.json) after it finished; with --reuse a step whose
record matches its inputs (the stock checkpoint, the pseudo-labels) is skipped, and its measured time is
kept for the cost table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from cohort import DATASET_ID
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from runs import CONFIGURATION, PLANS, Bench, Model, ensure_trained, predict, run, training_stats

PSEUDO_LABELS_RECORD = "pseudo_labels.json"
DATASET_RECORD = "dataset_built.json"
COSTS = ("first_train_wall_min", "pseudo_label_predict_s", "preprocess_s")  # on top of its own training


def dataset_id(seed: int) -> int:
    """The id of seed ``seed``'s self-training dataset."""
    return DATASET_ID + 1 + seed


def second_model(seed: int, trainer: str) -> Model:
    """The second training of ``seed``: ``trainer`` on the seed's self-training dataset, its one fold 0."""
    return Model(dataset_id(seed), trainer, 0)


def dataset_name(seed: int) -> str:
    """Its folder name in nnUNet_raw, nnUNet_preprocessed and nnUNet_results."""
    return f"Dataset{dataset_id(seed):03d}_TAKBenchSelfTrainSeed{seed}"


def case_files(folder: Path, case: str, dataset_json: dict) -> list[Path]:
    """A case's image files in an images folder, one per channel (nnU-Net's CASE_XXXX naming)."""
    ending = dataset_json["file_ending"]
    return [folder / f"{case}_{int(channel):04d}{ending}" for channel in dataset_json["channel_names"]]


def _link(src: Path, dst: Path) -> None:
    """Hard link ``src`` at ``dst`` (no extra space, survives moving the work folder), or copy it."""
    if not src.is_file():
        raise SystemExit(f"{src} is missing; the benchmark dataset is incomplete (regenerate it in a new --work-dir)")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def predict_pool(bench: Bench, stock: Model, seed: int, cases: list[str], folder: Path) -> dict:
    """Step 1: the stock model's labels of the unlabeled pool ``cases`` into ``folder``/pseudo_labels, from
    their raw images; returns the step's record (``pool_inputs`` + {"predict_s", "created"})."""
    dataset_json = json.loads((bench.dataset / "dataset.json").read_text())
    images, labels = folder / "pool_images", folder / "pseudo_labels"
    for old in (folder / DATASET_RECORD, folder / PSEUDO_LABELS_RECORD, images, labels):
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    images.mkdir(parents=True)
    for case in cases:
        for src in case_files(bench.dataset / "imagesTr", case, dataset_json):
            _link(src, images / src.name)
    seconds = predict(bench, stock, images, labels, f"predict_pool_selftrain_seed{seed}.txt")
    record = {**pool_inputs(stock, cases), "predict_s": seconds, "created": time.time()}
    (folder / PSEUDO_LABELS_RECORD).write_text(json.dumps(record, indent=1))
    return record


def pool_inputs(stock: Model, cases: list[str]) -> dict:
    """What the pseudo-labels are made from: the stock checkpoint (path, modification time) and the cases."""
    checkpoint = stock.folder / "checkpoint_final.pth"
    return {"model": str(checkpoint), "model_mtime_ns": checkpoint.stat().st_mtime_ns, "cases": cases}


def build_raw_dataset(source: Path, target: Path, split: dict, pseudo_labels: Path) -> dict:
    """Step 2a: the raw self-training dataset ``target`` from the benchmark dataset ``source`` and one
    few-label ``split`` ({"train", "val", "unlabeled"}): imagesTr of every case of the split, labelsTr with
    the true labels of the train and val cases and ``pseudo_labels``/CASE.nii.gz for the unlabeled cases
    (the unlabeled cases' files in ``source``/labelsTr are never opened); dataset.json as the source's with
    its own name and count. Returns that dataset.json."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    if target.exists():
        shutil.rmtree(target)
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
    labeled, unlabeled = split["train"] + split["val"], split["unlabeled"]
    for case in labeled + unlabeled:
        for src in case_files(source / "imagesTr", case, dataset_json):
            _link(src, target / "imagesTr" / src.name)
    for case in labeled:
        _link(source / "labelsTr" / f"{case}{ending}", target / "labelsTr" / f"{case}{ending}")
    for case in unlabeled:
        pseudo = pseudo_labels / f"{case}{ending}"
        if not pseudo.is_file():
            raise SystemExit(f"no pseudo-label {pseudo} for the unlabeled case {case}; rerun without --reuse")
        _link(pseudo, target / "labelsTr" / f"{case}{ending}")
    dataset_json.update(name=target.name.split("_", 1)[1], numTraining=len(labeled) + len(unlabeled),
                        description=f"{dataset_json.get('name', source.name)}: the true labels of "
                                    f"{len(labeled)} cases and the pseudo-labels of {len(unlabeled)} (self-training)")
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    return dataset_json


def preprocess(source_id: int, target_id: int, target_name: str, split: dict, dataset_json: dict, logs: Path
               ) -> None:
    """Step 2b: the source's plans onto the target (``nnUNetv2_move_plans_between_datasets``), the target
    preprocessed with them (``nnUNetv2_preprocess``), and its splits_final.json: fold 0 trains on the split's
    labeled and unlabeled (now pseudo-labeled) cases and validates on its validation cases."""
    pre = Path(os.environ["nnUNet_preprocessed"]) / target_name
    if pre.exists():
        shutil.rmtree(pre)
    pre.mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")  # what the preprocessor reads
    source = Path(os.environ["nnUNet_preprocessed"]) / maybe_convert_to_dataset_name(source_id)
    shutil.copy(source / "dataset_fingerprint.json", pre)  # the one the plans came from; nnUNetv2_train copies it
    run("nnUNetv2_move_plans_between_datasets", "-s", str(source_id), "-t", str(target_id), "-sp", PLANS, "-tp", PLANS,
        log=logs / f"move_plans_{target_name}.txt")
    run("nnUNetv2_preprocess", "-d", str(target_id), "-plans_name", PLANS, "-c", CONFIGURATION, "-np", "2",
        log=logs / f"preprocess_{target_name}.txt")
    folds = [{"train": sorted(split["train"] + split["unlabeled"]), "val": sorted(split["val"])}]
    (pre / "splits_final.json").write_text(json.dumps(folds, indent=1))


def check_dataset_id(work: Path, seed: int) -> None:
    """Stop when another dataset holds seed ``seed``'s id in the work folder."""
    for root in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        for other in (work / root).glob(f"Dataset{dataset_id(seed):03d}_*"):
            if other.name != dataset_name(seed):
                raise SystemExit(f"{other} holds dataset id {dataset_id(seed)}, which selftrain needs for seed "
                                 f"{seed}; move it out of {work / root} or use another --work-dir")


def build_dataset(bench: Bench, seed: int, pseudo: dict, folder: Path) -> dict:
    """Step 2 (2a + 2b); returns its record ({"pseudo_labels_created", "preprocess_s", "created"})."""
    check_dataset_id(bench.work, seed)
    (folder / DATASET_RECORD).unlink(missing_ok=True)
    start = time.time()
    split = bench.splits[2 * seed]
    dataset_json = build_raw_dataset(bench.dataset, bench.work / "nnUNet_raw" / dataset_name(seed), split,
                                     folder / "pseudo_labels")
    preprocess(DATASET_ID, dataset_id(seed), dataset_name(seed), split, dataset_json, bench.work / "logs")
    record = {"pseudo_labels_created": pseudo["created"], "preprocess_s": time.time() - start, "created": time.time()}
    (folder / DATASET_RECORD).write_text(json.dumps(record, indent=1))
    return record


def train(bench: Bench, seed: int, stock: Model) -> tuple[Model, dict] | None:
    """Steps 1-3 from the seed's finished ``stock`` model, each skipped with --reuse (and --report-only) when
    its record matches its inputs: the second training and its costs ({"first_train_wall_min",
    "pseudo_label_predict_s", "preprocess_s"}), or None with --report-only when a step has not finished."""
    folder = bench.work / "selftrain" / f"seed{seed}"
    cases = sorted(bench.splits[2 * seed]["unlabeled"])
    pseudo, built = _record(folder / PSEUDO_LABELS_RECORD), _record(folder / DATASET_RECORD)
    pseudo_done = {k: pseudo.get(k) for k in ("model", "model_mtime_ns", "cases")} == pool_inputs(stock, cases)
    built_done = (pseudo_done and built.get("pseudo_labels_created") == pseudo.get("created")
                  and (bench.work / "nnUNet_preprocessed" / dataset_name(seed) / "splits_final.json").is_file())
    if bench.report_only and not built_done:
        return None
    reuse = bench.reuse or bench.report_only
    if not (pseudo_done and reuse):
        pseudo, built_done = predict_pool(bench, stock, seed, cases, folder), False
    if not (built_done and reuse):
        built = build_dataset(bench, seed, pseudo, folder)
    model = second_model(seed, stock.trainer)
    if ensure_trained(bench, model, f"selftrain_seed{seed}", bench.epochs, newer_than=built["created"]) is None:
        return None
    return model, {"first_train_wall_min": training_stats(stock.folder)["train_wall_min"],
                   "pseudo_label_predict_s": pseudo["predict_s"], "preprocess_s": built["preprocess_s"]}
