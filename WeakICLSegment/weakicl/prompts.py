"""Weak prompts (boxes, positive/negative points) and their rasterisation on an image grid.

Prompts live in continuous IJK voxel coordinates of the image they were drawn on. Files give them in
Slicer markups (`.mrk.json`, LPS or RAS) or in a voxel JSON (IJK).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .volume import Geometry

PROMPT_CHANNELS = ("box", "box_hull", "positive", "negative", "mask")
MASK_CHANNEL = PROMPT_CHANNELS.index("mask")
POINT_RADIUS_MM = 4.0  # a point prompt is a soft sphere of this radius
FOREGROUND_CHANNELS = [PROMPT_CHANNELS.index(name) for name in ("box", "box_hull", "positive", "mask")]
# an outermost slice box at most this many box gaps (and a slice: boxes lie on whole slices) from the image
# edge: the structure runs out of the image there, and the hull goes on to the edge (a spinal cord, an
# aorta; reports/ablations-0.6, `hull-not-to-edge`) ...
EDGE_REACH_GAPS = 1.0
MIN_EDGE_REACH_GAP = 2.0  # ... where the boxes lie at least this many slices apart: on 6 mm slices a hippocampus
# spans 4-6 slices of a tight crop, and reaching its edge added a whole slice at an end
# (reports/ablations-0.6-thick6, `edge-reach-any-gap`)
THIN_BOX_VOXELS = 2.0  # a box thinner than this along an axis was drawn on one slice
NEGATIVE_WORDS = ("neg", "background", "exclude")
MIN_BOX_VOXELS = 1.0  # a box narrower than this along two axes is a line or a dot, not a box
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in continuous IJK; corners are voxel centres included in the box."""

    lo_ijk: tuple[float, float, float]
    hi_ijk: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo_ijk", tuple(float(c) for c in self.lo_ijk))
        object.__setattr__(self, "hi_ijk", tuple(float(c) for c in self.hi_ijk))

    def thin_axes(self) -> list[int]:
        """IJK axes along which the box is a slice drawing rather than a 3D extent."""
        return [axis for axis in range(3) if self.hi_ijk[axis] - self.lo_ijk[axis] < THIN_BOX_VOXELS]


@dataclass(frozen=True)
class Point:
    ijk: tuple[float, float, float]
    positive: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ijk", tuple(float(c) for c in self.ijk))


