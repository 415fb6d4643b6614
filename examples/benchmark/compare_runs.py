"""Paired comparison of two methods from benchmark per-case files, also across work folders (schedules).

    python examples/benchmark/compare_runs.py \\
        --a bench160/report/per_case.csv:tak --b examples/results/centred_default_per_case.csv:tak \\
        --seeds 0 --small-labels 4 5 8 9 10 11 12 13 15 \\
        --dataset-json bench160/nnUNet_raw/Dataset510_TAKBenchmark/dataset.json

Each side is ``FILE:METHOD`` (a ``per_case.csv`` the benchmark writes: method, seed, case, label, dice, ...),
or ``FILE,FILE,...:METHOD`` to join the reports of runs that trained different seeds (a (seed, case, organ)
in two of them stops the comparison).
The units are the (seed, test case) pairs both sides have; the difference a - b is the paired bootstrap of
``evidence.paired_difference`` (10,000 resamples, seeded), on the mean over organs, on the small organs
(``--small-labels``, e.g. the groups the benchmark's report names for its cohort) and per organ. Two work
folders made from the same seed hold the same cohort and split, so their test scans pair up.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import group_statistic, paired_difference


def read_side(spec: str, seeds: list[int] | None) -> dict[tuple[int, str], dict[int, float]]:
    """``FILE[,FILE...]:METHOD`` -> {(seed, case): {label: dice}}."""
    paths, _, method = spec.rpartition(":")
    if not paths or not method:
        raise SystemExit(f"{spec!r}: expected FILE:METHOD, e.g. bench160/report/per_case.csv:tak")
    scores: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    for path in paths.split(","):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["method"] != method or (seeds is not None and int(row["seed"]) not in seeds):
                    continue
                unit, label = (int(row["seed"]), row["case"]), int(row["label"])
                if label in scores[unit]:
                    raise SystemExit(f"{path}: {method} seed {unit[0]} case {unit[1]} label {label} is also in "
                                     f"another file of {spec!r}; give each seed's report once")
                scores[unit][label] = float(row["dice"])
    if not scores:
        raise SystemExit(f"{paths} has no rows of method {method!r}" + (f" for seeds {seeds}" if seeds else ""))
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="FILE:METHOD, the first method (the difference is a - b)")
    p.add_argument("--b", required=True, help="FILE:METHOD, the second method")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: all shared)")
    p.add_argument("--small-labels", type=int, nargs="*", default=[], help="labels of the small-organ group")
    p.add_argument("--dataset-json", help="dataset.json for the organs' names")
    args = p.parse_args(argv)
    a, b = read_side(args.a, args.seeds), read_side(args.b, args.seeds)
    units = sorted(set(a) & set(b))
    if not units:
        raise SystemExit(f"no (seed, case) pair is in both {args.a} and {args.b}")
    labels = sorted(set().union(*(a[u].keys() for u in units)))
    names = {label: str(label) for label in labels}
    if args.dataset_json:
        names.update({v: k for k, v in json.loads(Path(args.dataset_json).read_text())["labels"].items()
                      if isinstance(v, int)})
    mat_a = np.array([[a[u].get(label, np.nan) for label in labels] for u in units])
    mat_b = np.array([[b[u].get(label, np.nan) for label in labels] for u in units])
    seeds = sorted({s for s, _ in units})
    print(f"{args.a} - {args.b}: {len(units)} (seed, case) pairs, seeds {seeds}; Dice, bootstrap 95% intervals")
    print(f"  a: mean {float(group_statistic(mat_a)):.3f}, b: mean {float(group_statistic(mat_b)):.3f} (mean over "
          "cases per organ, then over organs)")
    print(f"  mean over organs: {paired_difference(mat_a, mat_b).describe()}")
    small = [labels.index(label) for label in args.small_labels if label in labels]
    if small:
        print(f"  small organs: {paired_difference(mat_a, mat_b, small).describe()}")
    for k, label in enumerate(labels):
        print(f"  {names[label]}: {paired_difference(mat_a, mat_b, [k]).describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
