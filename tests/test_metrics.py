"""Dice, NSD and HD95 in millimetres on hand-checkable masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metrics import case_metrics, class_metrics


def _cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_identical_masks():
    gt = _cube((20, 20, 20), (5, 5, 5), 6)
    m = class_metrics(gt, gt, (2.0, 1.0, 1.0), tolerance_mm=1.0)
    assert (m.dice, m.nsd, m.hd95) == (1.0, 1.0, 0.0)


def test_shift_along_an_anisotropic_axis_is_measured_in_mm():
    gt = _cube((20, 20, 20), (5, 5, 5), 6)
    pred = _cube((20, 20, 20), (6, 5, 5), 6)  # one voxel along axis 0, spacing 3 mm there
    m = class_metrics(pred, gt, (3.0, 1.0, 1.0), tolerance_mm=3.0)
    assert m.dice == pytest.approx(2 * 5 / 12)
    assert m.hd95 == pytest.approx(3.0)  # no surface voxel is farther than one 3-mm step
    assert m.nsd == 1.0  # everything within 3 mm
    tight = class_metrics(pred, gt, (3.0, 1.0, 1.0), tolerance_mm=0.5)
    assert 0.0 < tight.nsd < 1.0  # the side faces still coincide, the shifted caps do not


def test_empty_masks():
    gt = _cube((10, 10, 10), (2, 2, 2), 3)
    empty = np.zeros_like(gt)
    missed = class_metrics(empty, gt, (1.0, 1.0, 1.0), 1.0)
    assert missed.dice == 0.0 and missed.nsd == 0.0 and missed.hd95 == pytest.approx(math.sqrt(300))
    both = class_metrics(empty, empty, (1.0, 1.0, 1.0), 1.0)
    assert math.isnan(both.dice) and math.isnan(both.nsd) and math.isnan(both.hd95)


def test_case_metrics_per_label():
    gt = np.zeros((10, 10, 10), dtype=np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    gt[6:9, 6:9, 6:9] = 2
    pred = gt.copy()
    pred[pred == 2] = 0
    out = case_metrics(pred, gt, (1.0, 1.0, 1.0), [1, 2, 3], 1.0)
    assert out[1].dice == 1.0 and out[2].dice == 0.0 and math.isnan(out[3].dice)
