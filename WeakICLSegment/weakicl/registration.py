"""Where the context says the structure is, moved onto a target: the atlas prior.

Task tokens tell the network what a structure looks like, not where it lies among look-alikes (anterior
versus posterior hippocampus, left versus right kidney). Registering each reference image to the target
and carrying its annotation along gives that location; the mean over references is a probabilistic
atlas in [0, 1] that the decoder reads in its mask channel and corrects. Affine, Mattes mutual
information (any modality or intensity scale), in physical LPS space, with SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import MutableMapping, Sequence

import numpy as np

from .preprocess import bounding_box
from .progress import ProgressCallback, silent
from .volume import Geometry, image_on_grid

MIN_COARSE_VOXELS = 16  # the coarsest registration level keeps at least this many voxels per axis
SHRINK_FACTORS = (8, 4, 2, 1)
LEVELS = 3
# levels finer than the first of at most this many voxels are skipped (None: none): an affine prior needs no
# 1M-voxel level (MNI152 onto a 224x192x160 brain MR, white / grey matter prior Dice 0.427 / 0.379 with levels
# 8, 4, 2 and 0.434 / 0.390 with 8, 4, 2.4 s instead of 11.4 s for both: scripts/registration_levels.py)
FINEST_LEVEL_MAX_VOXELS: int | None = 64**3
ITERATIONS = 100
SAMPLING_FRACTION = 0.2
HISTOGRAM_BINS = 32


@dataclass
class AtlasItem:
    """One reference: its normalised image on `geometry` and what its annotation says there (in [0, 1]).

    Only the prior's bounding box (plus one voxel of zeros) is kept, on `prior_geometry`: a task holds
    its references as long as it lives, and a few slice boxes cover a small part of a CT.
    """

    image: np.ndarray
    geometry: Geometry
    prior: np.ndarray
    key: str  # content digest of the reference volume
    prior_offset_kji: tuple[int, int, int] = (0, 0, 0)  # where `prior` starts on `geometry` when it is a crop
    prior_geometry: Geometry = field(init=False)

    def __post_init__(self) -> None:
        prior = np.asarray(self.prior, dtype=np.float32)
        bounds = bounding_box(prior > 0)
        if bounds is not None:
            lo = np.maximum(bounds[0] - 1, 0)
            hi = np.minimum(bounds[1] + 2, prior.shape)
        else:
            lo, hi = np.zeros(3, dtype=int), np.ones(3, dtype=int)
        self.prior = prior[tuple(slice(a, b) for a, b in zip(lo, hi))].copy()
        lo = lo + np.asarray(self.prior_offset_kji, dtype=int)
        origin = self.geometry.ijk_to_lps(lo[::-1][None].astype(float))[0]
        self.prior_geometry = Geometry(self.geometry.spacing, tuple(float(c) for c in origin), self.geometry.direction, self.prior.shape)


def shrink_factors(shape_kji: Sequence[int]) -> list[int]:
    """Multi-resolution levels, coarse to fine, that keep MIN_COARSE_VOXELS on the smallest axis, the finest
    of at most FINEST_LEVEL_MAX_VOXELS voxels where one is."""
    usable = [f for f in SHRINK_FACTORS if min(shape_kji) / f >= MIN_COARSE_VOXELS] or [1]
    if FINEST_LEVEL_MAX_VOXELS is not None:
        voxels = float(np.prod(shape_kji, dtype=float))
        usable = [f for f in usable if voxels / f**3 <= FINEST_LEVEL_MAX_VOXELS] or usable[:1]
    return usable[:LEVELS]


def register_affine(moving: np.ndarray, moving_geometry: Geometry, fixed: np.ndarray, fixed_geometry: Geometry,
                    progress: ProgressCallback = silent):
    """Affine transform mapping fixed physical points to moving ones (ITK's convention), started from
    aligned centres of mass (of the image grids when an image is blank); that start alone when the
    optimiser fails. Both images are averaged over blocks of the finest level's shrink factor first.
    `progress` hears every optimiser iteration (a large volume takes seconds); an exception raised from
    it (Cancel) stops the optimiser and is raised once ITK has returned, since ITK does not pass
    exceptions from its callbacks on."""
    import SimpleITK as sitk

    factors = shrink_factors(fixed.shape)
    if factors[-1] > 1:  # ITK's pyramid smooths the full images at every level: 11 of 12 s for a 128x256x256 CT
        fixed, fixed_geometry = block_mean(fixed, fixed_geometry, factors[-1])
        moving, moving_geometry = block_mean(moving, moving_geometry, factors[-1])
        factors = [f // factors[-1] for f in factors]
    fixed_image = image_on_grid(_non_negative(fixed), fixed_geometry)
    moving_image = image_on_grid(_non_negative(moving), moving_geometry)
    try:
        initial = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.AffineTransform(3),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError:  # zero mass: a constant image
        return sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.AffineTransform(3),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, 1)  # fixed seed: the same inputs give the same prior
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, ITERATIONS)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(factors)
    method.SetSmoothingSigmasPerLevel([f / 2 for f in factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    raised: list[BaseException] = []

    def report() -> None:
        if raised:  # stopping ends one resolution level: stop each of the rest at its first iteration
            method.StopRegistration()
            return
        done = (method.GetCurrentLevel() + method.GetOptimizerIteration() / ITERATIONS) / len(factors)
        try:
            progress(min(done, 1.0), "registering")
        except BaseException as error:
            raised.append(error)
            method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, report)
    try:
        transform = method.Execute(fixed_image, moving_image)
    except RuntimeError:  # e.g. too few overlapping samples: keep the centred start
        transform = initial
    if raised:
        raise raised[0]
    return transform


def block_mean(image: np.ndarray, geometry: Geometry, factor: int) -> tuple[np.ndarray, Geometry]:
    """`image` averaged over blocks of `factor`³ voxels (a partial block at an end dropped; an axis shorter
    than `factor` kept whole), on the grid of the blocks' centres."""
    steps = [factor if n >= factor else 1 for n in image.shape]
    blocks = [n // step for n, step in zip(image.shape, steps)]
    cropped = np.asarray(image, dtype=np.float32)[tuple(slice(0, b * step) for b, step in zip(blocks, steps))]
    averaged = cropped.reshape(blocks[0], steps[0], blocks[1], steps[1], blocks[2], steps[2]).mean(axis=(1, 3, 5))
    centre_ijk = (np.asarray(steps[::-1], dtype=float) - 1.0) / 2.0
    origin = geometry.ijk_to_lps(centre_ijk[None])[0]
    spacing = tuple(s * step for s, step in zip(geometry.spacing, steps[::-1]))
    return averaged, Geometry(spacing, tuple(float(c) for c in origin), geometry.direction, averaged.shape)


def _non_negative(image: np.ndarray) -> np.ndarray:
    """Intensities shifted to start at 0: centres of mass need non-negative mass (mutual information
    does not mind the shift)."""
    image = np.asarray(image, dtype=np.float32)
    return image - image.min()


def atlas_prior(items: Sequence[AtlasItem], target: np.ndarray, target_geometry: Geometry, target_key: str,
                progress: ProgressCallback = silent,
                transforms: MutableMapping | None = None) -> np.ndarray:
    """Mean of the references' priors resampled onto the target grid (float32 in [0, 1]).

    A reference that is the target itself (same content) needs no registration, only resampling.
    `transforms` caches registrations by (reference key, target key): classes and context sets that
    share a reference register it once.
    """
    import SimpleITK as sitk

    reference_grid = image_on_grid(np.zeros(target.shape, dtype=np.float32), target_geometry)
    total = np.zeros(target.shape, dtype=np.float32)
    for number, item in enumerate(items, 1):
        step = f"aligning context {number}/{len(items)} to the target"
        progress((number - 1) / len(items), step)
        pair = (item.key, target_key)
        if item.key == target_key:
            transform = sitk.Transform(3, sitk.sitkIdentity)
        elif transforms is not None and pair in transforms:
            transform = transforms[pair]
        else:
            transform = register_affine(item.image, item.geometry, target, target_geometry,
                                        lambda fraction, message: progress((number - 1 + fraction) / len(items), f"{step}: {message}"))
            if transforms is not None:
                transforms[pair] = transform
        moved = sitk.Resample(image_on_grid(item.prior, item.prior_geometry), reference_grid, transform, sitk.sitkLinear, 0.0)
        total += sitk.GetArrayFromImage(moved)
    return np.clip(total / max(len(items), 1), 0.0, 1.0)
