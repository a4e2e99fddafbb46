"""The atlas prior: context annotations registered onto a target, on oblique and anisotropic grids."""

import numpy as np
import pytest

from conftest import ellipsoid, oblique_geometry
from weakicl import registration
from weakicl.evaluation.metrics import dice
from weakicl.registration import AtlasItem, atlas_prior, shrink_factors
from weakicl.volume import Geometry, image_on_grid


def anatomy(shape_kji=(40, 44, 48)):
    """Two ellipsoids of different brightness in noise: enough structure for mutual information."""
    rng = np.random.default_rng(3)
    organ = ellipsoid(shape_kji, (18, 20, 22), (8, 10, 9))
    neighbour = ellipsoid(shape_kji, (24, 30, 34), (6, 5, 7))
    image = (30 + 100 * organ + 60 * neighbour + rng.normal(0, 5, shape_kji)).astype(np.float32)
    return image, organ


def resampled_onto(image: np.ndarray, geometry: Geometry, target: Geometry, shift_mm, order: int) -> np.ndarray:
    """The same physical content on another grid, moved by `shift_mm` (LPS)."""
    import SimpleITK as sitk

    moved = sitk.TranslationTransform(3, [-s for s in shift_mm])  # ITK maps target points to source points
    grid = image_on_grid(np.zeros(target.shape_kji, np.float32), target)
    interpolator = sitk.sitkLinear if order else sitk.sitkNearestNeighbor
    return sitk.GetArrayFromImage(sitk.Resample(image_on_grid(image.astype(np.float32), geometry), grid, moved, interpolator, 0.0))


def test_a_mask_lands_on_the_moved_structure_across_oblique_and_anisotropic_grids():
    image, organ = anatomy()
    reference = Geometry.identity(image.shape, (1.0, 1.0, 1.0))
    target = Geometry((1.1, 0.9, 1.6), (2.0, 1.0, 4.0), oblique_geometry().direction, (30, 48, 44))
    shift = (4.0, -3.0, 2.5)
    target_image = resampled_onto(image, reference, target, shift, order=1)
    target_truth = resampled_onto(organ.astype(np.float32), reference, target, shift, order=0) > 0.5
    item = AtlasItem(image, reference, organ.astype(np.float32), "reference")
    prior = atlas_prior([item], target_image, target, "target")
    assert prior.shape == target.shape_kji and prior.dtype == np.float32
    assert dice(prior >= 0.5, target_truth) > 0.85
    unregistered = resampled_onto(organ.astype(np.float32), reference, target, (0, 0, 0), order=0) > 0.5
    assert dice(unregistered, target_truth) < 0.75  # the registration did the work


def test_the_target_itself_is_resampled_without_registration(monkeypatch):
    image, organ = anatomy((20, 22, 24))
    geometry = Geometry.identity(image.shape)
    monkeypatch.setattr(registration, "register_affine", lambda *args: pytest.fail("registered a volume to itself"))
    prior = atlas_prior([AtlasItem(image, geometry, organ.astype(np.float32), "same")], image, geometry, "same")
    np.testing.assert_array_equal(prior >= 0.5, organ)


def test_registrations_are_cached_by_reference_and_target(monkeypatch):
    image, organ = anatomy((20, 22, 24))
    geometry = Geometry.identity(image.shape)
    calls = []
    real = registration.register_affine
    monkeypatch.setattr(registration, "register_affine", lambda *args: calls.append(1) or real(*args))
    cache: dict = {}
    items = [AtlasItem(image, geometry, organ.astype(np.float32), "reference")]
    first = atlas_prior(items, image + 1, geometry, "target", transforms=cache)
    second = atlas_prior(items, image + 1, geometry, "target", transforms=cache)
    assert len(calls) == 1 and list(cache) == [("reference", "target")]
    np.testing.assert_array_equal(first, second)


def test_several_references_average_into_a_probabilistic_atlas():
    image, organ = anatomy((20, 22, 24))
    geometry = Geometry.identity(image.shape)
    half = organ.copy()
    half[:, :, :22] = False
    items = [AtlasItem(image, geometry, organ.astype(np.float32), "same"), AtlasItem(image, geometry, half.astype(np.float32), "same")]
    prior = atlas_prior(items, image, geometry, "same")
    assert set(np.unique(prior)) == {0.0, 0.5, 1.0}
    np.testing.assert_array_equal(prior == 1.0, half)


def test_a_blank_image_falls_back_to_aligned_grid_centres():
    geometry = Geometry.identity((20, 20, 20))
    shifted = Geometry((1.0, 1.0, 1.0), (5.0, 0.0, 0.0), np.eye(3), (20, 20, 20))
    transform = registration.register_affine(np.zeros((20, 20, 20)), shifted, np.ones((20, 20, 20)), geometry)
    np.testing.assert_allclose(transform.TransformPoint((9.5, 9.5, 9.5)), (14.5, 9.5, 9.5), atol=1e-6)


