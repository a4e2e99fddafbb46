"""The test-time appearance probe: labels from slice boxes, a linear probe on image features."""

import numpy as np
import pytest

from weakicl.adaptation import appearance_labels, appearance_logits, features_at
from weakicl.prompts import Box, PromptSet


def test_slice_box_labels_its_centre_as_structure_and_its_surroundings_as_background():
    labels = appearance_labels(PromptSet([Box((10, 20, 5), (29, 29, 5))]), np.zeros((12, 50, 50)))
    sheet = labels[5]
    assert np.all(labels[[0, 4, 6, 11]] == -1)  # only the annotated slice says anything
    assert np.all(sheet[23:27, 15:25] == 1)  # central half: j 22.75-26.25, i 14.75-24.25
    assert sheet[20, 10] == -1 and sheet[29, 29] == -1  # the box's own border: unknown
    assert sheet[20, 9] == -1 and sheet[30, 20] == -1  # one voxel of tolerance for a loose box
    assert sheet[20, 8] == 0 and sheet[31, 20] == 0 and sheet[20, 0] == 0  # just outside: background
    assert sheet[20, 45] == -1 and sheet[40, 20] == -1  # farther than half the box size: unknown


def test_central_voxels_that_look_like_the_surroundings_are_not_taken_as_structure():
    """A crescent in its tight box: the box's centre holds the tissue around it, not the structure."""
    j, i = np.ogrid[:60, :60]
    ring = ((j - 30) ** 2 + (i - 30) ** 2 <= 15**2) & ((j - 30) ** 2 + (i - 36) ** 2 > 12**2)  # a crescent open to +i
    image = np.zeros((3, 60, 60), np.float32)
    image[:] = np.where(ring, 1.0, 0.0) + 0.01 * (i % 3)
    labels = appearance_labels(PromptSet([Box((15, 15, 1), (45, 45, 1))]), image)
    core = np.zeros((60, 60), bool)
    core[23:38, 23:38] = True  # the box's central half
    assert np.all(labels[1][core & ring] == 1)
    assert np.all(labels[1][core & ~ring] == -1)  # the surroundings' look: left for the image to decide
    flat = appearance_labels(PromptSet([Box((15, 15, 1), (45, 45, 1))]), np.zeros_like(image))
    assert np.all(flat[1][core] == 1)  # nothing tells them apart: the whole centre stands


def test_a_negative_click_deep_in_the_previous_result_drops_the_box_centre_seeds_of_its_tissue():
    """A box whose centre holds two tissues (the structure at 1.0, another organ at 0.0): a negative click
    deep inside the previous result on the other organ says that tissue is not the structure; on the
    previous result's border it says only where the border is, and leaves the seeds."""
    from weakicl.prompts import Point

    image = np.full((3, 60, 60), 0.5, np.float32)  # around the box: a third tissue
    image[:, 15:46, 15:30] = 0.0  # the other organ: the left half of the box
    image[:, 15:46, 30:46] = 1.0  # the structure: its right half
    box = Box((15, 15, 1), (45, 45, 1))
    previous = np.zeros(image.shape, bool)
    previous[:, 15:46, 15:46] = True  # the previous result filled the box
    before = appearance_labels(PromptSet([box]), image, previous)
    assert np.any(before[1][:, :30] == 1) and np.any(before[1][:, 30:] == 1)  # both tissues are seeds
    deep = appearance_labels(PromptSet([box], points=[Point((25, 30, 1), False)]), image, previous)
    assert not np.any(deep[1][:, :30] == 1)  # the clicked tissue's seeds are unknown now (the click's own 0s aside)
    assert np.array_equal(deep[1][:, 31:] == 1, before[1][:, 31:] == 1)  # the structure's seeds stand
    on_border = appearance_labels(PromptSet([box], points=[Point((15, 30, 1), False)]), image, previous)
    assert np.array_equal(on_border[1] == 1, before[1] == 1)  # one voxel inside: the seeds stand
    unaware = appearance_labels(PromptSet([box], points=[Point((25, 30, 1), False)]), image)
    expected = before.copy()
    expected[0:3, 29:32, 24:27] = 0  # the click's own neighbourhood
    assert np.array_equal(unaware == 1, expected == 1)  # without a previous result nothing else is dropped


