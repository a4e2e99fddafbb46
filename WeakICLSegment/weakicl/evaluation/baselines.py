"""Model-free baselines that see exactly the prompts the model sees.

Each works on a crop around the prompts (never around the truth) so that 50 hippocampi with all
baselines take seconds, and pastes its answer back into a full-size mask. Box interpolation, GrowCut
and threshold need target boxes, so they are not applicable to the cross-subject protocols or to point
prompts; the atlas baseline is the classical answer to exactly those protocols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geodesic import BACKGROUND_GAP_MM, ellipsoid_element
from ..preprocess import normalize_intensity
from ..prompts import PROMPT_CHANNELS, Box, Point, PromptSet, foreground_prior, mask_channels, rasterize
from ..registration import AtlasItem, atlas_prior
from ..simulation import largest_component
from ..volume import Geometry, Volume, volume_digest
from .protocols import Method, NotApplicable, Settings, Trial

CLICK_RADIUS_MM = 3.0  # a corrective click paints or erases a ball of this radius (box-interp) or seeds it (growcut)
# GrowCut seeds, chosen on 30 structures of the hippocampus *training* split (never on validation), with
# the background gap the engine's geodesic competition shares (weakicl.geodesic.BACKGROUND_GAP_MM):
SEED_FRACTION = 0.5  # foreground seeds: the central half of each box, which lies inside convex-ish shapes
RANDOM_WALKER_BETA = 500.0  # for intensities scaled to [0, 1] by the crop's 1st-99th percentiles
CROP_MARGIN_VOX = 3  # voxels of background seeds kept around GrowCut's unknown region
GROWCUT_MIN_SIDE = 3  # voxels a side below which Slicer's vtkImageGrowCutSegment refuses an image
HULL, POSITIVE, NEGATIVE = (PROMPT_CHANNELS.index(name) for name in ("box_hull", "positive", "negative"))


@dataclass
class Crop:
    """A sub-volume with the prompts and clicks moved into its voxel coordinates."""

    region: tuple[slice, slice, slice]
    volume: Volume
    prompts: PromptSet
    clicks: list[Point]

    def paste(self, mask: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
        full = np.zeros(shape_kji, dtype=bool)
        full[self.region] = mask
        return full


def crop_around(volume: Volume, prompts: PromptSet, clicks: list[Point], margin_kji: np.ndarray) -> Crop:
    """Crop to the bounding box of the prompts and clicks plus `margin_kji` voxels per array axis."""
    corners_ijk = [b.lo_ijk for b in prompts.boxes] + [b.hi_ijk for b in prompts.boxes]
    corners_ijk += [p.ijk for p in prompts.points + clicks]
    corners_kji = np.asarray(corners_ijk, dtype=float)[:, ::-1]
    shape = np.asarray(volume.geometry.shape_kji)
    lo = np.clip(np.floor(corners_kji.min(axis=0)).astype(int) - margin_kji, 0, shape - 1)
    hi = np.clip(np.ceil(corners_kji.max(axis=0)).astype(int) + margin_kji + 1, 1, shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    offset = np.asarray(lo[::-1], dtype=float)  # IJK
    geometry = volume.geometry
    cropped = Geometry(geometry.spacing, tuple(geometry.ijk_to_lps(offset)[0]), geometry.direction, tuple(hi - lo))
    moved = PromptSet([Box(tuple(np.subtract(b.lo_ijk, offset)), tuple(np.subtract(b.hi_ijk, offset))) for b in prompts.boxes],
                      [_moved(p, offset) for p in prompts.points])
    return Crop(region, Volume(volume.array[region], cropped, volume.modality), moved, [_moved(p, offset) for p in clicks])


def _moved(point: Point, offset: np.ndarray) -> Point:
    return Point(tuple(np.subtract(point.ijk, offset)), point.positive)


def click_ball(click: Point, geometry: Geometry) -> np.ndarray:
    """Voxels within CLICK_RADIUS_MM of a click, via the engine's own point rasterisation."""
    channel = POSITIVE if click.positive else NEGATIVE
    return rasterize(PromptSet(points=[click]), geometry, point_radius_mm=CLICK_RADIUS_MM)[channel] > 0


def box_interpolation(prompts: PromptSet, geometry: Geometry) -> np.ndarray:
    """The boxes interpolated between annotated slices: the engine's `box_hull` prompt channel."""
    return rasterize(PromptSet(boxes=prompts.boxes), geometry)[HULL] > 0.5


