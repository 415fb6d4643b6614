"""The benchmark's report: per-organ tables (Dice, NSD, HD95; spread over seeds), organs stuck at 0, paired
differences with bootstrap intervals and where the voxels of an organ that got worse went, the fraction of
the stock-to-reference gap closed, the teachers' pseudo-label quality over training, and the cost table;
CSV files of every number and plots (``work``/report)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from methods import COMPARISONS

STUCK_DICE = 0.01  # an organ whose test mean Dice is below this is "stuck at 0"


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
            write_csv(out / name, table)
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
    write_csv(out / "pseudo_label_quality.csv", records)

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
    """Markdown lines: per method (median over seeds) the epoch time, the training's wall time, the method's
    total wall time (selftrain: the stock training it starts from + pseudo-labelling the pool + building and
    preprocessing its dataset + its own training; the others: their training), the test-set prediction and
    the confident pseudo-label fraction, with ratios to the stock trainer's (same plans, same iterations, one
    machine, one run)."""
    def median(method: str, key: str) -> float:
        values = [c.get(key, float("nan")) for c in costs if c["method"] == method]
        return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")

    methods = list(dict.fromkeys(c["method"] for c in costs))
    if not methods:  # only external predictions: nothing trained here
        return []
    base = "stock" if "stock" in methods else methods[0]
    lines = [f"### Cost (median over seeds; x: ratio to {base})", "",
             "| method | s / epoch | x | training [min] | total [min] | x | predict test set [s] | x | "
             "confident pseudo-labels (last epoch) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        epoch_s, total, predict_s = median(m, "epoch_s"), median(m, "total_min"), median(m, "predict_s")
        coverage = median(m, "pl_coverage")
        lines.append(f"| {m} | {epoch_s:.1f} | {epoch_s / median(base, 'epoch_s'):.2f} | "
                     f"{median(m, 'train_wall_min'):.1f} | {total:.1f} | {total / median(base, 'total_min'):.2f} | "
                     f"{predict_s:.1f} | {predict_s / median(base, 'predict_s'):.2f} | "
                     f"{'-' if np.isnan(coverage) else f'{coverage:.1%}'} |")
    lines += ["", "Training: the first epoch's start to the last epoch's end in nnU-Net's log (without start-up "
              "and final validation), also for trainings reused from an earlier run."]
    if "selftrain" in methods:
        lines.append(f"selftrain's total: the stock training it starts from "
                     f"{median('selftrain', 'first_train_wall_min'):.1f} min + the pool's pseudo-labels "
                     f"(nnUNetv2_predict) {median('selftrain', 'pseudo_label_predict_s'):.0f} s + its dataset "
                     f"(nnUNetv2_move_plans_between_datasets, nnUNetv2_preprocess) "
                     f"{median('selftrain', 'preprocess_s'):.0f} s + its own training "
                     f"{median('selftrain', 'train_wall_min'):.1f} min.")
    return [*lines, ""]


def write_csv(path: Path, table: list[dict]) -> None:
    """One row per dict; the columns are every key in order of first appearance (missing cells empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in table for k in row)))
        writer.writeheader()
        writer.writerows(table)


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