def test_a_click_s_depth_is_read_from_its_neighbourhood_as_a_distance_transform_would_give_it():
    from scipy import ndimage

    from weakicl.adaptation import _inside_by

    rng = np.random.default_rng(0)
    for _ in range(100):
        shape = tuple(int(n) for n in rng.integers(3, 12, 3))
        mask = ndimage.binary_dilation(rng.random(shape) > 0.7, iterations=int(rng.integers(0, 3)))
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]  # beyond the array: outside
        for voxel in map(tuple, rng.integers(0, shape, (5, 3))):
            for at_least in (1.0, 1.5, 2.0, 2.5, 3.0):
                assert _inside_by(mask, voxel, at_least) == (depth[voxel] >= at_least)


def test_3d_boxes_and_boxes_off_the_frame_label_nothing():
    assert np.all(appearance_labels(PromptSet([Box((2, 2, 2), (8, 8, 8))]), np.zeros((12, 12, 12))) == -1)
    assert np.all(appearance_labels(PromptSet([Box((2, 2, 40), (8, 8, 40))]), np.zeros((12, 12, 12))) == -1)


def test_the_probe_learns_the_structure_s_look_from_one_annotated_slice():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    k, j, i = np.ogrid[:32, :32, :32]
    bright = ((k - 16) ** 2 + (j - 16) ** 2 + (i - 16) ** 2) < 8**2
    image = torch.from_numpy((bright + 0.2 * rng.standard_normal(bright.shape)).astype(np.float32))[None, None]
    labels = appearance_labels(PromptSet([Box((8, 8, 16), (24, 24, 16))]), image[0, 0].numpy())
    logits = appearance_logits([F.avg_pool3d(image, 2)], image, labels)
    assert logits.shape == bright.shape
    unlabelled = labels < 0
    # voxels on other slices, never labelled, follow the look: bright ones positive, dark ones negative
    assert (logits.numpy()[bright & unlabelled] > 0).mean() > 0.9
    assert (logits.numpy()[~bright & unlabelled] < 0).mean() > 0.9


def test_no_probe_without_both_structure_and_background_labels():
    torch = pytest.importorskip("torch")

    image = torch.zeros((1, 1, 8, 8, 8))
    assert appearance_logits([], image, np.full((8, 8, 8), -1, np.int8)) is None
    assert appearance_logits([], image, np.ones((8, 8, 8), np.int8)) is None


def test_clicks_label_their_neighbourhood_on_their_side():
    from weakicl.prompts import Point

    labels = appearance_labels(PromptSet(points=[Point((5, 5, 5), True), Point((12, 12, 12), False)]), np.zeros((20, 20, 20)))
    assert np.all(labels[4:7, 4:7, 4:7] == 1) and np.all(labels[11:14, 11:14, 11:14] == 0)
    assert (labels >= 0).sum() == 2 * 27


def test_features_are_read_where_a_trilinear_upsampling_puts_them():
    """The probe reads coarse levels at the known voxels only: the values must be the upsampled
    levels' there, clamped borders included, or it would learn from shifted features."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 1, 12, 20, 16, generator=generator)
    coarse = torch.randn(1, 3, 3, 5, 4, generator=generator)
    known = np.zeros((12, 20, 16), dtype=bool)
    known[0], known[11, 19, 15], known[5, 7, 3] = True, True, True  # a whole edge slice and the far corner
    read = features_at([image, coarse], np.nonzero(known), image.shape[2:])
    upsampled = F.interpolate(coarse, size=(12, 20, 16), mode="trilinear", align_corners=False)
    expected = torch.cat([image[0][:, known].T, upsampled[0][:, known].T], dim=1)
    assert read.shape == (known.sum(), 4) and torch.allclose(read, expected, atol=1e-6)


def _ring_slab(noise: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A short-axis slab (KJI): a bright pool inside a dark wall inside mid-grey tissue, with noise, and
    each voxel's distance from the axis."""
    k, j, i = np.ogrid[:8, :48, :48]
    radius = np.hypot(j - 24, i - 24) + 0 * k
    pool, wall = radius < 8, (radius >= 8) & (radius < 13)
    image = np.where(pool, 1.0, np.where(wall, 0.2, 0.5)) + np.random.default_rng(seed).normal(0, noise, radius.shape)
    return image.astype(np.float32), pool, wall, radius


