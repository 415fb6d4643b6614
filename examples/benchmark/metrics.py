"""Per-class segmentation metrics in physical units on the original image grid: Dice, normalised
surface distance (NSD, surface Dice at a tolerance in mm) and HD95 in mm.

Surfaces are the boundary voxels of each mask (voxels with a 6-neighbour outside it); distances are
exact Euclidean distance transforms with the image spacing. NSD counts boundary voxels within the
tolerance (a voxel-count approximation of the surface-area definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class ClassMetrics:
    dice: float  # NaN when the class is in neither mask
    nsd: float  # NaN when the class is in neither mask
    hd95: float  # mm; the image diagonal when exactly one mask is empty; NaN when both are


def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def class_metrics(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> ClassMetrics:
    """Binary masks pred, gt [*S] (same grid) with voxel ``spacing`` in mm (same axis order)."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 and n_gt == 0:
        return ClassMetrics(math.nan, math.nan, math.nan)
    dice = 2.0 * float((pred & gt).sum()) / (n_pred + n_gt)
    if n_pred == 0 or n_gt == 0:
        diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing, strict=True))))
        return ClassMetrics(dice, 0.0, diagonal)
    # crop to the union's bounding box plus a margin: distances beyond it are not needed exactly
    coords = np.argwhere(pred | gt)
    lo = np.maximum(coords.min(0) - 2, 0)
    hi = np.minimum(coords.max(0) + 3, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    pred, gt = pred[box], gt[box]
    border_pred, border_gt = _border(pred), _border(gt)
    dist_to_gt = ndimage.distance_transform_edt(~border_gt, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~border_pred, sampling=spacing)
    d_pred = dist_to_gt[border_pred]  # each predicted surface voxel -> nearest true surface
    d_gt = dist_to_pred[border_gt]
    nsd = float(((d_pred <= tolerance_mm).sum() + (d_gt <= tolerance_mm).sum()) / (d_pred.size + d_gt.size))
    hd95 = float(max(np.percentile(d_pred, 95), np.percentile(d_gt, 95)))
    return ClassMetrics(dice, nsd, hd95)


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], labels: list[int],
                 tolerance_mm: float) -> dict[int, ClassMetrics]:
    """Label maps pred, gt [*S] -> {label: metrics} for every foreground label."""
    return {label: class_metrics(pred == label, gt == label, spacing, tolerance_mm) for label in labels}