def test_only_the_prior_bounding_box_is_kept_and_it_resamples_like_the_whole_prior():
    image, organ = anatomy((20, 22, 24))
    geometry = Geometry((0.8, 1.0, 1.5), (3.0, -2.0, 1.0), oblique_geometry().direction, image.shape)
    item = AtlasItem(image, geometry, organ.astype(np.float32), "same")
    assert item.prior.size < organ.size / 2
    prior = atlas_prior([item], image, geometry, "same")
    np.testing.assert_allclose(prior, organ.astype(np.float32), atol=1e-5)


def test_shrink_factors_keep_the_coarsest_level_usable_and_the_finest_small(monkeypatch):
    assert shrink_factors((36, 50, 40)) == [2, 1]
    assert shrink_factors((128, 256, 256)) == [8, 4]  # no level of a million voxels
    assert shrink_factors((300, 512, 512)) == [8]
    assert shrink_factors((10, 10, 10)) == [1]
    monkeypatch.setattr(registration, "FINEST_LEVEL_MAX_VOXELS", None)
    assert shrink_factors((300, 512, 512)) == [8, 4, 2]


def test_block_means_lie_at_the_centres_of_their_blocks():
    geometry = Geometry((0.8, 1.2, 2.5), (3.0, -2.0, 1.0), oblique_geometry().direction, (9, 12, 10))
    k, j, i = np.indices(geometry.shape_kji)
    points = geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    ramp = (points @ np.array([0.3, -1.1, 0.7])).reshape(geometry.shape_kji).astype(np.float32)  # linear in LPS
    averaged, coarse = registration.block_mean(ramp, geometry, 4)
    assert averaged.shape == (2, 3, 2) and coarse.spacing == (3.2, 4.8, 10.0)
    k, j, i = np.indices(averaged.shape)
    centres = coarse.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    np.testing.assert_allclose(averaged.ravel(), centres @ np.array([0.3, -1.1, 0.7]), atol=1e-3)


def test_a_volume_registered_on_its_coarse_levels_only_still_lands_the_mask():
    shape = (72, 80, 80)  # levels 4 and 2 of the ITK pyramid, on images averaged over blocks of 2 first
    assert shrink_factors(shape) == [4, 2]
    rng = np.random.default_rng(5)
    organ = ellipsoid(shape, (36, 40, 44), (16, 20, 18))
    image = (30 + 100 * organ + 60 * ellipsoid(shape, (48, 60, 68), (12, 10, 14)) + rng.normal(0, 5, shape)).astype(np.float32)
    reference = Geometry.identity(shape)
    shift = (6.0, -5.0, 4.0)
    target_image = resampled_onto(image, reference, reference, shift, order=1)
    target_truth = resampled_onto(organ.astype(np.float32), reference, reference, shift, order=0) > 0.5
    prior = atlas_prior([AtlasItem(image, reference, organ.astype(np.float32), "reference")], target_image, reference, "target")
    assert dice(prior >= 0.5, target_truth) > 0.9
    assert dice(organ, target_truth) < 0.8  # the registration did the work


def test_registration_reports_its_iterations_and_a_cancel_stops_it():
    image, organ = anatomy()
    reference = Geometry.identity(image.shape, (1.0, 1.0, 1.0))
    moved = resampled_onto(image, reference, reference, (3.0, -2.0, 1.0), order=1)
    heard = []
    registration.register_affine(image, reference, moved, reference, lambda fraction, message: heard.append((fraction, message)))
    fractions = [fraction for fraction, _ in heard]
    assert len(heard) > 10 and fractions == sorted(fractions) and 0.0 < fractions[-1] <= 1.0
    assert {message for _, message in heard} == {"registering"}

    class Cancelled(Exception):
        pass

    calls = []

    def cancel(fraction, message):
        calls.append(fraction)
        if len(calls) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        registration.register_affine(image, reference, moved, reference, cancel)
    assert len(calls) == 3  # the optimiser stopped at the cancel, not after all its iterations


def test_atlas_progress_runs_across_references_as_one_bar():
    image, organ = anatomy()
    reference = Geometry.identity(image.shape, (1.0, 1.0, 1.0))
    target = resampled_onto(image, reference, reference, (2.0, 0.0, -1.0), order=1)
    items = [AtlasItem(image, reference, organ.astype(np.float32), key) for key in ("first", "second")]
    heard = []
    atlas_prior(items, target, reference, "target", lambda fraction, message: heard.append((fraction, message)))
    fractions = [fraction for fraction, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] > 0.5 and max(fractions) <= 1.0
    assert any(message.startswith("aligning context 2/2 to the target: registering") for _, message in heard)