def test_a_click_s_region_is_the_compartment_of_its_tissue_it_sits_in():
    """A negative click in a ring's pool means the pool, a positive one on the wall the wall; labels
    make them seeds of their side, the clicks' own voxels last."""
    from weakicl.adaptation import click_regions
    from weakicl.prompts import Point

    image, pool, wall, radius = _ring_slab()
    zone = radius < 16  # the competition's undecided region: the box hull and a gap around it
    previous = pool.copy()  # the result took the pool for the structure
    seeds = np.zeros(image.shape, bool)
    regions = click_regions(image, zone, [Point((24, 24, 4), False), Point((34, 24, 4), True)], previous | wall, seeds)
    assert regions is not None
    assert not np.any((regions < 0) & ~pool) and np.count_nonzero(regions < 0) > 0.95 * pool.sum()  # noise aside
    assert not np.any((regions > 0) & ~wall) and np.count_nonzero(regions > 0) > 0.95 * wall.sum()
    box = Box((11, 11, 4), (37, 37, 4))
    labels = appearance_labels(PromptSet([box], points=[Point((24, 24, 4), False)]), image, previous, regions)
    assert np.all(labels[regions < 0] == 0) and np.all(labels[regions > 0] == 1)
    assert not np.any(labels[pool] == 1)  # the box centre's seeds in the pool are gone


def test_a_click_in_tissue_that_runs_on_or_makes_up_the_result_has_no_region():
    """No compartment, no region: a tissue that fades into its surroundings leaks as the tolerance
    widens; a negative click in the tissue the whole result is made of would take all of it."""
    from weakicl.adaptation import click_regions
    from weakicl.prompts import Point

    j = np.arange(48, dtype=np.float32)
    ramp = np.broadcast_to(np.clip((j[None, :, None] - 8) / 32, 0, 1), (8, 48, 48)).copy()
    ramp += np.random.default_rng(0).normal(0, 0.01, ramp.shape).astype(np.float32)
    zone = np.ones(ramp.shape, bool)
    assert click_regions(ramp, zone, [Point((24, 24, 4), True)], zone, zone) is None  # leaks along the ramp
    image, pool, wall, _ = _ring_slab()
    negative = [Point((24, 24, 4), False)]
    assert click_regions(image, zone, negative, pool, wall) is None  # the pool is the whole result
    assert click_regions(image, zone, negative, pool | wall, wall) is not None  # 37 % of it


def test_a_negative_region_holding_every_structure_seed_is_not_taken():
    """Box centres all in the pool, no positive click: taking the pool would leave nothing that says
    what the structure is."""
    from weakicl.adaptation import click_regions
    from weakicl.prompts import Point

    image, pool, wall, _ = _ring_slab()
    zone, negative = np.ones(image.shape, bool), [Point((24, 24, 4), False)]
    assert click_regions(image, zone, negative, pool | wall, pool) is None
    assert click_regions(image, zone, negative, pool | wall, pool | wall) is not None  # most seeds on the wall


