"""The one rule for telling a box drawn on a slice from a 3D box, and the oriented box of oblique slices.

Slicer places an ROI with two clicks on a slice; `vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints`
then gives the zero side the length of the shortest other side (two clicks on an axial slice: 40 x 56
x 40 mm). Markups files saved from Slicer carry that padding, so the Slicer bridge and the `.mrk.json`
reader both call `roi_prompt`, which undoes it:

* the ROI's *slice axis* is the ROI axis that is thin (under `THIN_BOX_VOXELS` voxels), or the one the
  caller knows the two clicks shared (`slice_axis`, recorded at placement), or else the one padded by
  Slicer (its side equals the shortest other side; ties broken as `padded_axis` says);
* a slice whose plane is an IJK plane gives an axis-aligned `Box` thin along that IJK axis (so
  `box_hull` interpolates between slices, as for boxes drawn thin); any other plane (an oblique view,
  or an oblique volume) gives an `OrientedBox` in the slice plane's own frame;
* an ROI with no slice axis is a 3D box: the IJK bounds of its 8 corners.

Everything here is in continuous IJK of the image; the caller maps its physical frame (RAS or LPS)
with `to_ijk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import InputError
from .prompts import THIN_BOX_VOXELS, Box, box_from_corners, nearest_voxel
from .volume import Geometry

SAME_SIDE_TOLERANCE = 1e-4  # relative: Slicer copies the shortest side exactly
IN_PLANE_TOLERANCE = 1e-3  # an IJK component this small (in voxels per voxel of extent) is zero
HULL_STEP_VOXELS = 0.5  # oblique boxes are interpolated every half voxel along their normal
BOX_HALF_THICKNESS = 1.5  # like axis-aligned slice boxes, the box channel is 3 voxels thick
HULL_HALF_THICKNESS = 0.5

DETECT = -1  # `slice_axis` when nothing is known of how the ROI was placed (a file, a loaded scene)

ToIJK = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class OrientedBox:
    """A rectangle drawn on an oblique slice, in continuous IJK: centre and the two half-edge vectors
    (centre to the middle of an edge). Its normal is `normal_ijk`; it has no thickness of its own."""

    centre_ijk: tuple[float, float, float]
    half_u_ijk: tuple[float, float, float]
    half_v_ijk: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("centre_ijk", "half_u_ijk", "half_v_ijk"):
            object.__setattr__(self, name, tuple(float(c) for c in getattr(self, name)))
        if np.linalg.norm(np.cross(self.half_u_ijk, self.half_v_ijk)) == 0:
            raise InputError("an oriented box needs two independent edges")

    @property
    def normal_ijk(self) -> np.ndarray:
        normal = np.cross(self.half_u_ijk, self.half_v_ijk)
        return normal / np.linalg.norm(normal)

    def corners_ijk(self) -> np.ndarray:
        centre, u, v = (np.asarray(a) for a in (self.centre_ijk, self.half_u_ijk, self.half_v_ijk))
        return np.array([centre + su * u + sv * v for su in (-1, 1) for sv in (-1, 1)])

    def mapped(self, point_map: Callable[[np.ndarray], np.ndarray]) -> OrientedBox:
        """The box under an affine map of IJK (e.g. to a resampled working grid)."""
        centre = np.asarray(point_map(np.asarray(self.centre_ijk)), dtype=float)
        u = np.asarray(point_map(np.add(self.centre_ijk, self.half_u_ijk)), dtype=float) - centre
        v = np.asarray(point_map(np.add(self.centre_ijk, self.half_v_ijk)), dtype=float) - centre
        return OrientedBox(tuple(centre), tuple(u), tuple(v))

    def to_json(self) -> dict:
        return {"centre": list(self.centre_ijk), "half_u": list(self.half_u_ijk), "half_v": list(self.half_v_ijk)}


def padded_axis(size: np.ndarray, centre_ijk_along: np.ndarray | None = None, spacing_along: np.ndarray | None = None) -> int | None:
    """The ROI axis Slicer padded after two clicks (its side equals the shortest other side), or None.

    With several candidates (40 x 56 x 40 fits axes 0 and 2) the padded one is preferred where the ROI
    centre lies on a voxel centre (`centre_ijk_along[a]`: the centre's IJK coordinate along the IJK axis
    nearest ROI axis a; slice views step from slice to slice, clicks land anywhere), then the one with the
    coarsest voxel spacing (`spacing_along`; people draw on the acquired slices), then the last.
    """
    candidates = _padded_candidates(size)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    if centre_ijk_along is not None:
        on_slice = [a for a in candidates if abs(centre_ijk_along[a] - nearest_voxel(centre_ijk_along[a])) < 1e-2]
        if len(on_slice) == 1:
            return on_slice[0]
        candidates = on_slice or candidates
    if spacing_along is not None:
        coarsest = max(spacing_along[a] for a in candidates)
        candidates = [a for a in candidates if spacing_along[a] >= coarsest - 1e-6]
    return candidates[-1]


def _padded_candidates(size: np.ndarray) -> list[int]:
    """ROI axes whose side equals the shortest other side, as Slicer's padding leaves it."""
    size = np.asarray(size, dtype=float)
    candidates = []
    for axis in range(3):
        shortest = min(size[other] for other in range(3) if other != axis)
        if shortest > 0 and abs(size[axis] - shortest) <= SAME_SIDE_TOLERANCE * shortest:
            candidates.append(axis)
    return candidates


