"""Statistics of the evidence benchmark: paired bootstrap intervals of method differences, the fraction
of the gap to a reference that a method closes, organs stuck at 0 Dice, and pseudo-label quality counts.

Pure numpy, no nnU-Net imports. Shapes: U paired units (a unit is one (seed, test case) pair for which
both methods have a result), K organs. Dice of an organ that is in neither the prediction nor the
ground truth is NaN and does not count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """Point estimate and percentile bootstrap interval (``level``, e.g. 0.95)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0 (its sign is resolved)."""
        return bool(self.low > 0 or self.high < 0)

    def describe(self, digits: int = 3) -> str:
        """'+0.050 [0.020, 0.080]'."""
        if not math.isfinite(self.estimate):
            return "n/a"
        return f"{self.estimate:+.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def group_statistic(values: np.ndarray, organs: Sequence[int] | None = None) -> np.ndarray:
    """values [..., U, K] -> mean over organs (of ``organs``, default all) of the mean over units: [...].

    The same aggregation as the report's tables (mean over cases per organ, then over organs), NaNs
    skipped at both levels; NaN where no organ has a value."""
    if organs is not None:
        values = values[..., list(organs)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 'Mean of empty slice': an all-NaN organ is expected
        per_organ = np.nanmean(values, axis=-2)  # [..., K]
        return np.nanmean(per_organ, axis=-1)


def bootstrap_indices(num_units: int, resamples: int, seed: int,
                      clusters: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """[resamples, U] unit indices drawn with replacement (seeded).

    With ``clusters`` (one cluster id per unit, e.g. the seed), a two-stage resample: as many clusters as
    there are are drawn with replacement, then U units uniformly from the units of the drawn clusters
    (with replacement). Units of one seed share that seed's training, so this interval also carries
    the seed-to-seed spread, which a flat resample of (seed, case) units understates."""
    rng = np.random.default_rng(seed)
    if num_units == 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    if clusters is None:
        return rng.integers(0, num_units, size=(resamples, num_units))
    clusters = np.asarray(clusters)
    if clusters.shape != (num_units,):
        raise ValueError(f"clusters must give one id per unit ({num_units}), got shape {list(clusters.shape)}")
    ids = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in ids]
    out = np.empty((resamples, num_units), dtype=np.int64)
    for r in range(resamples):
        drawn = np.concatenate([members[i] for i in rng.integers(0, len(ids), size=len(ids))])
        out[r] = drawn[rng.integers(0, len(drawn), size=num_units)]
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, organs: Sequence[int] | None = None,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95,
                      clusters: Sequence[int] | np.ndarray | None = None) -> Interval:
    """Paired bootstrap of mean(a) - mean(b) over the same units.

    a, b: [U, K] per-unit, per-organ scores of two methods on the SAME units (row u of both is the same
    (seed, case)). The estimate is group_statistic(a - b); each resample draws U units with replacement
    (the same rows for both methods: pairing cancels what a case or seed does to both). NaN where either
    method has no value for an organ on a unit."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired scores must both be [units, organs]; got {list(a.shape)} and {list(b.shape)}")
    diff = a - b
    estimate = float(group_statistic(diff, organs))
    if diff.shape[0] == 0 or not math.isfinite(estimate):
        return Interval(math.nan, math.nan, math.nan, level)
    idx = bootstrap_indices(diff.shape[0], resamples, seed, clusters)
    stats = group_statistic(diff[idx], organs)  # [resamples]
    return _percentile_interval(estimate, stats, level)


@dataclass(frozen=True)
class GapFraction:
    """(method - baseline) / (reference - baseline) with its bootstrap interval; ``unstable`` is the
    share of resamples in which the reference is not above the baseline (the ratio means nothing there)."""

    interval: Interval
    unstable: float

    def describe(self, digits: int = 2) -> str:
        if not math.isfinite(self.interval.estimate):
            return "n/a (the reference is not above the baseline)"
        text = self.interval.describe(digits)
        if self.unstable > (1 - self.interval.level) / 2:
            text += f" (interval unreliable: reference not above baseline in {self.unstable:.0%} of resamples)"
        return text


def gap_fraction(method: np.ndarray, baseline: np.ndarray, reference: np.ndarray,
                 organs: Sequence[int] | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = 0.95, clusters: Sequence[int] | np.ndarray | None = None) -> GapFraction:
    """Fraction of the baseline-to-reference gap that ``method`` closes, all three [U, K] on the same
    units; the same resampled rows for numerator and denominator."""
    m, base, ref = (np.asarray(x, dtype=np.float64) for x in (method, baseline, reference))
    if not (m.shape == base.shape == ref.shape) or m.ndim != 2:
        raise ValueError(f"scores must all be [units, organs]; got {[list(x.shape) for x in (m, base, ref)]}")
    num, den = m - base, ref - base
    est_num, est_den = float(group_statistic(num, organs)), float(group_statistic(den, organs))
    if m.shape[0] == 0 or not (est_den > 0):
        return GapFraction(Interval(math.nan, math.nan, math.nan, level), 1.0)
    idx = bootstrap_indices(m.shape[0], resamples, seed, clusters)
    n, d = group_statistic(num[idx], organs), group_statistic(den[idx], organs)
    valid = d > 0
    with np.errstate(all="ignore"):
        ratio = np.where(valid, n / np.where(valid, d, 1.0), np.nan)
    unstable = float(1.0 - valid.mean())
    return GapFraction(_percentile_interval(est_num / est_den, ratio[valid], level), unstable)


def _percentile_interval(estimate: float, stats: np.ndarray, level: float) -> Interval:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return Interval(estimate, math.nan, math.nan, level)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high), level)


def stuck_organs(per_organ_dice: dict[int, float], threshold: float = 0.01) -> list[int]:
    """Organs whose test-set mean Dice is below ``threshold`` (never found; NaN does not count)."""
    return [k for k, v in per_organ_dice.items() if math.isfinite(v) and v < threshold]


# --- pseudo-label quality --------------------------------------------------------------------
def overlap_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_below: int = 0) -> np.ndarray:
    """Label maps pred, gt [*S] -> counts [3, num_classes]: intersection, predicted and true voxels per
    class. Voxels with gt < ``ignore_below`` (nnU-Net's -1 outside the nonzero mask) are skipped.
    Sum the counts over cases, then :func:`dice_from_counts`."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and labels differ in size: {pred.size} vs {gt.size} voxels")
    keep = gt >= ignore_below
    pred, gt = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    inter = np.bincount(gt[pred == gt], minlength=num_classes)[:num_classes]
    return np.stack([inter, np.bincount(pred, minlength=num_classes)[:num_classes],
                     np.bincount(gt, minlength=num_classes)[:num_classes]]).astype(np.float64)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """[3, C] (intersection, predicted, true) -> Dice [C]; NaN where a class is in neither."""
    inter, pred, true = counts
    with np.errstate(all="ignore"):
        return np.where(pred + true > 0, 2.0 * inter / (pred + true), np.nan)