def test_a_positive_click_on_a_closed_shell_leaves_its_cavity_out_in_either_order():
    """Only noise holes are filled: a shell's enclosed pool is another tissue, so a positive click on the
    wall does not take it, and an earlier negative click there keeps its region whatever the order."""
    from weakicl.adaptation import click_regions
    from weakicl.prompts import Point

    k, j, i = np.ogrid[:40, :40, :40]
    radius = np.sqrt((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2)
    pool, wall = radius < 8, (radius >= 8) & (radius < 12)
    image = (np.where(pool, 1.0, np.where(wall, 0.2, 0.5)) + np.random.default_rng(0).normal(0, 0.02, radius.shape)).astype(np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[18:23, 18:23, 18:23] = True
    negative, positive = Point((20, 20, 20), False), Point((20, 20, 30), True)  # IJK: the wall at k = 30
    for order in ([negative, positive], [positive, negative]):
        regions = click_regions(image, radius < 16, order, pool | wall, seeds)
        assert np.all(regions[pool] == -1) and not np.any((regions > 0) & ~wall)
        assert np.count_nonzero(regions > 0) > 0.95 * wall.sum()


def test_a_region_holding_a_click_of_the_other_side_is_not_taken():
    """Clicks of both signs in one compartment: its tissue is both, so neither click means all of it."""
    from weakicl.adaptation import click_regions
    from weakicl.prompts import Point

    image, pool, wall, radius = _ring_slab()
    clicks = [Point((24, 24, 4), False), Point((27, 24, 4), True)]  # both in the pool
    assert click_regions(image, radius < 16, clicks, pool | wall, wall) is None
    assert click_regions(image, radius < 16, clicks[:1], pool | wall, wall) is not None


def test_click_regions_can_be_switched_off(monkeypatch):
    import weakicl.adaptation as adaptation
    from weakicl.prompts import Point

    image, pool, wall, _ = _ring_slab()
    monkeypatch.setattr(adaptation, "CLICK_REGION_TOLERANCE", None)
    assert adaptation.click_regions(image, np.ones(image.shape, bool), [Point((24, 24, 4), False)], pool | wall, wall) is None


def test_intensities_the_box_centres_never_show_are_outside_the_structure_s_support(monkeypatch):
    """A liver's box holds bone and fat beside it: the centres' intensities (less a tail) bound the structure."""
    from weakicl import adaptation
    from weakicl.adaptation import outside_support, support_range

    rng = np.random.default_rng(0)
    image = rng.uniform(0.4, 0.6, (4, 30, 30))
    image[:, :, :5] = 1.5  # bone
    image[:, :, -5:] = -0.5  # fat
    image[2, 20:22, 20:22] = 1.5  # a bone fragment of 4 voxels in the structure's tissue
    image[2, 25, 25] = 1.5  # one voxel: noise, as the tails the centres leave out are
    labels = np.full(image.shape, -1, np.int8)
    labels[1, 10:20, 10:20] = 1
    support = support_range(image, labels)
    assert 0.4 < support[0] < 0.41 and 0.59 < support[1] < 0.6  # 0.5 % of each tail left out
    outside = outside_support(image, support, 0.0)
    assert outside[:, :, :5].all() and outside[:, :, -5:].all() and outside[2, 20:22, 20:22].all()
    assert outside[:, :, 5:-5].sum() == 4
    assert np.array_equal(outside_support(image, support, 0.8), outside)  # a margin: -0.4 to 1.4 is the structure's
    assert not outside_support(image, support, 1.0).any()
    structure = np.zeros(image.shape, bool)
    structure[:, 15:24, 15:24] = True  # holds the bone fragment whole: a cavity, spared
    assert outside_support(image, support, 0.0, structure)[:, :, 5:-5].sum() == 0
    structure[:, 15:24, 15:21] = False  # the fragment reaches beyond it
    assert np.array_equal(outside_support(image, support, 0.0, structure), outside)
    assert support_range(image, np.where(labels == 1, -1, labels)) is None  # no sure voxel: no rule
    few = np.full(image.shape, -1, np.int8)
    few[1, 10:12, 10:12] = 1
    assert support_range(image, few) is None  # 4 voxels say too little (points alone)
    monkeypatch.setattr(adaptation, "SUPPORT_QUANTILE", None)
    assert support_range(image, labels) is None