def roi_prompt(centre: np.ndarray, axes: np.ndarray, size: np.ndarray, to_ijk: ToIJK, geometry: Geometry,
               slice_axis: int | None = DETECT) -> Box | OrientedBox:
    """A box prompt in IJK from an ROI given in a physical frame.

    `centre` (3,), `axes` (3, 3) with the ROI's unit axes as columns and `size` (3,) in mm are in the
    frame that `to_ijk` maps to IJK. `slice_axis` is the ROI axis the two placing clicks shared, when
    known (None: placed as a 3D box, DETECT: unknown, recognise Slicer's padding); a known axis counts
    only while that side still has Slicer's padding: a box resized afterwards along it is 3D. A thin
    side always makes a slice box.
    """
    centre, axes, size = np.asarray(centre, float), np.asarray(axes, float), np.asarray(size, float)
    steps_ijk = np.array([to_ijk(centre + axes[:, a])[0] - to_ijk(centre)[0] for a in range(3)])  # IJK per mm, per ROI axis
    thin = [a for a in range(3) if size[a] * np.linalg.norm(steps_ijk[a]) < THIN_BOX_VOXELS]
    centre_ijk = to_ijk(centre)[0]
    if len(thin) == 1:
        axis = thin[0]
    elif slice_axis == DETECT:
        nearest = [int(np.argmax(np.abs(steps_ijk[a]))) for a in range(3)]
        axis = padded_axis(size, centre_ijk[nearest], np.asarray(geometry.spacing)[nearest])
    elif slice_axis is not None and slice_axis in _padded_candidates(size):
        axis = slice_axis
    else:
        axis = None
    if axis is None:
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        return box_from_corners(to_ijk(centre + (signs * size / 2.0) @ axes.T))
    u_axis, v_axis = [a for a in range(3) if a != axis]
    half_u = steps_ijk[u_axis] * size[u_axis] / 2.0
    half_v = steps_ijk[v_axis] * size[v_axis] / 2.0
    normal = np.cross(half_u, half_v)
    extent = np.abs(half_u) + np.abs(half_v)
    for ijk_axis in range(3):
        # the plane is an IJK slice when neither edge moves along that IJK axis
        if extent[ijk_axis] <= IN_PLANE_TOLERANCE * max(np.linalg.norm(half_u), np.linalg.norm(half_v)):
            lo, hi = centre_ijk - extent, centre_ijk + extent
            lo[ijk_axis] = hi[ijk_axis] = centre_ijk[ijk_axis]
            return Box(tuple(lo), tuple(hi))
    if np.linalg.norm(normal) == 0:
        raise InputError("the box has no area on its slice")
    return OrientedBox(tuple(centre_ijk), tuple(half_u), tuple(half_v))


