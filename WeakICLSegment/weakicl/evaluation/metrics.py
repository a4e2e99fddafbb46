"""Overlap and surface metrics for one binary structure, and bootstrap summaries over cases.

Dice, the 95th-percentile Hausdorff distance and the normalised surface Dice come from MONAI so that
numbers are comparable with published work; the voxel spacing is always passed, so distances are in mm.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..simulation import FULL_CONNECTIVITY

SURFACE_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class Scores:
    """The metrics of one prediction; `hd95` is None when either mask is empty (it is undefined then)."""

    dice: float
    hd95: float | None
    nsd: float


def _crop_to_union(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel: surface distances do not
    change, and whole-body volumes stop costing seconds per structure."""
    corners = np.argwhere(prediction | truth)
    lo = np.maximum(corners.min(axis=0) - 1, 0)
    hi = corners.max(axis=0) + 2
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    return prediction[region], truth[region]


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient; 1.0 when both masks are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def score(prediction: np.ndarray, truth: np.ndarray, spacing_kji: tuple[float, float, float],
          tolerance_mm: float = SURFACE_TOLERANCE_MM) -> Scores:
    """Dice, HD95 (mm) and surface Dice at `tolerance_mm` for boolean [k, j, i] masks."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    overlap = dice(prediction, truth)
    if not prediction.any() or not truth.any():
        return Scores(overlap, None, float(prediction.any() == truth.any()))
    cropped = [torch.from_numpy(mask[None, None].astype(np.float32)) for mask in _crop_to_union(prediction, truth)]
    spacing = [float(s) for s in spacing_kji]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about deprecated defaults on every call
        hd95 = compute_hausdorff_distance(*cropped, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(*cropped, [tolerance_mm], include_background=True, spacing=spacing)
    return Scores(overlap, float(hd95.item()), float(nsd.item()))


@dataclass(frozen=True)
class Interval:
    """A mean with its seeded 95% percentile-bootstrap interval over `n` values."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n}


def bootstrap_mean(values: list[float], seed: int = 0, resamples: int = 2000) -> Interval | None:
    """Mean and 95% bootstrap interval of the values (None entries dropped); None if nothing is left."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(data.mean()), float(low), float(high), int(data.size))


def click_curve_area(dice_after_clicks: list[float]) -> float:
    """Normalised area under Dice versus click number (trapezoids, x scaled to [0, 1]), in [0, 1]."""
    curve = np.asarray(dice_after_clicks, dtype=float)
    if curve.size == 1:
        return float(curve[0])
    return float(np.sum((curve[1:] + curve[:-1]) / 2.0) / (curve.size - 1))


@dataclass(frozen=True)
class ClickEffect:
    """What one corrective click changed. `depth_voxels` is the face-step (taxicab) distance from the
    click's voxel to the nearest voxel the previous result already put on the click's side (1: a face
    neighbour is, the click sits on the border; None: no such voxel). `component_voxels` is the error
    component (full connectivity) the click sits in, `fixed_in_component` the voxels of it the correction
    changed; `right_changes` and `wrong_changes` count every changed voxel that is now right or now wrong."""

    depth_voxels: int | None
    component_voxels: int
    fixed_in_component: int
    right_changes: int
    wrong_changes: int


def click_effect(previous: np.ndarray, corrected: np.ndarray, truth: np.ndarray, voxel_kji: tuple[int, int, int],
                 positive: bool) -> ClickEffect:
    """Measure one click (placed at `voxel_kji` on `previous`, answered by `corrected`) against `truth`;
    all three masks share one grid."""
    on_other_side = previous != positive
    depth = None
    if not on_other_side.all():
        depth = int(ndimage.distance_transform_cdt(on_other_side, metric="taxicab")[voxel_kji])
    error = (truth & ~previous) if positive else (previous & ~truth)
    components, _ = ndimage.label(error, FULL_CONNECTIVITY)
    label = components[voxel_kji]
    component = (components == label) if label else np.zeros_like(error)
    changed = corrected != previous
    now_right = corrected == truth
    return ClickEffect(depth, int(component.sum()), int((component & changed).sum()),
                       int((changed & now_right).sum()), int((changed & ~now_right).sum()))
