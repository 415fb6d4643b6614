"""Paper-style few-label splits: a seeded choice of labeled training cases; the other training cases
become unlabeled (the ``"unlabeled"`` key of a splits_final.json entry, which nnU-Net ignores), so
their labels are never read by training."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunetv2_tak.fileio import atomic_write_text
from nnunetv2_tak.unlabeled.files import UnlabeledDataError

SPLIT_KEY = "unlabeled"  # extra key of a splits_final.json entry (nnU-Net ignores it)



class SplitError(ValueError):
    pass


def few_label_split(case_ids: Sequence[str], *, labeled_fraction: float | None = None,
                    labeled: Sequence[str] | None = None, num_val: int | None = None,
                    val: Sequence[str] | None = None, seed: int = 0) -> dict[str, list[str]]:
    """-> {"train": labeled cases, "val": validation cases, "unlabeled": all other cases}.

    Validation cases (``val`` or ``num_val`` drawn at random, default max(1, 10% of the cases)) are
    taken out first; then ``labeled`` or a ``labeled_fraction`` of the remaining pool (at least 1) is
    drawn with ``seed``. The three sets are disjoint and cover ``case_ids``.
    """
    cases = sorted(set(case_ids))
    if (labeled_fraction is None) == (labeled is None):
        raise SplitError("give exactly one of a labeled fraction or an explicit list of labeled cases")
    unknown = sorted((set(labeled or []) | set(val or [])) - set(cases))
    if unknown:
        raise SplitError(f"case(s) {unknown[:5]} are not training cases of this dataset")
    rng = np.random.default_rng(seed)
    if val is None:
        n_val = max(1, round(0.1 * len(cases))) if num_val is None else num_val
        candidates = [c for c in cases if c not in set(labeled or [])]  # never a case asked to be labeled
        val = [] if n_val == 0 else sorted(rng.choice(candidates, size=n_val, replace=False).tolist())
    pool = [c for c in cases if c not in set(val)]
    if labeled is None:
        if not 0 < labeled_fraction <= 1:
            raise SplitError(f"--labeled-fraction must be in (0, 1], not {labeled_fraction}")
        n_lab = max(1, round(labeled_fraction * len(pool)))
        labeled = sorted(rng.choice(pool, size=n_lab, replace=False).tolist())
    overlap = sorted(set(labeled) & set(val))
    if overlap:
        raise SplitError(f"case(s) {overlap} are both labeled and validation cases")
    if not labeled:
        raise SplitError("no labeled case left for training")
    if not val:
        raise SplitError("nnU-Net needs at least one validation case per fold (--num-val >= 1)")
    unlabeled = [c for c in pool if c not in set(labeled)]
    return {"train": sorted(labeled), "val": sorted(val), SPLIT_KEY: unlabeled}


def write_splits(preprocessed_dataset_folder: str | os.PathLike, splits: list[dict], force: bool = False) -> Path:
    """Write splits_final.json; an existing file is kept as splits_final.json.bak-<time> (only with ``force``)."""
    path = Path(preprocessed_dataset_folder) / "splits_final.json"
    if path.exists():
        if not force:
            raise SplitError(f"{path} exists; pass --force to replace it (the old file is kept as a backup)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup, n = path.with_name(f"splits_final.json.bak-{stamp}"), 1
        while backup.exists():
            backup, n = path.with_name(f"splits_final.json.bak-{stamp}-{n}"), n + 1
        shutil.copy2(path, backup)  # a copy: the split stays in place until the new one replaces it
    return atomic_write_text(path, json.dumps(splits, indent=1))


def split_unlabeled_cases(splits_file: str | os.PathLike, fold: int | str) -> list[str]:
    """The ``"unlabeled"`` case ids of fold ``fold`` in splits_final.json ([] when absent or fold 'all');
    an error when they overlap the fold's train or val cases."""
    path = Path(splits_file)
    if not path.is_file():
        return []
    splits = json.loads(path.read_text())
    marked = any(SPLIT_KEY in entry for entry in splits)
    if isinstance(fold, int) and fold < len(splits):
        entry = splits[fold]
        unlabeled = list(entry.get(SPLIT_KEY, []))
        leaked = sorted(set(unlabeled) & (set(entry.get("train", [])) | set(entry.get("val", []))))
        if leaked:
            raise UnlabeledDataError(f"{path} fold {fold} lists {leaked[:5]} both as unlabeled and as train/val; "
                                     "fix the split (nnUNetv2_tak_make_splits)")
        return unlabeled
    if marked:  # nnU-Net would train on every case, labels of the 'unlabeled' ones included
        raise UnlabeledDataError(
            f"{path} marks cases as unlabeled, but fold {fold!r} is not one of its {len(splits)} fold(s): nnU-Net "
            "would train on all cases with their labels. Train one of the split's folds, or make more folds with "
            "nnUNetv2_tak_make_splits --folds N.")
    return []


def shard_for_rank(identifiers: list[str], rank: int, world_size: int) -> list[str]:
    """Disjoint shard of the (sorted) unlabeled cases for one DDP rank: no case is streamed by two ranks."""
    ids = sorted(identifiers)
    if world_size > len(ids):
        raise UnlabeledDataError(f"{len(ids)} unlabeled case(s) cannot be split over {world_size} GPUs without "
                                 "duplicates; add unlabeled images or train on fewer GPUs.")
    return ids[rank::world_size]