def check_inside(box: OrientedBox, geometry: Geometry, name: str = "box") -> OrientedBox:
    """Refuse an oriented box that misses the image entirely (a box drawn on another volume's view)."""
    if not geometry.contains_ijk(np.vstack([box.corners_ijk(), box.centre_ijk])).any():
        raise InputError(f"{name} lies outside the image")
    return box


def rasterize_oriented(box: OrientedBox, shape_kji: tuple[int, int, int], half_thickness: float) -> np.ndarray:
    """Bool mask [k, j, i] of the voxels whose centre lies in the rectangle's slab of `half_thickness`
    voxels (measured along the normal in IJK) on either side of its plane."""
    mask = np.zeros(shape_kji, dtype=bool)
    _paint_oriented(mask, np.asarray(box.centre_ijk), np.asarray(box.half_u_ijk), np.asarray(box.half_v_ijk), half_thickness)
    return mask


def _paint_oriented(mask: np.ndarray, centre: np.ndarray, half_u: np.ndarray, half_v: np.ndarray, half_thickness: float) -> None:
    normal = np.cross(half_u, half_v)
    normal = normal / np.linalg.norm(normal) * half_thickness
    frame = np.column_stack([half_u, half_v, normal])  # IJK = centre + frame @ (s, t, w), |s|,|t|,|w| <= 1
    reach = np.abs(frame).sum(axis=1)
    shape_ijk = mask.shape[::-1]
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, shape_ijk)
    if np.any(hi <= lo):
        return
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")  # i, j, k
    offsets = np.stack([g.ravel() for g in grids], axis=1) - centre
    coordinates = offsets @ np.linalg.inv(frame).T
    inside = np.all(np.abs(coordinates) <= 1.0 + 1e-9, axis=1).reshape(grids[0].shape)
    region = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    mask[region] |= inside.transpose(2, 1, 0)


def oriented_hull(boxes: list[OrientedBox], shape_kji: tuple[int, int, int]) -> np.ndarray:
    """Oblique slice boxes of one view (parallel planes) linearly interpolated between consecutive
    ones along their normal, like `box_hull` does for IJK slices; a lone box contributes itself."""
    hull = np.zeros(shape_kji, dtype=bool)
    groups: list[list[OrientedBox]] = []
    for box in boxes:
        for group in groups:
            if abs(float(np.dot(group[0].normal_ijk, box.normal_ijk))) > 1 - 1e-3:
                group.append(box)
                break
        else:
            groups.append([box])
    for group in groups:
        normal = group[0].normal_ijk
        group = sorted(group, key=lambda b: float(np.dot(b.centre_ijk, normal)))
        for box in group:
            _paint_oriented(hull, np.asarray(box.centre_ijk), np.asarray(box.half_u_ijk), np.asarray(box.half_v_ijk), HULL_HALF_THICKNESS)
        for first, second in zip(group, group[1:]):
            _fill_between_oriented(hull, first, second, normal)
    return hull


def _fill_between_oriented(hull: np.ndarray, first: OrientedBox, second: OrientedBox, normal: np.ndarray) -> None:
    """Rectangles every half voxel between two parallel boxes; edges are matched by direction so a
    box whose edges were listed the other way round does not twist the hull."""
    u2, v2 = np.asarray(second.half_u_ijk), np.asarray(second.half_v_ijk)
    u1, v1 = np.asarray(first.half_u_ijk), np.asarray(first.half_v_ijk)
    if abs(np.dot(u1, v2)) * np.linalg.norm(u2) > abs(np.dot(u1, u2)) * np.linalg.norm(v2):
        u2, v2 = v2, u2
    u2 = u2 if np.dot(u1, u2) >= 0 else -u2
    v2 = v2 if np.dot(v1, v2) >= 0 else -v2
    c1, c2 = np.asarray(first.centre_ijk), np.asarray(second.centre_ijk)
    distance = abs(float(np.dot(c2 - c1, normal)))
    steps = max(int(np.ceil(distance / HULL_STEP_VOXELS)), 1)
    for step in range(1, steps):
        weight = step / steps
        _paint_oriented(hull, (1 - weight) * c1 + weight * c2, (1 - weight) * u1 + weight * u2,
                        (1 - weight) * v1 + weight * v2, HULL_HALF_THICKNESS)
