"""Prompt-centred frames: geometry round trips and scale normalisation (no network)."""

import numpy as np
import pytest

from conftest import ellipsoid
from weakicl.framing import Frame, FrameSpec, frame_around, frame_spacing, prompt_extent_kji
from weakicl.preprocess import working_spacing
from weakicl.prompts import Box, Point, PromptSet, rasterize
from weakicl.volume import Geometry


@pytest.mark.parametrize("spacing_kji", [(1.0, 1.0, 1.0), (6.5, 0.78, 0.78), (3.0, 3.0, 3.0)])
def test_scale_normalised_frames_are_isotropic_and_fit_the_structure_to_the_same_size(spacing_kji):
    spec = FrameSpec(extent_voxels=28)
    lo, hi = np.array([10.0, 20.0, 30.0]), np.array([16.0, 80.0, 70.0])
    spacing = frame_spacing(lo, hi, spacing_kji, spec)
    assert np.allclose(spacing, spacing[0])  # isotropic, whatever the slice thickness
    extent_mm = (hi - lo + 1) * np.asarray(spacing_kji)
    # the longest side spans 28 frame voxels unless the thinnest would then span fewer than 8
    expected = max(min(extent_mm.max() / 28.0, extent_mm.min() / spec.min_thickness_voxels), spec.min_spacing_mm)
    assert spacing[0] == pytest.approx(expected)
    assert extent_mm.max() / spacing[0] >= 28.0 - 1e-6 and extent_mm.min() / spacing[0] >= spec.min_thickness_voxels - 1e-6


def test_working_grid_framing_is_the_weights_own_isotropic_spacing():
    # sub-millimetre pixels coarsened to 1 mm, 3 mm slices interpolated to 1 mm (the network saw isotropic grids)
    spacing = frame_spacing(np.zeros(3), np.full(3, 50.0), (3.0, 0.5, 0.5), FrameSpec(working_spacing_mm=1.0))
    np.testing.assert_allclose(spacing, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("spacing_kji, expected", [
    ((6.5, 0.78, 0.78), (1.0, 1.0, 1.0)),  # thick-slice MR: slices interpolated, pixels coarsened
    ((6.0, 2.0, 2.0), (2.0, 2.0, 2.0)),  # coarse pixels are kept, thick slices brought down to them
    ((3.0, 3.0, 3.0), (3.0, 3.0, 3.0)),
    ((2.0, 1.0, 1.0), (2.0, 1.0, 1.0)),  # not thick: kept (interpolating them only costs time)
])
def test_working_grid_frames_make_thick_slices_isotropic(spacing_kji, expected):
    spacing = frame_spacing(np.zeros(3), np.full(3, 20.0), spacing_kji, FrameSpec(working_spacing_mm=1.0))
    np.testing.assert_allclose(spacing, expected)
    relaxed = frame_spacing(np.zeros(3), np.full(3, 20.0), spacing_kji, FrameSpec(working_spacing_mm=1.0, max_anisotropy=2.0))
    assert relaxed.max() <= 2.0 * relaxed.min() + 1e-9


def test_working_spacing_keeps_coarse_axes():
    # whole-volume arrays never grow: only prompt-centred frames interpolate thick slices
    np.testing.assert_allclose(working_spacing((0.78, 0.78, 6.5), 1.0), (1.0, 1.0, 6.5))


def test_sample_then_paste_returns_the_original_inside_the_frame():
    shape = (40, 60, 50)
    truth = ellipsoid(shape, (20, 30, 25), (8, 12, 10)).astype(np.float32)
    spacing_kji = np.array([2.0, 1.0, 1.0])
    lo, hi = np.array([12.0, 18.0, 15.0]), np.array([28.0, 42.0, 35.0])
    spec = FrameSpec(extent_voxels=30)
    frame = frame_around(lo, hi, spacing_kji, shape, frame_spacing(lo, hi, spacing_kji, spec), spec, minimum_voxels=16)
    region = frame.region(shape)
    # a multiple of the network's downsampling, or exactly the image where the image is smaller
    assert all(n % spec.multiple == 0 or (r.start, r.stop) == (0, size) for n, r, size in zip(frame.shape_kji, region, shape))
    back = frame.paste(frame.sample(truth), region) >= 0.5
    agreement = (back == (truth[region] >= 0.5)).mean()
    assert agreement > 0.99


def test_a_frame_larger_than_a_small_image_covers_exactly_the_image():
    spec = FrameSpec()
    frame = frame_around(np.array([10.0, 10.0, 10.0]), np.array([20.0, 30.0, 20.0]), np.ones(3), (30, 40, 30),
                         np.ones(3), spec, minimum_voxels=32)
    np.testing.assert_allclose(frame.origin_kji, 0.0)
    assert frame.shape_kji == (30, 40, 30)  # never reaching past the image: no one-sided padding


def test_prompts_land_in_the_frame_where_the_image_puts_them():
    shape = (30, 64, 64)
    spacing_kji = np.array([3.0, 1.0, 1.0])
    box = Box((20.0, 22.0, 14.0), (40.0, 44.0, 14.0))  # a slice box on k = 14
    point = Point((30.0, 33.0, 16.0), positive=True)
    prompts = PromptSet([box], [point])
    lo, hi = prompt_extent_kji(prompts, None)
    np.testing.assert_allclose(lo, (14, 22, 20))
    spec = FrameSpec(extent_voxels=24)
    frame = frame_around(lo, hi, spacing_kji, shape, frame_spacing(lo, hi, spacing_kji, spec), spec, minimum_voxels=16)
    framed = frame.prompts_to_frame(prompts)
    assert framed.boxes[0].thin_axes() == [2]  # still a slice box of the same axis
    geometry = Geometry(tuple(frame.spacing_kji[::-1]), (0, 0, 0), np.eye(3), frame.shape_kji)
    channels = rasterize(framed, geometry)
    marked = np.zeros(shape, dtype=np.float32)
    marked[14, 22:45, 20:41] = 1.0
    sampled = frame.sample(marked, order=0, fill=0.0)
    box_k = int(round(framed.boxes[0].lo_ijk[2]))
    assert channels[0, box_k].sum() > 0 and sampled[box_k].sum() > 0
    overlap = (channels[0, box_k] > 0) & (sampled[box_k] > 0)
    assert overlap.sum() / max((sampled[box_k] > 0).sum(), 1) > 0.9
    centre = np.argwhere(channels[2] == channels[2].max())[0]
    expected = (np.array([16.0, 33.0, 30.0]) - frame.origin_kji) / frame.step_kji
    np.testing.assert_allclose(centre, expected, atol=1.0)


def test_a_small_slice_box_stays_a_slice_box_in_a_frame_coarser_than_the_image():
    """0.5 mm pixels seen on the 1 mm working grid: a box 2 pixels across is 1 frame voxel across, which
    alone would make it a line (thin along two axes) and rasterise it as a 3D box."""
    spacing_kji = np.array([3.0, 0.5, 0.5])
    small = Box((40.0, 50.0, 10.0), (42.0, 52.0, 10.0))  # a slice box on k = 10, 2 pixels across
    far = Box((150.0, 150.0, 12.0), (152.0, 152.5, 12.0))  # as small, outside the frame below
    prompts = PromptSet([small, Box((30.0, 40.0, 14.0), (60.0, 70.0, 14.0)), far])
    lo, hi = prompt_extent_kji(PromptSet(prompts.boxes[:2]), None)
    spec = FrameSpec()
    frame = frame_around(lo, hi, spacing_kji, (20, 200, 200), frame_spacing(lo, hi, spacing_kji, spec), spec, minimum_voxels=16)
    assert np.allclose(frame.step_kji[1:], 2.0)
    framed = frame.prompts_to_frame(prompts)
    assert [box.thin_axes() for box in framed.boxes] == [[2], [2], [2]]
    for original, box in zip(prompts.boxes[::2], framed.boxes[::2]):  # widened about its centre, not moved
        centre = (np.add(original.lo_ijk, original.hi_ijk) / 2 - frame.origin_kji[::-1]) / frame.step_kji[::-1]
        np.testing.assert_allclose(np.add(box.lo_ijk, box.hi_ijk) / 2, centre, atol=1e-9)
    assert framed.boxes[1] == Box(*(tuple((np.asarray(c) - frame.origin_kji[::-1]) / frame.step_kji[::-1])
                                    for c in (prompts.boxes[1].lo_ijk, prompts.boxes[1].hi_ijk)))


def test_an_array_moves_between_frames_over_the_same_image_as_if_sampled_into_each():
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (20, 24, 28)], indexing="ij")
    original = 2 * k + j - 0.5 * i  # linear: interpolation is exact
    first = Frame(np.array([2.0, 3.0, 1.5]), np.array([0.5, 0.75, 1.0]), (20, 20, 20), np.ones(3))
    second = Frame(np.array([4.0, 5.0, 6.0]), np.array([1.0, 0.5, 0.8]), (8, 10, 12), np.ones(3))
    moved = first.resample_into(first.sample(original), second, fill=-7.0)
    assert np.allclose(moved, second.sample(original), atol=1e-4)
    beyond = Frame(np.array([4.0, 5.0, 6.0]), np.array([2.0, 2.0, 2.0]), (10, 10, 10), np.ones(3))
    assert first.resample_into(first.sample(original), beyond, fill=-7.0)[-1, -1, -1] == -7.0  # outside the first frame


