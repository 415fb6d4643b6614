"""The benchmark's data: the seeded synthetic cohort (training pool and held-out test set), its planning and
preprocessing, the real text embeddings, the per-seed splits and the organ groups (large / small)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from runs import run

DATASET_ID = 510
PROFILES = {  # cohort shape/spacing, network width (None: as planned), batch, epochs of 25 iterations, device
    "cpu": {"shape": (24, 48, 48), "spacing": (10.0, 6.0, 6.0), "features": (8, 64), "batch": 2, "epochs": 40,
            "device": "cpu"},
    "gpu": {"shape": (96, 192, 192), "spacing": (2.5, 1.5, 1.5), "features": None, "batch": None, "epochs": 400,
            "device": "cuda"},
}
EMBEDDINGS_HELP = ("the TAK authors' released text embeddings: file CLIP/amos_embedding_shape_location.pth of their "
                   "public repository (16 AMOS classes); pass --text-embeddings FILE or set TAK_TEXT_EMBEDDINGS")


def prepare(work: Path, profile: dict, pool: int, test: int) -> Path:
    """The cohort in ``work``/nnUNet_raw (generated once), planned and preprocessed once by the stock
    ``nnUNetv2_plan_and_preprocess``, plans shrunk to the profile's network; returns the raw dataset folder."""
    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import CohortSpec, generate_dataset

    raw = work / "nnUNet_raw"
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    dataset = existing[0] if existing else generate_dataset(
        raw, DATASET_ID, "TAKBenchmark", num_training=pool, num_test=test,
        spec=CohortSpec(shape=profile["shape"], spacing=profile["spacing"]), seed=1000)
    pre = work / "nnUNet_preprocessed" / dataset.name
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2",
            log=work / "logs" / "plan_and_preprocess.txt")
        if profile["features"]:
            shrink_plans_file(pre / "nnUNetPlans.json", "3d_fullres", base_features=profile["features"][0],
                              max_features=profile["features"][1], batch_size=profile["batch"])
    return dataset


def import_text(work: Path, embeddings: str | None, methods: list[str]) -> None:
    """Import the real text embeddings for the ``methods`` that read text (``nnUNetv2_tak_encode_prompts
    --embeddings``); stops with where to get the file when it is missing."""
    if not methods:
        return
    if not embeddings or not Path(embeddings).is_file():
        given = f"{embeddings} does not exist" if embeddings else "no file given"
        raise SystemExit(f"{', '.join(methods)} need(s) real text embeddings ({given}): {EMBEDDINGS_HELP}; "
                         "or leave them out of --methods")
    run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--embeddings", str(embeddings), "--force",
        log=work / "logs" / "encode_prompts.txt")


def pool_cases(dataset: Path) -> list[str]:
    """The training pool: every case of imagesTr (labeled, validation and unlabeled cases of the splits)."""
    return sorted(f.name[:-len("_0000.nii.gz")] for f in (dataset / "imagesTr").glob("*_0000.nii.gz"))


def write_splits(pre: Path, pool: list[str], args: argparse.Namespace) -> None:
    """Per seed s: fold 2s = few-label split (``--labeled`` labeled, ``--val`` validation, the rest
    unlabeled), fold 2s+1 = the same validation cases with every other pool case labeled (reference)."""
    from nnunetv2_tak.fileio import atomic_write_text
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
    atomic_write_text(path, json.dumps(splits, indent=1))  # trainings may be reading it


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
