"""nnUNetv2_tak_preprocess_unlabeled: preprocess nnUNet_raw/<dataset>/imagesUnlabeled with the dataset's
own plans (training does this on first use; this command does it ahead of time, optionally as one of N
shards that run concurrently on other machines, e.g. a SLURM job array). Every case already preprocessed is
checked against the sizes and checksums its manifest records, and a damaged one is preprocessed again;
--check-only only names them."""

from __future__ import annotations

import argparse
import json
import logging

from nnunetv2_tak.cli._common import dataset_name, nnunet_folder
from nnunetv2_tak.unlabeled import (
    CHECKSUM,
    SIZE,
    UNLABELED_DIR,
    UnlabeledDataError,
    check_shard_arguments,
    check_unlabeled,
    find_unlabeled_images,
    preprocess_unlabeled,
)

logger = logging.getLogger(__name__)

DAMAGED = 1  # exit status of --check-only when a case is damaged (2: the command could not run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_tak_preprocess_unlabeled", description=__doc__)
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                   help="plans configurations to preprocess for (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="worker processes (default: nnU-Net's nnUNet_def_n_proc)")
    p.add_argument("--replace-stale", action="store_true",
                   help="when the plans changed since the last run, move the stale folder aside and redo it "
                        "(not with --shard)")
    p.add_argument("--shard", type=int, default=None,
                   help="preprocess only shard I (0 <= I < N) of the cases, e.g. $SLURM_ARRAY_TASK_ID; shards may "
                        "run concurrently on machines sharing nnUNet_preprocessed; a killed shard resumes when rerun")
    p.add_argument("--num-shards", type=int, default=None,
                   help="number of shards N (the same for every shard of the folder)")
    p.add_argument("--check-only", action="store_true",
                   help="only check every preprocessed case against the sizes and checksums its manifest records "
                        f"and name the damaged ones (exit status {DAMAGED} if any); writes nothing and needs no "
                        "nnUNet_raw")
    p.add_argument("--verify", choices=(CHECKSUM, SIZE), default=CHECKSUM,
                   help=f"how cases already preprocessed are checked: '{CHECKSUM}' (default) reads every file, "
                        f"'{SIZE}' only compares sizes and opens each image (what training does at start-up)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from nnunetv2.configuration import default_num_processes

        sharded = args.shard is not None or args.num_shards is not None
        if sharded:
            check_shard_arguments(args.shard, args.num_shards)
            if args.check_only:
                raise UnlabeledDataError("--check-only checks every shard's cases; leave --shard/--num-shards out")
        name = dataset_name(args.dataset)
        preprocessed = nnunet_folder("nnUNet_preprocessed", name, UnlabeledDataError)
        plans_file = preprocessed / f"{args.plans}.json"
        if not plans_file.is_file():
            raise UnlabeledDataError(f"no plans {plans_file}; run nnUNetv2_plan_and_preprocess -d {args.dataset} first")
        plans = json.loads(plans_file.read_text())
        dataset_json = json.loads((preprocessed / "dataset.json").read_text())
        for configuration in args.configurations:
            if configuration not in plans["configurations"]:
                raise UnlabeledDataError(f"configuration {configuration!r} is not in {plans_file} "
                                         f"(has {sorted(plans['configurations'])})")
        if args.check_only:
            return _check_only(args, preprocessed, plans, dataset_json)
        raw = nnunet_folder("nnUNet_raw", name, UnlabeledDataError)
        if not find_unlabeled_images(raw, dataset_json):
            raise UnlabeledDataError(f"no unlabeled images in {raw / UNLABELED_DIR}")
        for configuration in args.configurations:
            folder, cases = preprocess_unlabeled(raw, preprocessed, plans, configuration, dataset_json,
                                                 num_processes=args.num_processes or default_num_processes,
                                                 replace_stale=args.replace_stale, shard=args.shard,
                                                 num_shards=args.num_shards, verify=args.verify)
            what = f"shard {args.shard} of {args.num_shards}: " if sharded else ""
            logger.info("%s: %s%d unlabeled case(s) ready in %s", configuration, what, len(cases), folder)
    except UnlabeledDataError as exc:
        logger.error("error: %s", exc)
        return 2
    return 0


def _check_only(args: argparse.Namespace, preprocessed, plans: dict, dataset_json: dict) -> int:
    status = 0
    for configuration in args.configurations:
        folder, intact, damaged = check_unlabeled(preprocessed, plans, configuration, dataset_json, args.verify)
        for case, problem in sorted(damaged.items()):
            logger.error("damaged: unlabeled case %r: %s", case, problem)
        unrecorded = sorted(case for case, entry in intact.items() if not entry.get("files"))
        if unrecorded:
            logger.info("%s: %d case(s) have no recorded sizes and checksums (e.g. %s); they decompress completely. "
                        "A run without --check-only records them.", configuration, len(unrecorded), unrecorded[:3])
        logger.info("%s: %d of %d preprocessed unlabeled case(s) in %s are intact (%ss checked)", configuration,
                    len(intact), len(intact) + len(damaged), folder, args.verify)
        if damaged:
            status = DAMAGED
            logger.error("%s: %d damaged case(s); preprocess them again with nnUNetv2_tak_preprocess_unlabeled -d %s "
                         "-c %s (without --check-only)", configuration, len(damaged), args.dataset, configuration)
    return status
