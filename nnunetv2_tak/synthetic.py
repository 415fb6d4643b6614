"""Seeded synthetic abdominal CT-like cohorts in nnU-Net v2 raw format (quickstart, tests, benchmark).

Anatomy lives in a body frame measured in millimetres on a reference extent ``_REF_EXTENT`` (z, y, x);
every voxel centre of the requested grid is mapped into that frame, so changing ``CohortSpec.shape``
keeps the anatomy proportional. Axes follow ITK's LPS convention with an identity direction: z grows
towards the head, y towards the back (posterior), x towards the patient's left, so the patient's right
organs sit at small x indices. Organs are implicit functions (``f < 1`` inside): unions of ellipsoids and
tubes along polylines, posed per subject (shift, scale, rotation) and deformed by a few low-frequency
cosines. Labels follow the AMOS order; later organs in ``_ORGANS`` overwrite earlier ones. The aorta and
IVC start at the iliac bifurcation (lower abdomen) and run cranially out of the field of view; the iliac
vessels below are unlabelled, as in AMOS. A cropped field of view is a shifted z window on the same body.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

logger = logging.getLogger(__name__)

AMOS_LABELS: tuple[str, ...] = (
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum",
    "bladder", "prostate/uterus",
)  # AMOS label order, values 0..15

(SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, GALLBLADDER, ESOPHAGUS, LIVER, STOMACH, AORTA, IVC, PANCREAS,
 RIGHT_ADRENAL, LEFT_ADRENAL, DUODENUM, BLADDER, PROSTATE_UTERUS) = range(1, 16)

Vec3 = tuple[float, float, float]

_REF_EXTENT = np.array([240.0, 288.0, 288.0])  # body-frame extent (mm, z y x) that a grid is mapped onto
_BOX_PAD = 1.2  # bounding boxes grow by this factor (plus _BOX_PAD_MM) to hold the cosine deformation
_BOX_PAD_MM = 2.0
_MAX_SHIFT = 0.06  # per-subject organ shift, fraction of the reference extent (times the organ's mobility)
_MAX_ROTATION_DEG = 10.0  # per-subject organ rotation (times the organ's mobility)
_SIZE_JITTER = 0.15
_HU_JITTER = 10.0
_TEXTURE_STD = 10.0
_TEXTURE_SIGMA = 1.0  # voxels
_BLUR_SIGMA = 0.6  # voxels
_FOV_SHIFT_RANGE = (0.15, 0.35)  # z window shift of a cropped field of view, fraction of the z extent

_AIR, _FAT, _MUSCLE, _CSF = -1000.0, -100.0, 50.0, 15.0
_BONE_CORTEX, _BONE_CANCELLOUS, _BONE_ARCH, _BONE_PELVIS, _DISC = 700.0, 450.0, 650.0, 550.0, 90.0
_LUNG, _HEART, _GAS, _ARTERY, _VEIN = -850.0, 45.0, -600.0, 175.0, 120.0
_MUSCLE_WALL_MM = 15.0


@dataclass(frozen=True)
class CohortSpec:
    """Geometry and appearance of a synthetic cohort."""

    shape: tuple[int, int, int] = (48, 96, 96)  # z, y, x voxels
    spacing: tuple[float, float, float] = (5.0, 3.0, 3.0)  # mm, z y x (full-size body at this grid)
    noise_std: float = 25.0  # HU
    fov_crop_probability: float = 0.3  # chance that a case's z field of view cuts some organs off

    def __post_init__(self) -> None:
        shape = tuple(int(v) for v in self.shape)
        spacing = tuple(float(v) for v in self.spacing)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive ints (z, y, x), got {self.shape!r}")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive floats (z, y, x), got {self.spacing!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not 0.0 <= self.fov_crop_probability <= 1.0:
            raise ValueError(f"fov_crop_probability must be in [0, 1], got {self.fov_crop_probability}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)


# --- implicit primitives -----------------------------------------------------------------------------


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """3x3 rotation acting on (z, y, x) vectors: about the z axis, then y, then x (degrees)."""
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=float))
    about_z = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    about_x = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def _combine(matrix: np.ndarray, vectors: Sequence[np.ndarray]) -> list[np.ndarray]:
    """matrix [3, 3] applied to a vector field given as three broadcastable component arrays."""
    return [sum(float(matrix[i, j]) * vectors[j] for j in range(3)) for i in range(3)]


@dataclass(frozen=True)
class _Ellipsoid:
    centre: Vec3
    radii: Vec3
    angles: Vec3 = (0.0, 0.0, 0.0)  # orientation, degrees about z, y, x

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        centre, reach = np.asarray(self.centre), max(self.radii)
        return centre - reach, centre + reach

    def field(self, q: Sequence[np.ndarray]) -> np.ndarray:
        """Implicit function on coordinates q (three broadcastable arrays, mm); < 1 inside."""
        offset = [q[i] - self.centre[i] for i in range(3)]
        if any(self.angles):
            offset = _combine(_rotation(self.angles).T, offset)
        return sum((offset[i] / self.radii[i]) ** 2 for i in range(3))


@dataclass(frozen=True)
class _Tube:
    points: tuple[Vec3, ...]  # polyline, mm
    radii: tuple[float, ...]  # radius at each point, linearly interpolated along segments
    squash: Vec3 = (1.0, 1.0, 1.0)  # cross-section scale per axis (e.g. a flattened vein)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        points, reach = np.asarray(self.points), max(self.radii)
        return points.min(axis=0) - reach, points.max(axis=0) + reach

    def field(self, q: Sequence[np.ndarray]) -> np.ndarray:
        """(distance to the polyline / local radius)^2 with the squash applied; < 1 inside."""
        scaled = [q[i] / self.squash[i] for i in range(3)]
        points = (np.asarray(self.points) / np.asarray(self.squash)).tolist()
        best = None
        for a, b, ra, rb in zip(points[:-1], points[1:], self.radii[:-1], self.radii[1:], strict=True):
            direction = [b[i] - a[i] for i in range(3)]
            rel = [scaled[i] - a[i] for i in range(3)]
            length2 = sum(d * d for d in direction)
            t = np.clip(sum(rel[i] * direction[i] for i in range(3)) / length2, 0.0, 1.0)
            dist2 = sum((rel[i] - t * direction[i]) ** 2 for i in range(3))
            value = dist2 / (ra + t * (rb - ra)) ** 2
            best = value if best is None else np.minimum(best, value)
        return best


_Part = _Ellipsoid | _Tube


def _parts_bounds(parts: Sequence[_Part]) -> tuple[np.ndarray, np.ndarray]:
    los, his = zip(*(part.bounds() for part in parts), strict=True)
    return np.min(los, axis=0), np.max(his, axis=0)


@dataclass(frozen=True)
class _Organ:
    label: int
    parts: tuple[_Part, ...]
    hu: float
    mobility: float = 1.0  # scales the per-subject shift and rotation
    wobble: float = 1.0  # scales the cosine deformation
    follows: int | None = None  # label whose pose carries this organ (adrenal on kidney, ...)
    rim_hu: float = 0.0  # added near the surface (0.55 < f < 1), e.g. enhanced renal cortex
    core_hu: float = 0.0  # added deep inside (f < 0.2)
    gas: _Ellipsoid | None = None  # lumen gas pocket (template frame), present in about half the subjects

    @property
    def pivot(self) -> np.ndarray:
        lo, hi = _parts_bounds(self.parts)
        return (lo + hi) / 2

    @property
    def size(self) -> float:
        lo, hi = _parts_bounds(self.parts)
        return float(np.max(hi - lo))


def _adrenal(centre: Vec3, side: float) -> tuple[_Part, ...]:
    """Two thin plates meeting at the anterior apex: a lambda/Y shape in axial slices (side: -1 right)."""
    z, y, x = centre
    return (_Ellipsoid((z + 2, y - 4, x + 2 * side), (16.0, 13.0, 3.5), (30.0 * side, 0.0, 0.0)),
            _Ellipsoid((z - 2, y + 3, x - 4 * side), (14.0, 12.0, 3.5), (-30.0 * side, 0.0, 0.0)))


# Paint order: large organs first, small ones last (later ones overwrite). Body frame: z up, y posterior,
# x patient-left; coordinates in mm on the reference extent, origin at its centre.
_ORGANS: tuple[_Organ, ...] = (
    _Organ(LIVER, (_Ellipsoid((44.0, 0.0, -40.0), (72.0, 80.0, 74.0)),
                   _Ellipsoid((70.0, -42.0, 10.0), (36.0, 30.0, 55.0), (-10.0, 0.0, 0.0))),
           hu=60.0, mobility=0.6),
    _Organ(STOMACH, (_Ellipsoid((72.0, 2.0, 48.0), (36.0, 38.0, 33.0)),
                     _Ellipsoid((38.0, -40.0, 32.0), (42.0, 28.0, 35.0), (0.0, -30.0, 0.0)),
                     _Tube(((18.0, -48.0, 12.0), (22.0, -40.0, -15.0)), (14.0, 12.0))),
           hu=30.0, gas=_Ellipsoid((45.0, -52.0, 38.0), (16.0, 10.0, 16.0))),
    _Organ(SPLEEN, (_Ellipsoid((55.0, 28.0, 72.0), (48.0, 52.0, 25.0), (-40.0, 0.0, 0.0)),),
           hu=55.0, mobility=0.8),
    _Organ(BLADDER, (_Ellipsoid((-88.0, -25.0, 0.0), (30.0, 36.0, 44.0)),), hu=5.0, mobility=0.6),
    _Organ(RIGHT_KIDNEY, (_Ellipsoid((0.0, 35.0, -55.0), (52.0, 28.0, 25.0), (30.0, -15.0, 0.0)),),
           hu=150.0, mobility=0.6, rim_hu=25.0, core_hu=-45.0),
    _Organ(LEFT_KIDNEY, (_Ellipsoid((12.0, 35.0, 55.0), (52.0, 28.0, 25.0), (-30.0, 15.0, 0.0)),),
           hu=150.0, mobility=0.6, rim_hu=25.0, core_hu=-45.0),
    _Organ(PANCREAS, (_Tube(((12.0, -10.0, -32.0), (18.0, -12.0, -8.0), (24.0, -6.0, 20.0), (32.0, 4.0, 46.0),
                              (40.0, 14.0, 66.0)), (18.0, 14.0, 13.0, 12.0, 10.0)),),
           hu=45.0, mobility=0.5, wobble=0.6),
    _Organ(PROSTATE_UTERUS, (_Ellipsoid((-72.0, 12.0, 0.0), (24.0, 18.0, 28.0)),),
           hu=45.0, mobility=0.3, follows=BLADDER),
    _Organ(DUODENUM, (_Tube(((24.0, -32.0, -20.0), (30.0, -18.0, -45.0), (12.0, -10.0, -60.0),
                              (-12.0, -8.0, -50.0), (-16.0, -8.0, -15.0), (-10.0, -10.0, 12.0)),
                             (9.5, 9.5, 9.5, 9.5, 9.5, 9.0)),),
           hu=35.0, mobility=0.3, wobble=0.5, follows=PANCREAS),
    _Organ(IVC, (_Tube(((-58.0, 22.0, -20.0), (0.0, 20.0, -22.0), (80.0, 10.0, -28.0), (260.0, 5.0, -25.0)),
                       (11.0, 11.0, 11.5, 12.0), squash=(1.0, 0.7, 1.0)),),
           hu=120.0, mobility=0.15, wobble=0.3),
    _Organ(AORTA, (_Tube(((-45.0, 19.0, 8.0), (0.0, 18.0, 12.0), (120.0, 20.0, 14.0), (260.0, 20.0, 20.0)),
                         (11.0, 12.5, 12.5, 12.5)),),
           hu=180.0, mobility=0.15, wobble=0.3),
    _Organ(GALLBLADDER, (_Ellipsoid((18.0, -45.0, -55.0), (34.0, 15.0, 18.0), (0.0, 0.0, 35.0)),),
           hu=10.0, mobility=0.4, follows=LIVER),
    _Organ(ESOPHAGUS, (_Tube(((58.0, -6.0, 30.0), (85.0, -6.0, 12.0), (260.0, -4.0, 4.0)), (8.5, 8.5, 8.5)),),
           hu=40.0, mobility=0.15, wobble=0.4),
    _Organ(RIGHT_ADRENAL, _adrenal((64.0, 32.0, -36.0), side=-1.0), hu=40.0, mobility=0.2, wobble=0.5,
           follows=RIGHT_KIDNEY),
    _Organ(LEFT_ADRENAL, _adrenal((62.0, 28.0, 37.0), side=1.0), hu=40.0, mobility=0.2, wobble=0.5,
           follows=LEFT_KIDNEY),
)


# --- grid, poses and evaluation ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # voxel-centre body-frame coordinates (mm) along z, y, x

    @classmethod
    def make(cls, shape: Sequence[int], z_shift: float) -> _Grid:
        axes = [((np.arange(n) + 0.5) / n * ext - ext / 2) for n, ext in zip(shape, _REF_EXTENT, strict=True)]
        axes[0] = axes[0] + z_shift
        return cls(tuple(a.astype(np.float32) for a in axes))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(a.size for a in self.axes)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in [lo, hi] (mm); None if empty."""
        slices = []
        for axis, low, high in zip(self.axes, lo, hi, strict=True):
            start, stop = int(np.searchsorted(axis, low)), int(np.searchsorted(axis, high, side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Open-grid coordinates of a box: arrays [n, 1, 1], [1, m, 1], [1, 1, k]."""
        z, y, x = (axis[s] for axis, s in zip(self.axes, box, strict=True))
        return [z[:, None, None], y[None, :, None], x[None, None, :]]


@dataclass(frozen=True)
class _Pose:
    pivot: np.ndarray  # [3] template point that the organ is rotated and scaled about
    shift: np.ndarray  # [3] translation, mm
    matrix: np.ndarray  # [3, 3] rotation @ diag(scale): template offsets -> world offsets

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """Template points [N, 3] -> world points [N, 3]."""
        return self.pivot + self.shift + (points - self.pivot) @ self.matrix.T

    def to_template(self, coords: Sequence[np.ndarray]) -> list[np.ndarray]:
        rel = [coords[i] - np.float32(self.pivot[i] + self.shift[i]) for i in range(3)]
        back = _combine(np.linalg.inv(self.matrix), rel)
        return [back[i] + np.float32(self.pivot[i]) for i in range(3)]


@dataclass(frozen=True)
class _Waves:
    """Sum of low-frequency cosines added to an implicit function (smooth random shape deformation)."""

    wavevectors: np.ndarray  # [K, 3] rad/mm
    phases: np.ndarray  # [K]
    amplitudes: np.ndarray  # [K]

    def __call__(self, q: Sequence[np.ndarray]) -> np.ndarray:
        return sum(float(a) * np.cos(sum(float(k[i]) * q[i] for i in range(3)) + float(p))
                   for k, p, a in zip(self.wavevectors, self.phases, self.amplitudes, strict=True))


def _draw_pose(rng: np.random.Generator, organ: _Organ, parent: _Pose | None) -> _Pose:
    pivot = organ.pivot
    shift = rng.uniform(-1.0, 1.0, 3) * organ.mobility * _MAX_SHIFT * _REF_EXTENT
    if parent is not None:  # ride on the parent's pose, so the organ stays attached to it
        shift = shift + parent.to_world(pivot[None])[0] - pivot
    scale = rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER) * rng.uniform(0.95, 1.05, 3)
    angles = rng.uniform(-1.0, 1.0, 3) * _MAX_ROTATION_DEG * min(1.0, organ.mobility)
    return _Pose(pivot, shift, _rotation(angles) @ np.diag(scale))


def _draw_waves(rng: np.random.Generator, organ: _Organ, count: int = 3) -> _Waves:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = organ.size * rng.uniform(0.6, 1.4, count)
    return _Waves(directions * (2 * np.pi / wavelengths)[:, None], rng.uniform(0, 2 * np.pi, count),
                  rng.uniform(0.04, 0.1, count) * organ.wobble)


def _evaluate(parts: Sequence[_Part], grid: _Grid, pose: _Pose | None = None, waves: _Waves | None = None
              ) -> tuple[tuple[slice, slice, slice], list[np.ndarray], np.ndarray] | None:
    """Implicit function of a union of parts on its bounding box: (box, template coords q, f [box])."""
    lo, hi = _parts_bounds(parts)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * _BOX_PAD + _BOX_PAD_MM
    corners = centre + half * np.array([[sz, sy, sx] for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)])
    if pose is not None:
        corners = pose.to_world(corners)
    box = grid.box(corners.min(axis=0), corners.max(axis=0))
    if box is None:
        return None
    coords = grid.coords(box)
    q = pose.to_template(coords) if pose is not None else coords
    f = reduce(np.minimum, (part.field(q) for part in parts))
    if waves is not None:
        f = f + waves(q)
    return box, q, np.broadcast_to(f, tuple(s.stop - s.start for s in box))


# --- painting ----------------------------------------------------------------------------------------


def _ellipse(y: np.ndarray, x: np.ndarray, centre: tuple[float, float], radii: tuple[float, float]
             ) -> np.ndarray:
    """Inside mask of an axis-aligned ellipse in the (y, x) plane."""
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 < 1.0


def _paint_parts(image: np.ndarray, region: np.ndarray, grid: _Grid, parts: Sequence[_Part], hu: float,
                 reserved: np.ndarray | None = None) -> None:
    """Set image to hu inside a union of parts (within region [Z, Y, X]); optionally mark it reserved."""
    result = _evaluate(parts, grid)
    if result is None:
        return
    box, _, f = result
    mask = (f < 1.0) & region[box]
    image[box][mask] = hu
    if reserved is not None:
        reserved[box] |= mask


def _body_slice(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial body template: image [Y, X], abdominal cavity mask [Y, X], bone/muscle structures mask [Y, X]."""
    y, x = grid.axes[1][:, None], grid.axes[2][None, :]
    semi_y = 0.35 * _REF_EXTENT[1] * rng.uniform(0.96, 1.04)
    semi_x = 0.45 * _REF_EXTENT[2] * rng.uniform(0.96, 1.04)
    subcutaneous = rng.uniform(4.0, 12.0)
    wall_in = subcutaneous + _MUSCLE_WALL_MM
    image = np.full(y.shape[:1] + x.shape[1:], _AIR, dtype=np.float32)
    image[_ellipse(y, x, (0, 0), (semi_y, semi_x))] = _FAT + rng.uniform(-15, 15)
    image[_ellipse(y, x, (0, 0), (semi_y - subcutaneous, semi_x - subcutaneous))] = _MUSCLE
    cavity = _ellipse(y, x, (0, 0), (semi_y - wall_in, semi_x - wall_in))
    image[cavity] = _FAT + rng.uniform(-15, 15)
    paraspinal = _ellipse(y, x, (76, -30), (14, 20)) | _ellipse(y, x, (76, 30), (14, 20))
    image[paraspinal] = _MUSCLE
    vertebra = _ellipse(y, x, (48, 0), (16, 20))
    image[vertebra] = _BONE_CORTEX
    image[_ellipse(y, x, (48, 0), (13, 17))] = _BONE_CANCELLOUS
    canal_radius = np.hypot(y - 72, x)
    arch = ((canal_radius >= 8) & (canal_radius < 14)) | _ellipse(y, x, (90, 0), (10, 4))
    image[arch] = _BONE_ARCH
    image[canal_radius < 8] = _CSF
    return image, cavity, vertebra | arch | paraspinal | (canal_radius < 8)


def _paint_background(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Body, spine, muscles, pelvis, lungs, heart, bowel and iliac vessels: image [Z, Y, X] float32 and the
    mask [Z, Y, X] of voxels that organs may occupy (abdominal cavity minus bone and muscle)."""
    slice_image, cavity, structures = _body_slice(rng, grid)
    z, y, x = grid.coords(tuple(slice(0, n) for n in grid.shape))
    image = np.broadcast_to(slice_image, grid.shape).copy()
    reserved = np.broadcast_to(structures, grid.shape).copy()
    disc = ((z - rng.uniform(0, 34)) % 34 < 8) & _ellipse(y, x, (48, 0), (13, 17))
    image[np.broadcast_to(disc, grid.shape)] = _DISC
    psoas_radius = np.clip(4.0 + 0.16 * (25.0 - z), 0.0, 17.0) * (z < 25)
    psoas = ((y - 45) ** 2 + (np.abs(x) - 30) ** 2 < psoas_radius**2) & ~structures
    image[psoas] = _MUSCLE
    reserved |= psoas
    inside = np.broadcast_to(cavity, grid.shape)
    for side in (-1.0, 1.0):
        wing = _Ellipsoid((-85.0, 40.0, 82.0 * side), (40.0, 38.0, 7.0), (25.0 * side, 0.0, 0.0))
        _paint_parts(image, inside, grid, (wing,), _BONE_PELVIS, reserved)
    free = inside & ~reserved
    for side in (-1.0, 1.0):
        _paint_parts(image, free, grid, (_Ellipsoid((165.0, 25.0, 68.0 * side), (70.0, 60.0, 50.0)),), _LUNG)
    _paint_parts(image, free, grid, (_Ellipsoid((175.0, -25.0, 15.0), (55.0, 50.0, 60.0)),), _HEART)
    _paint_bowel(rng, image, free, grid)
    for side in (-1.0, 1.0):
        artery = _Tube(((-45.0, 19.0, 8.0), (-120.0, 32.0, 45.0 * side), (-260.0, 20.0, 70.0 * side)),
                       (6.0, 6.0, 6.0))
        vein = _Tube(((-58.0, 22.0, -20.0), (-125.0, 38.0, 40.0 * side), (-260.0, 28.0, 65.0 * side)),
                     (7.0, 7.0, 7.0))
        _paint_parts(image, free, grid, (artery,), _ARTERY)
        _paint_parts(image, free, grid, (vein,), _VEIN)
    return image, free


def _paint_bowel(rng: np.random.Generator, image: np.ndarray, free: np.ndarray, grid: _Grid) -> None:
    """Unlabelled bowel loops (soft tissue, some with gas) in the mid and lower abdomen."""
    for _ in range(int(rng.integers(10, 17))):
        centre = (rng.uniform(-85, 35), rng.uniform(-65, 10), rng.uniform(-80, 80))
        radii = tuple(rng.uniform(12, 24, 3).tolist())
        _paint_parts(image, free, grid, (_Ellipsoid(centre, radii),), rng.uniform(15, 45))
        if rng.random() < 0.4:
            _paint_parts(image, free, grid, (_Ellipsoid(centre, tuple(0.5 * r for r in radii)),), _GAS)


def _paint_organs(rng: np.random.Generator, grid: _Grid, image: np.ndarray, allowed: np.ndarray
                  ) -> np.ndarray:
    """Paint every organ of _ORGANS into image [Z, Y, X] (in place); returns the label map uint8 [Z, Y, X]."""
    label = np.zeros(grid.shape, dtype=np.uint8)
    poses: dict[int, _Pose] = {}
    for organ in _ORGANS:
        pose = _draw_pose(rng, organ, poses.get(organ.follows) if organ.follows is not None else None)
        poses[organ.label] = pose
        waves = _draw_waves(rng, organ)
        hu = organ.hu + rng.uniform(-_HU_JITTER, _HU_JITTER)
        gas = organ.gas is not None and rng.random() < 0.5
        gas_offset = rng.uniform(-6.0, 6.0, 3)
        result = _evaluate(organ.parts, grid, pose, waves)
        if result is None:
            continue
        box, q, f = result
        mask = (f < 1.0) & allowed[box]
        values = hu + organ.rim_hu * (f > 0.55) + organ.core_hu * (f < 0.2)
        label[box][mask] = organ.label
        image[box][mask] = values[mask]
        if gas:
            pocket = _Ellipsoid(tuple(np.add(organ.gas.centre, gas_offset).tolist()), organ.gas.radii)
            image[box][mask & (pocket.field(q) < 1.0)] = _GAS
    return label


def _draw_z_shift(rng: np.random.Generator, probability: float) -> float:
    """z offset (mm) of the field of view: 0, or a shift that moves the pelvis or the upper abdomen out."""
    if rng.random() >= probability:
        return 0.0
    return float(rng.choice((-1.0, 1.0)) * rng.uniform(*_FOV_SHIFT_RANGE) * _REF_EXTENT[0])


def make_case(rng: np.random.Generator, spec: CohortSpec) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject: image float32 [Z, Y, X] in HU-like units, label uint8 [Z, Y, X] in AMOS order.

    All randomness comes from rng; the output shape is spec.shape.
    """
    grid = _Grid.make(spec.shape, _draw_z_shift(rng, spec.fov_crop_probability))
    image, allowed = _paint_background(rng, grid)
    label = _paint_organs(rng, grid, image, allowed)
    texture = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), _TEXTURE_SIGMA)
    texture *= _TEXTURE_STD / max(float(texture.std()), 1e-6)
    image += texture * (label > 0)
    image += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(spec.noise_std)
    return ndimage.gaussian_filter(image, _BLUR_SIGMA), label


# --- dataset writing ---------------------------------------------------------------------------------

_SPLITS = (  # (split code for the seed, case prefix, image folder, label folder)
    (0, "case", "imagesTr", "labelsTr"),
    (1, "test", "imagesTs", "labelsTs"),
    (2, "unl", "imagesUnlabeled", None),
)


def _write_nifti(array: np.ndarray, path: Path, spacing: Sequence[float]) -> None:
    """Write a [Z, Y, X] array with spacing (z, y, x mm), origin 0 and identity direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), True)


def _check_arguments(dataset_id: int, dataset_name: str, counts: Sequence[int], seed: int,
                     label_names: Sequence[str]) -> list[str]:
    valid_id = isinstance(dataset_id, (int, np.integer)) and not isinstance(dataset_id, bool)
    if not valid_id or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", dataset_name):
        raise ValueError(f"dataset_name must be letters, digits, '_', '-' or '.', got {dataset_name!r}")
    if min(counts) < 0:
        raise ValueError(f"case counts must be >= 0, got {tuple(counts)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    names = [str(name) for name in label_names]
    if len(names) != len(AMOS_LABELS) or len(set(names)) != len(names):
        raise ValueError(f"label_names must be {len(AMOS_LABELS)} distinct names (the AMOS classes in order, "
                         f"background first), got {len(names)}: {names}")
    return names


def generate_dataset(raw_root: str | os.PathLike, dataset_id: int, dataset_name: str = "TAKSynthAbdomen",
                     num_training: int = 8, num_test: int = 0, num_unlabeled: int = 0,
                     spec: CohortSpec | None = None, seed: int = 0,
                     label_names: Sequence[str] = AMOS_LABELS) -> Path:
    """Write raw_root/DatasetXXX_name/ {imagesTr, labelsTr, imagesTs, labelsTs, imagesUnlabeled,
    dataset.json}; return the dataset folder.

    Case i of a split is drawn from SeedSequence(seed, spawn_key=(split, i)), so it does not depend on the
    other counts. label_names renames the 16 AMOS classes (index order kept). Never overwrites: a non-empty
    existing dataset folder raises FileExistsError.
    """
    spec = spec or CohortSpec()
    counts = (num_training, num_test, num_unlabeled)
    names = _check_arguments(dataset_id, dataset_name, counts, seed, label_names)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{dataset_name}"
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"dataset folder {folder} already exists and is not empty; not overwriting it")
    for (split, prefix, image_dir, label_dir), count in zip(_SPLITS, counts, strict=True):
        folders = [d for d in (image_dir, label_dir) if d is not None and (count > 0 or split == 0)]
        for name in folders:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))
            image, label = make_case(rng, spec)
            case = f"{prefix}_{index:04d}"
            _write_nifti(image, folder / image_dir / f"{case}_0000.nii.gz", spec.spacing)
            if label_dir is not None:
                _write_nifti(label, folder / label_dir / f"{case}.nii.gz", spec.spacing)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {name: index for index, name in enumerate(names)},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": dataset_name,
        "description": f"Abdominal CT-like cohort, synthetic, seeded (nnunetv2_tak.synthetic, seed={seed}, "
                       f"shape={list(spec.shape)}, spacing={list(spec.spacing)}); not patient data.",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    logger.info("wrote %d training, %d test and %d unlabeled synthetic cases to %s", *counts, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: write a synthetic dataset into nnU-Net's raw folder and print its path."""
    defaults = CohortSpec()
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_tak_make_synthetic",
        description="Write a seeded synthetic abdominal CT-like nnU-Net v2 dataset.")
    parser.add_argument("--raw-root", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="dataset id, 1..999")
    parser.add_argument("--name", default="TAKSynthAbdomen", help="dataset name (default: %(default)s)")
    parser.add_argument("--num-training", type=int, default=8,
                        help="labelled training cases (default: %(default)s)")
    parser.add_argument("--num-test", type=int, default=0, help="labelled test cases (default: %(default)s)")
    parser.add_argument("--num-unlabeled", type=int, default=0,
                        help="unlabelled cases (default: %(default)s)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=defaults.shape,
                        help="voxels (default: %(default)s)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=defaults.spacing,
                        help="mm (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default: %(default)s)")
    args = parser.parse_args(argv)
    raw_root = args.raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        parser.error("--raw-root was not given and the environment variable nnUNet_raw is not set")
    try:
        spec = CohortSpec(shape=tuple(args.shape), spacing=tuple(args.spacing))
        folder = generate_dataset(raw_root, args.dataset_id, args.name, args.num_training, args.num_test,
                                  args.num_unlabeled, spec=spec, seed=args.seed)
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