def hull_reach_slices(prompts: PromptSet, spacing: tuple[float, float, float], axis: int) -> int:
    """How many slices the structure likely extends beyond the outermost boxes, along their slice axis
    (IJK `axis`).

    Boxes at evenly spaced fractions leave one gap beyond each end; a lone box is assumed to extend
    as far along its slice axis as half its mean in-plane size.
    """
    positions = sorted(b.lo_ijk[axis] for b in prompts.boxes)
    if len(positions) > 1:
        return int(np.ceil((positions[-1] - positions[0]) / (len(positions) - 1)))
    box = prompts.boxes[0]
    half_mm = np.mean([(box.hi_ijk[a] - box.lo_ijk[a] + 1) * spacing[a] for a in range(3) if a != axis]) / 2
    return int(np.ceil(half_mm / spacing[axis]))


def extended_hull(hull: np.ndarray, reach: int, axis_kji: int) -> np.ndarray:
    """The box hull with its first and last annotated slices across array axis `axis_kji` repeated
    `reach` slices outwards."""
    hull = np.moveaxis(hull, axis_kji, 0)
    occupied = np.flatnonzero(hull.any(axis=(1, 2)))
    extended = hull.copy()
    if occupied.size:
        first, last = occupied[0], occupied[-1]
        extended[max(first - reach, 0):first] |= hull[first]
        extended[last + 1:last + 1 + reach] |= hull[last]
    return np.moveaxis(extended, 0, axis_kji)


class BaselineMethod(Method):
    """Shared applicability rule: a baseline needs target boxes."""

    supports_clicks = True

    def check(self, settings: Settings) -> None:
        if settings.uses_context_subjects:
            raise NotApplicable("no target prompt: a model-free baseline cannot use other subjects")
        if settings.prompt_kind != "boxes":
            raise NotApplicable("needs box prompts")
        if settings.protocol == "interactive" and not self.supports_clicks:
            raise NotApplicable("cannot take corrective clicks")


class BoxInterpolation(BaselineMethod):
    """The interpolated box hull; clicks paint (positive) or erase (negative) a ball, like a brush."""

    name = "box-interp"

    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        reach = np.ceil(CLICK_RADIUS_MM / np.asarray(trial.volume.geometry.spacing[::-1])).astype(int)
        crop = crop_around(trial.volume, trial.prompts, clicks, reach)  # room for a whole ball at a click
        mask = box_interpolation(crop.prompts, crop.volume.geometry)
        for click in crop.clicks:
            ball = click_ball(click, crop.volume.geometry)
            mask = mask | ball if click.positive else mask & ~ball
        return crop.paste(mask, trial.volume.geometry.shape_kji)

    def describe(self) -> dict:
        return {"click_radius_mm": CLICK_RADIUS_MM}


class GrowCut(BaselineMethod):
    """Seeded region growing: foreground = central half of each box, background = beyond the hull
    extended by one slice gap and BACKGROUND_GAP_MM; clicks add foreground or background seed balls."""

    name = "growcut"

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend or growcut_backend()

    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        spacing = trial.volume.geometry.spacing
        axis_ijk = trial.prompts.common_slice_axis(trial.volume.geometry)
        axis_ijk = 2 if axis_ijk is None else axis_ijk  # no slice box: along k, as the protocol draws them
        reach, axis_kji = hull_reach_slices(trial.prompts, spacing, axis_ijk), 2 - axis_ijk
        gap_vox = np.ceil(BACKGROUND_GAP_MM / np.asarray(spacing[::-1])).astype(int)
        margin = gap_vox + CROP_MARGIN_VOX + reach * (np.arange(3) == axis_kji)
        crop = crop_around(trial.volume, trial.prompts, clicks, margin)
        geometry = crop.volume.geometry
        unknown = extended_hull(box_interpolation(crop.prompts, geometry), reach, axis_kji)
        unknown = ndimage.binary_dilation(unknown, ellipsoid_element(gap_vox))
        seeds = np.where(unknown, 0, 2).astype(np.int16)
        for box in crop.prompts.boxes:
            seeds[_shrunken(box)] = 1
        for click in crop.clicks:
            seeds[click_ball(click, geometry)] = 1 if click.positive else 2
        image = crop.volume.array.astype(np.float32)
        labels = _grow_slicer(image, seeds) if self.backend == "slicer" else _random_walker(image, seeds, spacing[::-1])
        return crop.paste(labels == 1, trial.volume.geometry.shape_kji)

    def describe(self) -> dict:
        return {"backend": self.backend, "click_radius_mm": CLICK_RADIUS_MM, "seed_fraction": SEED_FRACTION,
                "background_gap_mm": BACKGROUND_GAP_MM}


def growcut_backend() -> str:
    """"slicer" when Slicer's vtkImageGrowCutSegment is importable (slicer-core or inside Slicer),
    else "random-walker" (scikit-image)."""
    try:
        import slicer

        slicer.vtkImageGrowCutSegment
    except (ImportError, AttributeError):
        return "random-walker"
    return "slicer"


