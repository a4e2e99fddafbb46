"""Prompts derived from a dense mask, the way people draw them; shared by evaluation and training.

Deterministic for a given `numpy.random.Generator`, so every method of an evaluation sees the same prompts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .preprocess import bounding_box
from .prompts import Box, Point, PromptSet

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (the first of equals; empty when `mask` is). Sizes
    come from one bincount: `ndimage.sum_labels` over thousands of components of a noisy whole-volume
    mask took 0.25 s of a 256³ volume's 0.83 s on a GPU machine."""
    components, count = ndimage.label(mask, FULL_CONNECTIVITY)
    if count < 2:
        return components > 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def slice_fractions(slices: int) -> tuple[float, ...]:
    """Evenly spaced interior fractions of the extent: 3 slices -> 25%, 50%, 75%."""
    return tuple((n + 1) / (slices + 1) for n in range(slices))


def slice_positions(mask: np.ndarray, fractions, axis: int = 0) -> list[int]:
    """Array indices along `axis` at the given fractions of the structure's extent (always on the structure)."""
    other_axes = tuple(a for a in range(3) if a != axis)
    occupied = np.flatnonzero(mask.any(axis=other_axes))
    if occupied.size == 0:
        return []
    lo, hi = occupied[0], occupied[-1]
    positions = []
    for fraction in fractions:
        target = lo + fraction * (hi - lo)
        positions.append(int(occupied[np.argmin(np.abs(occupied - target))]))
    return sorted(set(positions))


def slice_boxes(mask: np.ndarray, fractions=(0.25, 0.5, 0.75), axis: int = 0, jitter: float = 0.0, rng: np.random.Generator | None = None) -> PromptSet:
    """Tight 2D boxes of the structure on slices at `fractions` of its extent along array axis `axis`.

    `jitter` moves each side by up to that fraction of the box size (drawn from `rng`), as hands do.
    """
    mask = np.asarray(mask, dtype=bool)
    boxes = []
    for position in slice_positions(mask, fractions, axis):
        section = np.take(mask, position, axis=axis)
        rows, cols = np.nonzero(section)
        lo = np.array([rows.min(), cols.min()], dtype=float)
        hi = np.array([rows.max(), cols.max()], dtype=float)
        if jitter > 0:
            size = hi - lo + 1
            lo = lo - rng.uniform(-jitter, jitter, 2) * size
            hi = hi + rng.uniform(-jitter, jitter, 2) * size
            limit = np.array(section.shape, dtype=float) - 1
            lo, hi = np.clip(lo, 0, limit), np.clip(hi, 0, limit)
            hi = np.maximum(hi, lo)
        lo_kji, hi_kji = np.insert(lo, axis, position), np.insert(hi, axis, position)
        boxes.append(Box(tuple(lo_kji[::-1]), tuple(hi_kji[::-1])))
    return PromptSet(boxes=boxes)


def interior_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> list[Point]:
    """Positive points drawn with probability rising with the distance to the border (people click inside)."""
    distance = ndimage.distance_transform_edt(mask)
    return [Point(ijk, True) for ijk in _sample_voxels(distance**2, count, rng)]


def background_points(mask: np.ndarray, count: int, rng: np.random.Generator, margin_vox: int = 5) -> list[Point]:
    """Negative points in a band of `margin_vox` voxels around the structure."""
    mask = np.asarray(mask, dtype=bool)
    band = ndimage.binary_dilation(mask, FULL_CONNECTIVITY, iterations=margin_vox) & ~mask
    return [Point(ijk, False) for ijk in _sample_voxels(band.astype(float), count, rng)]


def _sample_voxels(weights: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    flat = weights.ravel().astype(float)
    total = flat.sum()
    if total <= 0 or count <= 0:
        return []
    chosen = rng.choice(flat.size, size=count, replace=count > np.count_nonzero(flat), p=flat / total)
    return [tuple(float(c) for c in np.unravel_index(index, weights.shape)[::-1]) for index in chosen]


def corrective_click(prediction: np.ndarray, truth: np.ndarray, jitter: float = 0.0,
                     rng: np.random.Generator | None = None) -> Point | None:
    """The click the field's protocol simulates: the voxel farthest from the border inside the largest
    26-connected error component; positive where the prediction misses, negative where it overshoots.
    With `jitter` (and `rng`), an off-centre click as people place them: a random voxel of the component
    at least (1 - 5 jitter) of that depth inside it (jitter 0.1: anywhere in its deeper half)."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    best_size, best = 0, None
    for error, positive in ((truth & ~prediction, True), (prediction & ~truth, False)):
        components, count = ndimage.label(error, FULL_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes))
        if sizes[largest] > best_size:
            best_size, best = sizes[largest], (components == largest + 1, positive)
    if best is None:
        return None
    component, positive = best
    # depths within the component's bounding box, padded by one voxel outside it: the same distances as
    # over the whole array (the nearest voxel outside the component is never farther), found in the
    # same order, for a fraction of the time on a large volume (0.7 of the training's click simulation)
    lo, hi = bounding_box(component)
    distance = ndimage.distance_transform_edt(np.pad(component[tuple(slice(a, b + 1) for a, b in zip(lo, hi))], 1))[1:-1, 1:-1, 1:-1]
    if jitter > 0 and rng is not None:
        deep = np.argwhere(distance >= max(1.0, distance.max() * (1.0 - 5.0 * jitter)))
        kji = deep[int(rng.integers(len(deep)))] + lo
    else:
        kji = np.asarray(np.unravel_index(int(np.argmax(distance)), distance.shape)) + lo
    return Point(tuple(float(c) for c in kji[::-1]), positive)


def ideal_local_fix(prediction: np.ndarray, truth: np.ndarray, click: Point, radius_mm: float | None,
                    spacing_kji) -> np.ndarray:
    """`prediction` as a perfect editor would correct it at a protocol `click`: its 26-connected error
    component at the click's voxel flipped, within `radius_mm` of the click (None: the whole component).
    Why: the ceiling of what corrections that act near a click can reach (`scripts/click_ceiling.py`);
    an engine's own corrections are measured against it. A click on no error changes nothing."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    voxel = tuple(int(round(c)) for c in click.ijk[::-1])
    error = (truth & ~prediction) if click.positive else (prediction & ~truth)
    if not error[voxel]:
        return prediction.copy()
    if radius_mm is not None:
        reach = np.floor(radius_mm / np.asarray(spacing_kji, dtype=float)).astype(int)
        lo = np.maximum(np.asarray(voxel) - reach, 0)
        hi = np.minimum(np.asarray(voxel) + reach + 1, prediction.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        axes = np.ogrid[box]
        ball = sum(((axis - centre) * float(size)) ** 2 for axis, centre, size in zip(axes, voxel, spacing_kji)) <= radius_mm**2
        within = np.zeros_like(error)
        within[box] = error[box] & ball
        error = within
    components, _ = ndimage.label(error, FULL_CONNECTIVITY)
    fixed = prediction.copy()
    fixed[components == components[voxel]] = click.positive
    return fixed