@dataclass
class PromptSet:
    boxes: list[Box] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    oriented_boxes: list = field(default_factory=list)  # slicebox.OrientedBox: boxes drawn on oblique slices

    def is_empty(self) -> bool:
        return not self.boxes and not self.points and not self.oriented_boxes

    def __add__(self, other: PromptSet) -> PromptSet:
        return PromptSet(self.boxes + other.boxes, self.points + other.points, self.oriented_boxes + other.oriented_boxes)

    def validate(self, geometry: Geometry, require_prompts: bool = True) -> PromptSet:
        """The prompts to use: boxes past the image edge clipped to it (with a warning: Slicer users drag
        boxes past the edge). Raise InputError for empty sets, non-finite coordinates, inverted boxes, boxes
        under one voxel along two or more axes (a slice box is thin along one axis only) that are not
        slice boxes of the set as below, boxes wholly outside the image and points outside it. A box thin
        along several axes (a line or a dot included), one of them the slice axis
        of the set's other boxes, is theirs: a slice box THIN_BOX_VOXELS wide about its centre along the
        others (a structure one or two voxels across on a slice, the end of a hippocampus on 10 mm slices,
        whose tight box is a line; else it would neither be interpolated with them nor be a valid box)."""
        if require_prompts and self.is_empty():
            raise InputError("no prompts given: draw at least one box or point")
        slice_axis = self.common_slice_axis(geometry)
        boxes = []
        for number, box in enumerate(self.boxes, 1):
            if not np.all(np.isfinite(box.lo_ijk + box.hi_ijk)):
                raise InputError(f"box {number} has a coordinate that is not a finite number")
            if any(lo > hi for lo, hi in zip(box.lo_ijk, box.hi_ijk)):
                raise InputError(f"box {number} is inverted (min {_rounded(box.lo_ijk)} > max {_rounded(box.hi_ijk)})")
            clipped = clip_box(box, geometry)
            if clipped is None:
                raise InputError(f"box {number} lies outside the image of size {geometry.shape_ijk} (IJK)")
            if clipped != box and not geometry.contains_ijk(np.array([box.lo_ijk, box.hi_ijk])).all():
                log.warning("box %d reaches past the image edge; clipped to IJK %s-%s", number, _rounded(clipped.lo_ijk), _rounded(clipped.hi_ijk))
            extent = np.subtract(clipped.hi_ijk, clipped.lo_ijk)
            if slice_axis is not None and len(clipped.thin_axes()) >= 2 and slice_axis in clipped.thin_axes():
                clipped = widened_slice_box(clipped, slice_axis, geometry.shape_ijk)
                extent = np.subtract(clipped.hi_ijk, clipped.lo_ijk)
            if np.sum(extent < MIN_BOX_VOXELS) >= 2:
                raise InputError(f"box {number} spans less than one voxel along {np.sum(extent < MIN_BOX_VOXELS)} axes "
                                 f"(IJK extent {_rounded(extent)}): draw a box around the structure on a slice")
            boxes.append(clipped)
        for number, point in enumerate(self.points, 1):
            if not np.all(np.isfinite(point.ijk)) or not geometry.contains_ijk(point.ijk).all():
                raise InputError(f"point {number} at IJK {_rounded(point.ijk)} lies outside the image")
        return PromptSet(boxes, list(self.points), list(self.oriented_boxes))

    def common_slice_axis(self, geometry: Geometry) -> int | None:
        """The IJK axis along which every slice box of the set (a box thin along one axis only) is thin,
        or None (no slice box, or slice boxes of different axes)."""
        axes = set()
        for box in self.boxes:
            clipped = clip_box(box, geometry) if np.all(np.isfinite(box.lo_ijk + box.hi_ijk)) else None
            if clipped is not None and len(clipped.thin_axes()) == 1:
                axes.add(clipped.thin_axes()[0])
        return axes.pop() if len(axes) == 1 else None

    def to_voxel_json(self) -> dict:
        return {
            "coordinate_system": "IJK",
            "boxes": [{"min": list(b.lo_ijk), "max": list(b.hi_ijk)} for b in self.boxes],
            "points": [{"ijk": list(p.ijk), "positive": p.positive} for p in self.points],
            **({"oriented_boxes": [b.to_json() for b in self.oriented_boxes]} if self.oriented_boxes else {}),
        }


def clip_box(box: Box, geometry: Geometry) -> Box | None:
    """`box` cut to the image's voxel centres, the same box when it lies inside (borders included), or
    None when nothing of it is inside."""
    lo = np.maximum(box.lo_ijk, 0.0)
    hi = np.minimum(box.hi_ijk, np.asarray(geometry.shape_ijk, dtype=float) - 1)
    if np.any(lo > hi):
        return None
    clipped = Box(tuple(lo), tuple(hi))
    return box if clipped == box else clipped


def widened_slice_box(box: Box, slice_axis: int, shape_ijk=None) -> Box:
    """`box`, drawn on a slice across IJK axis `slice_axis`, at least THIN_BOX_VOXELS wide about its centre
    along the other two axes (less where the image of `shape_ijk` voxels is narrower), within the image
    (anywhere with `shape_ijk` None: a frame's boxes may lie beyond it): a slice box of that axis."""
    lo, hi = np.array(box.lo_ijk, dtype=float), np.array(box.hi_ijk, dtype=float)
    last = np.full(3, np.inf) if shape_ijk is None else np.asarray(shape_ijk, dtype=float) - 1
    for axis in box.thin_axes():
        if axis != slice_axis:
            width = min(THIN_BOX_VOXELS, last[axis])
            start = (lo[axis] + hi[axis] - width) / 2
            if shape_ijk is not None:
                start = float(np.clip(start, 0.0, last[axis] - width))
            lo[axis], hi[axis] = start, start + width
            if hi[axis] - lo[axis] < width:  # rounding: 0.34 + 2.0 - 0.34 can be 1.9999999999999998
                hi[axis] = np.nextafter(hi[axis], np.inf)
    return Box(tuple(lo), tuple(hi))


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 1) for v in values)


def box_from_corners(corners_ijk: np.ndarray) -> Box:
    corners = np.asarray(corners_ijk, dtype=float)
    return Box(tuple(corners.min(axis=0)), tuple(corners.max(axis=0)))