def _shrunken(box: Box) -> tuple[slice, slice, slice]:
    """Array slices of the central SEED_FRACTION of a box (at least one voxel)."""
    bounds = []
    for axis in range(3):
        centre = (box.lo_ijk[axis] + box.hi_ijk[axis]) / 2
        half = (box.hi_ijk[axis] - box.lo_ijk[axis]) * SEED_FRACTION / 2
        bounds.append(slice(int(np.ceil(centre - half - 0.5)), int(np.floor(centre + half + 0.5)) + 1))
    return tuple(bounds[::-1])


def _grow_slicer(image: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Slicer's GrowCut labels; a crop thinner than the 3 voxels a side it requires (a structure on one
    or two thick slices) is padded for it by one voxel on both sides, with its edge intensities and
    unknown seeds, then cut back."""
    import slicer
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    def as_vtk(array: np.ndarray) -> vtkImageData:
        data = vtkImageData()
        data.SetDimensions(array.shape[::-1])
        data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
        return data

    padding = [(1, 1) if n < GROWCUT_MIN_SIDE else (0, 0) for n in image.shape]  # on both sides: one-sided, a
    grower = slicer.vtkImageGrowCutSegment()  # single slice grew nothing beyond its seeds
    grower.SetIntensityVolume(as_vtk(np.pad(image, padding, mode="edge")))
    grower.SetSeedLabelVolume(as_vtk(np.pad(seeds, padding)))
    grower.Update()
    padded_shape = tuple(n + before + after for n, (before, after) in zip(image.shape, padding))
    labels = numpy_support.vtk_to_numpy(grower.GetOutput().GetPointData().GetScalars()).reshape(padded_shape)
    return labels[tuple(slice(before, before + n) for n, (before, _) in zip(image.shape, padding))]


def _random_walker(image: np.ndarray, seeds: np.ndarray, spacing_kji: tuple[float, float, float]) -> np.ndarray:
    import warnings

    from skimage.segmentation import random_walker

    low, high = np.percentile(image, [1, 99])
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "probability range outside [0, 1]" on near-uniform crops
        return random_walker(scaled, seeds, beta=RANDOM_WALKER_BETA, mode="cg_j", spacing=np.asarray(spacing_kji))


class OtsuThreshold(BaselineMethod):
    """Otsu's threshold inside the box hull, the class (brighter or darker) that the box centres fall
    in on average, then the largest 26-connected component. Takes no clicks."""

    name = "threshold"
    supports_clicks = False

    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        from skimage.filters import threshold_otsu

        crop = crop_around(trial.volume, trial.prompts, [], np.zeros(3, dtype=int))
        hull = box_interpolation(crop.prompts, crop.volume.geometry)
        image = crop.volume.array.astype(np.float32)
        inside = image[hull]
        if inside.size == 0 or inside.min() == inside.max():
            return crop.paste(hull, trial.volume.geometry.shape_kji)
        level = threshold_otsu(inside)
        centres = [image[_shrunken(box)].mean() for box in crop.prompts.boxes]
        chosen = hull & ((image > level) if np.mean(centres) > level else (image <= level))
        chosen = largest_component(chosen)
        return crop.paste(chosen, trial.volume.geometry.shape_kji)


class AtlasRegistration(Method):
    """Multi-atlas segmentation: every context image registered to the target (affine, mutual
    information), its mask or its prompts' box hull carried along, the mean thresholded at 0.5.
    This is the model's atlas prior on its own, so the table shows what the network adds to it."""

    name = "atlas"

    def check(self, settings: Settings) -> None:
        if not settings.uses_context_subjects or settings.protocol == "interactive":
            raise NotApplicable("needs other subjects as the only context, and takes no clicks")

    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        items = [AtlasItem(_normalized(volume), volume.geometry, _annotation_prior(volume, annotation), volume_digest(volume))
                 for volume, annotation in trial.context]
        target = trial.volume
        return atlas_prior(items, _normalized(target), target.geometry, volume_digest(target)) >= 0.5


def _normalized(volume: Volume) -> np.ndarray:
    return normalize_intensity(volume.array, volume.modality)


def _annotation_prior(volume: Volume, annotation: PromptSet | np.ndarray) -> np.ndarray:
    channels = rasterize(annotation, volume.geometry) if isinstance(annotation, PromptSet) else mask_channels(annotation)
    return foreground_prior(channels)


BASELINES = {method.name: method for method in (BoxInterpolation, GrowCut, OtsuThreshold, AtlasRegistration)}
