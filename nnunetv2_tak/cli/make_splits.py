"""nnUNetv2_tak_make_splits: few-label splits for paper-style experiments on a fully labeled dataset.
The training cases that are neither labeled nor validation are listed as "unlabeled"; training streams
their images and never reads their labels."""

from __future__ import annotations

import argparse
import json
import logging

from nnunetv2_tak.cli._common import dataset_folders
from nnunetv2_tak.unlabeled.splits import SplitError, few_label_split, write_splits

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_tak_make_splits", description=__doc__)
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--labeled-fraction", type=float, help="fraction of the non-validation cases that keep labels")
    which.add_argument("--labeled", nargs="+", help="explicit labeled case ids")
    p.add_argument("--num-val", type=int, default=None, help="validation cases per fold (default max(1, 10%%))")
    p.add_argument("--val", nargs="+", default=None, help="explicit validation case ids")
    p.add_argument("--seed", type=int, default=0, help="random seed (fold i uses seed + i)")
    p.add_argument("--folds", type=int, default=1, help="number of folds (independent draws), default 1")
    p.add_argument("--force", action="store_true", help="replace an existing splits_final.json (kept as backup)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        _, raw, preprocessed = dataset_folders(args.dataset, SplitError)
        if not preprocessed.is_dir():
            raise SplitError(f"{preprocessed} does not exist; run nnUNetv2_plan_and_preprocess -d {args.dataset}")
        dataset_json = json.loads((raw / "dataset.json").read_text())
        cases = sorted(get_filenames_of_train_images_and_targets(str(raw), dataset_json))
        splits = [few_label_split(cases, labeled_fraction=args.labeled_fraction, labeled=args.labeled,
                                  num_val=args.num_val, val=args.val, seed=args.seed + fold)
                  for fold in range(args.folds)]
        path = write_splits(preprocessed, splits, force=args.force)
        for fold, split in enumerate(splits):
            logger.info("fold %d: %d labeled, %d validation, %d unlabeled", fold, len(split["train"]),
                        len(split["val"]), len(split["unlabeled"]))
        logger.info("wrote %s", path)
    except SplitError as exc:
        logger.error("error: %s", exc)
        return 2
    return 0