def read_prompts(path: str | os.PathLike, geometry: Geometry) -> PromptSet:
    """Read a `.mrk.json` (Slicer markups) or voxel JSON prompt file and validate it on `geometry`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompt file {path} is a folder; give a .mrk.json or voxel JSON file")
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: editors on Windows write a BOM
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise InputError(f"{path.name} is not valid JSON: {str(error)[:200]}") from None
    except OSError as error:
        raise InputError(f"cannot read prompt file {path}: {error.strerror}") from None
    if not isinstance(document, dict):
        raise InputError(f"{path.name}: expected a JSON object")
    try:
        if "markups" in document:
            _check_markups(document["markups"], path.name)
            prompts = prompts_from_markups(document, geometry, all_negative=_says_negative(path.name))
        elif "boxes" in document or "points" in document:
            prompts = prompts_from_voxel_json(document)
        else:
            raise InputError(f"{path.name}: neither Slicer markups nor voxel JSON (no 'markups', 'boxes' or 'points')")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as error:
        raise InputError(f"{path.name}: malformed prompt entry ({type(error).__name__}: {str(error)[:200]})") from None
    try:
        return prompts.validate(geometry)
    except InputError as error:
        raise InputError(f"{path.name}: {error}") from None


def _check_markups(markups, name: str) -> None:
    """The shape of a markups file that `prompts_from_markups` relies on: a list of objects, and ROI
    sizes that are finite and not negative (Slicer never writes negative sizes; taking their absolute
    value would hide a broken file)."""
    if not isinstance(markups, list) or not all(isinstance(markup, dict) for markup in markups):
        raise InputError(f"{name}: \"markups\" must be a list of markup objects")
    for markup in markups:
        if markup.get("type") == "ROI" and "size" in markup:
            size = np.asarray(markup["size"], dtype=float)
            if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size < 0):
                raise InputError(f"{name}: ROI size must be three finite, non-negative numbers, got {markup['size']}")


def prompts_from_voxel_json(document: dict) -> PromptSet:
    system = str(document.get("coordinate_system", "IJK")).upper()
    if system != "IJK":
        raise InputError(f"voxel JSON must use coordinate_system IJK, not {system}")
    boxes = [Box(_vector(entry["min"]), _vector(entry["max"])) for entry in document.get("boxes", [])]
    points = [Point(_vector(entry["ijk"]), _sign(entry.get("positive", True))) for entry in document.get("points", [])]
    return PromptSet(boxes, points)


def _sign(value) -> bool:
    """A point's "positive" as JSON true or false: a string such as "false" would count as true."""
    if not isinstance(value, bool):
        raise ValueError(f'"positive" must be true or false, got {json.dumps(value)}')
    return value


def prompts_from_markups(document: dict, geometry: Geometry, all_negative: bool = False) -> PromptSet:
    """ROI markups become boxes (their 8 corners mapped to IJK), point lists become points.

    Points are negative when `all_negative` (a file named "negative…"), when their list is named so, or
    when their label starts with "-" or says "neg"/"background"/"exclude" (Slicer's "F-1" stays positive).
    """
    prompts = PromptSet()
    for markup in document["markups"]:
        to_ijk = _physical_to_ijk(markup.get("coordinateSystem", "LPS"), geometry)
        kind = markup.get("type", "")
        if kind == "ROI":
            from .slicebox import OrientedBox, check_inside, roi_prompt  # slicebox builds on this module

            box = roi_prompt(*_roi_frame(markup), to_ijk, geometry)  # Slicer's two-click padding undone
            if isinstance(box, OrientedBox):
                prompts.oriented_boxes.append(check_inside(box, geometry, f"box '{markup.get('name', '')}'"))
            else:
                prompts.boxes.append(box)
        elif kind in ("Fiducial", "Point", "PointList"):
            list_negative = all_negative or _says_negative(markup.get("name", ""))
            for control_point in markup.get("controlPoints", []):
                if control_point.get("positionStatus", "defined") != "defined" or control_point.get("position") in ("", None):
                    continue  # Slicer saves points still being placed without a position
                negative = list_negative or _says_negative(control_point.get("label", "")) or _says_negative(control_point.get("description", ""))
                ijk = to_ijk(np.array([control_point["position"]], dtype=float))[0]
                prompts.points.append(Point(tuple(ijk), positive=not negative))
        else:
            raise InputError(f"unsupported markup type {kind!r}: use ROI boxes or point lists")
    return prompts