@pytest.mark.parametrize("fill", [None, -1.0])
def test_sampling_reads_only_what_the_frame_reaches_and_gives_what_the_whole_array_gives(fill):
    from scipy import ndimage

    from weakicl.preprocess import bounding_box

    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 24, 28)).astype(np.float32)
    mask = image > 0.8
    for _ in range(40):  # frames inside, across an edge and wholly outside the image, finer and coarser
        step = rng.uniform(0.4, 2.5, 3)
        origin = rng.uniform(-15, 30, 3)
        frame = Frame(origin, step, tuple(int(n) for n in rng.integers(2, 12, 3)), step)
        for array in (image, mask):
            whole = ndimage.affine_transform(array.astype(np.float32), step, offset=origin, output_shape=frame.shape_kji, order=1,
                                             mode="nearest" if fill is None else "constant", cval=fill or 0.0)
            np.testing.assert_allclose(frame.sample(array, fill=fill), whole, atol=1e-5)
    assert bounding_box(np.zeros((3, 4, 5), bool)) is None
    lo, hi = bounding_box(mask)
    assert (lo == np.argwhere(mask).min(axis=0)).all() and (hi == np.argwhere(mask).max(axis=0)).all()


def test_an_empty_region_samples_to_an_empty_array():
    import torch

    from weakicl.preprocess import linear_resample

    assert linear_resample(np.ones((2, 3, 4, 5), np.float32), (0, 0, 0), (1, 1, 1), (0, 4, 4)).shape == (2, 0, 4, 4)
    assert linear_resample(torch.ones((3, 4, 5)), (0, 0, 0), (1, 1, 1), (3, 0, 5)).shape == (3, 0, 5)