def _vector(values) -> tuple[float, float, float]:
    """Three coordinates given as JSON numbers (true would read as 1, "5" as 5)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"coordinates must be numbers, got {json.dumps(values)}")
    vector = tuple(float(v) for v in values)
    if len(vector) != 3:
        raise ValueError(f"expected 3 coordinates, got {len(vector)}")
    return vector


def _physical_to_ijk(system: str, geometry: Geometry):
    system = system.upper()
    if system == "LPS":
        return geometry.lps_to_ijk
    if system == "RAS":
        return geometry.ras_to_ijk
    raise InputError(f"unknown markups coordinateSystem {system!r} (expected LPS or RAS)")


def _roi_frame(markup: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A markups ROI's centre, unit axes (columns) and size, in the file's physical coordinates."""
    if "center" in markup:
        centre = np.array(markup["center"], dtype=float)
    else:
        centre = np.array(markup["controlPoints"][0]["position"], dtype=float)
    size = np.array(markup["size"], dtype=float)
    axes = np.array(markup.get("orientation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    return centre, axes, size


def _says_negative(text: str) -> bool:
    text = str(text).strip().lower()
    return text.startswith("-") or any(word in text for word in NEGATIVE_WORDS)


def rasterize(prompts: PromptSet, geometry: Geometry, point_radius_mm: float = POINT_RADIUS_MM,
              hull_extension_gaps: float = 0.0, slices_per_voxel_ijk=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Prompt channels (see PROMPT_CHANNELS) as a float32 array (5, K, J, I); `hull_extension_gaps`
    and `slices_per_voxel_ijk` as in `box_hull`."""
    channels = np.zeros((len(PROMPT_CHANNELS),) + geometry.shape_kji, dtype=np.float32)
    for box in prompts.boxes:
        channels[0][_box_slices(box, geometry.shape_kji, thicken=True)] = 1.0
    channels[1] = box_hull(prompts.boxes, geometry.shape_kji, hull_extension_gaps, slices_per_voxel_ijk)
    if prompts.oriented_boxes:
        from .slicebox import BOX_HALF_THICKNESS, oriented_hull, rasterize_oriented

        for box in prompts.oriented_boxes:
            channels[0][rasterize_oriented(box, geometry.shape_kji, BOX_HALF_THICKNESS)] = 1.0
        channels[1][oriented_hull(prompts.oriented_boxes, geometry.shape_kji)] = 1.0
    for point in prompts.points:
        _add_sphere(channels[2 if point.positive else 3], point.ijk, point_radius_mm, geometry.spacing)
    return channels


def mask_channels(mask: np.ndarray) -> np.ndarray:
    """Prompt channels of a dense-mask context: only the mask channel is set."""
    channels = np.zeros((len(PROMPT_CHANNELS),) + mask.shape, dtype=np.float32)
    channels[MASK_CHANNEL] = np.asarray(mask, dtype=np.float32) > 0.5
    return channels


def foreground_prior(channels: np.ndarray) -> np.ndarray:
    """Where prompt channels (5, ...) say the structure is, in [0, 1]: the maximum of box, hull,
    positive points and mask. This is what a context annotation can tell about another subject."""
    return np.asarray(channels)[FOREGROUND_CHANNELS].max(axis=0)


def box_hull(boxes: list[Box], shape_kji: tuple[int, int, int], extension_gaps: float = 0.0,
             slices_per_voxel_ijk=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boxes drawn on slices of one axis, linearly interpolated between consecutive annotated slices.

    This is the "box interpolation" prior: what a user's slice boxes say about the slices in between.
    With `extension_gaps`, two or more parallel slice boxes also say that the structure goes on past
    the outermost ones (people annotate inside a structure, not its first and last slice): their boxes
    are repeated outwards over that fraction of the mean gap between annotated slices, and on to the
    edge of the array where it lies within a gap (EDGE_REACH_GAPS; boxes at least MIN_EDGE_REACH_GAP
    slices of the image apart, `slices_per_voxel_ijk` of them per array voxel along each axis: a frame
    resamples them). 3D boxes and lone slice boxes contribute themselves.
    """
    hull = np.zeros(shape_kji, dtype=np.float32)
    by_axis: dict[int, list[Box]] = {}
    for box in boxes:
        thin = box.thin_axes()
        if len(thin) == 1:
            by_axis.setdefault(thin[0], []).append(box)
        else:
            hull[_box_slices(box, shape_kji, thicken=True)] = 1.0
    for axis, slice_boxes in by_axis.items():
        slice_boxes = sorted(slice_boxes, key=lambda b: _position(b, axis))
        for box in slice_boxes:
            hull[_box_slices(box, shape_kji, thicken=False)] = 1.0
        for first, second in zip(slice_boxes, slice_boxes[1:]):
            _fill_between(hull, first, second, axis)
        if extension_gaps > 0 and len(slice_boxes) > 1:
            _extend_outwards(hull, slice_boxes, axis, extension_gaps, float(slices_per_voxel_ijk[axis]))
    return hull


def _position(box: Box, axis: int) -> float:
    """Where a slice box lies along its thin axis (IJK)."""
    return (box.lo_ijk[axis] + box.hi_ijk[axis]) / 2


def _extend_outwards(hull: np.ndarray, slice_boxes: list[Box], axis: int, gaps: float, slices_per_voxel: float) -> None:
    """Repeat the outermost of sorted parallel slice boxes `gaps` mean box gaps beyond them, or to the
    array's edge (see `box_hull`)."""
    gap = (_position(slice_boxes[-1], axis) - _position(slice_boxes[0], axis)) / (len(slice_boxes) - 1)
    past = int(np.ceil(gaps * gap - 1e-6))
    may_reach_edge = gap * slices_per_voxel >= MIN_EDGE_REACH_GAP
    for box, direction in ((slice_boxes[0], -1), (slice_boxes[-1], 1)):
        start = nearest_voxel(_position(box, axis))
        to_edge = start if direction < 0 else hull.shape[2 - axis] - 1 - start
        reach = max(past, to_edge) if may_reach_edge and to_edge <= EDGE_REACH_GAPS * gap + 1 / slices_per_voxel else past
        for step in range(1, reach + 1):
            lo, hi = list(box.lo_ijk), list(box.hi_ijk)
            lo[axis] = hi[axis] = start + direction * step
            hull[_box_slices(Box(tuple(lo), tuple(hi)), hull.shape, thicken=False)] = 1.0


def _fill_between(hull: np.ndarray, first: Box, second: Box, axis: int) -> None:
    start, stop = _position(first, axis), _position(second, axis)
    for position in range(nearest_voxel(start), nearest_voxel(stop) + 1):
        weight = 0.0 if stop == start else (position - start) / (stop - start)
        weight = min(max(weight, 0.0), 1.0)
        lo = list((1 - weight) * np.array(first.lo_ijk) + weight * np.array(second.lo_ijk))
        hi = list((1 - weight) * np.array(first.hi_ijk) + weight * np.array(second.hi_ijk))
        lo[axis] = hi[axis] = position
        hull[_box_slices(Box(tuple(lo), tuple(hi)), hull.shape, thicken=False)] = 1.0


def nearest_voxel(coordinate: float) -> int:
    """Halves round up (not to even), so rasterisation does not depend on where a crop starts."""
    return int(np.floor(coordinate + 0.5))


def _box_slices(box: Box, shape_kji: tuple[int, int, int], thicken: bool) -> tuple[slice, slice, slice]:
    """Array slices [k, j, i] of the voxels inside a box, at least 3 voxels thick when `thicken`."""
    bounds = []
    for axis in range(3):
        lo, hi = nearest_voxel(box.lo_ijk[axis]), nearest_voxel(box.hi_ijk[axis])
        if thicken and hi - lo < 2:
            centre = (lo + hi) // 2
            lo, hi = centre - 1, centre + 1
        size = shape_kji[2 - axis]
        bounds.append(slice(max(lo, 0), min(hi + 1, size)))
    return tuple(bounds[::-1])


def _add_sphere(channel: np.ndarray, centre_ijk, radius_mm: float, spacing) -> None:
    """Soft sphere: 1 at the centre falling linearly to 0 at `radius_mm`, merged by maximum."""
    centre_kji = np.asarray(centre_ijk, dtype=float)[::-1]
    spacing_kji = np.asarray(spacing, dtype=float)[::-1]
    reach = np.ceil(radius_mm / spacing_kji).astype(int)
    lo = np.maximum(np.floor(centre_kji).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre_kji).astype(int) + reach + 1, channel.shape)
    if np.any(hi <= lo):
        return
    grids = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre_kji, spacing_kji)], indexing="ij")
    distance = np.sqrt(sum(g**2 for g in grids))
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    channel[region] = np.maximum(channel[region], np.clip(1.0 - distance / radius_mm, 0.0, 1.0))
