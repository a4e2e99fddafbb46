"""The session: encode once and reuse, multi-class stacking, correction regions, geometry of outputs."""

import numpy as np
import pytest
from scipy import ndimage

from conftest import ellipsoid, oblique_geometry
from weakicl.errors import InputError
from weakicl.prompts import MASK_CHANNEL, Box, Point, PromptSet
from weakicl import session
from weakicl.session import CLICK_SEED_MM, WINDOW_PATCHES, Segmenter, TaskEmbedding
from weakicl.simulation import slice_boxes, slice_fractions
from weakicl.volume import Geometry, Volume


@pytest.fixture()
def segmenter(tiny_model):
    return Segmenter(model=tiny_model, device="cpu")


def test_output_lies_on_the_target_grid_for_oblique_anisotropic_resampled_images(segmenter):
    geometry = Geometry((0.5, 0.6, 2.5), (3.0, 4.0, 5.0), oblique_geometry().direction, (10, 30, 26))
    truth = ellipsoid(geometry.shape_kji, (5, 15, 13), (3, 8, 7))
    volume = Volume((50 * truth).astype(np.float32), geometry, "MR")
    prompts = slice_boxes(truth)
    prediction = segmenter.segment(volume, segmenter.encode_context([(volume, prompts)]), target_prompts=prompts)
    assert prediction.probabilities.shape == (1,) + geometry.shape_kji
    assert prediction.probabilities.dtype == np.float32
    assert 0.0 <= prediction.probabilities.min() and prediction.probabilities.max() <= 1.0


def test_encoding_once_equals_encoding_twice(tiny_model, phantom):
    volume, truth = phantom
    other = Volume(np.flip(volume.array, axis=2).copy(), volume.geometry, "MR")
    prompts = slice_boxes(truth)
    shared = Segmenter(model=tiny_model, device="cpu")
    task = shared.encode_context([(volume, prompts)])
    assert shared.encode_context([(volume, prompts)]) is task  # cached
    reused = [shared.segment(target, task).probabilities for target in (volume, other)]
    fresh = []
    for target in (volume, other):
        separate = Segmenter(model=tiny_model, device="cpu")
        fresh.append(separate.segment(target, separate.encode_context([(volume, prompts)])).probabilities)
    for a, b in zip(reused, fresh):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_several_references_average_into_one_embedding(segmenter, phantom):
    volume, truth = phantom
    first = segmenter.encode_context([(volume, truth)])
    second = segmenter.encode_context([(volume, slice_boxes(truth))])
    both = segmenter.encode_context([(volume, truth), (volume, slice_boxes(truth))])
    np.testing.assert_allclose(both.tokens, (first.tokens + second.tokens) / 2, atol=1e-5)


def test_stacked_classes_match_single_class_passes(segmenter, phantom):
    volume, truth = phantom
    upper = truth.copy()
    upper[:6] = False
    tasks = [segmenter.encode_context([(volume, truth)], "whole"), segmenter.encode_context([(volume, upper)], "upper")]
    stacked = segmenter.segment(volume, TaskEmbedding.stack(tasks))
    assert stacked.names == ["whole", "upper"] and stacked.probabilities.shape[0] == 2
    for index, task in enumerate(tasks):
        np.testing.assert_allclose(stacked.probabilities[index], segmenter.segment(volume, task).probabilities[0], atol=1e-5)
    assert stacked.label_map().max() <= 2


def test_correction_recomputes_only_a_region_and_keeps_the_rest(segmenter):
    geometry = Geometry.identity((72, 72, 72))
    truth = ellipsoid(geometry.shape_kji, (8, 8, 8), (4, 4, 4))
    volume = Volume((80 * truth).astype(np.float32), geometry, "MR")
    task = segmenter.encode_context([(volume, truth)])
    previous = np.zeros(geometry.shape_kji, dtype=np.float32)
    previous[60:64, 60:64, 60:64] = 1.0  # an accepted region far from the click
    click = PromptSet(points=[Point((8, 8, 8))])
    prediction = segmenter.segment(volume, task, target_prompts=click, previous=previous, new_prompts=click)
    changed = prediction.changed_kji
    assert all(s.stop - s.start < 60 for s in changed)
    outside = np.ones(geometry.shape_kji, bool)
    outside[changed] = False
    np.testing.assert_array_equal(prediction.probabilities[0][outside], previous[outside])


def test_bad_session_inputs(segmenter, phantom):
    volume, truth = phantom
    with pytest.raises(InputError, match="empty context"):
        segmenter.encode_context([])
    with pytest.raises(InputError, match="mask is empty"):
        segmenter.encode_context([(volume, np.zeros_like(truth))])
    with pytest.raises(InputError, match="does not match"):
        segmenter.encode_context([(volume, truth[:-1])])
    with pytest.raises(InputError, match="no prompts"):
        segmenter.encode_context([(volume, PromptSet())])
    with pytest.raises(InputError, match="only negative points"):
        segmenter.encode_context([(volume, PromptSet(points=[Point((3, 3, 3), positive=False)]))])
    task = TaskEmbedding.stack([segmenter.encode_context([(volume, truth)], n) for n in "ab"])
    with pytest.raises(InputError, match="one class"):
        segmenter.segment(volume, task, target_prompts=slice_boxes(truth))


def test_device_choice(tiny_model, weakicl_log):
    import logging

    import torch

    from weakicl.devices import mps_available

    expected = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    logger = logging.getLogger("weakicl")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert Segmenter(model=tiny_model, device="auto").device == expected
    finally:
        logger.setLevel(level)
    assert weakicl_log[-1].startswith("running on ")  # the device is named once the session is ready
    if not torch.cuda.is_available():  # a missing GPU falls back to the CPU with a warning
        assert Segmenter(model=tiny_model, device="cuda").device == "cpu"
    with pytest.raises(InputError, match="device must be"):
        Segmenter(model=tiny_model, device="tpu")


def test_prepared_images_are_keyed_by_content_not_by_array_identity(segmenter, phantom):
    """Freed arrays' ids are reused by numpy; a batch of same-shape volumes must not see stale images."""
    volume, truth = phantom
    task = segmenter.encode_context([(volume, truth)])
    results = []
    for seed in range(3):
        target = Volume(np.random.default_rng(seed).normal(0, 50, volume.array.shape).astype(np.float32), volume.geometry, "MR")
        results.append(segmenter.segment(target, task).probabilities)
        del target
    alone = Segmenter(model=segmenter.model, device="cpu")
    target = Volume(np.random.default_rng(2).normal(0, 50, volume.array.shape).astype(np.float32), volume.geometry, "MR")
    np.testing.assert_allclose(results[2], alone.segment(target, alone.encode_context([(volume, truth)])).probabilities, atol=1e-5)
    assert not np.allclose(results[0], results[2])


def test_working_grid_reaches_the_last_voxel():
    from weakicl.preprocess import WorkingGrid

    grid = WorkingGrid((10, 10, 10), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    assert grid.working_shape_kji == (6, 6, 6)
    np.testing.assert_allclose(grid.ijk_to_working((9, 9, 9)), (4.5, 4.5, 4.5))
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (10, 10, 10))
    assert grid.to_working(ramp)[0, 0, -1] == 9.0


def test_a_target_without_prompts_starts_from_the_context_registered_onto_it(segmenter, phantom, monkeypatch):
    from weakicl import session

    monkeypatch.setattr(session, "OWN_BOX_LEVEL", None)  # the first pass alone; the second has its own test
    volume, truth = phantom
    target = Volume(np.roll(volume.array, 2, axis=1).copy(), volume.geometry, "MR")
    task = segmenter.encode_context([(volume, truth)])
    assert len(task.atlases) == 1 and task.atlases[0][0].prior.max() == 1.0
    seen = []
    decode = segmenter.model.decode
    monkeypatch.setattr(segmenter.model, "decode", lambda features, tokens, prompts: seen.append(
        0.0 if prompts is None else prompts[:, MASK_CHANNEL].amax().item()) or decode(features, tokens, prompts))
    aligned = segmenter.segment(target, task)
    assert min(seen) > 0.5  # every window holds part of the prior
    seen.clear()
    plain = segmenter.segment(target, task, align_context=False)
    assert max(seen) == 0.0
    assert not np.allclose(aligned.probabilities, plain.probabilities)
    seen.clear()
    segmenter.segment(target, task, target_prompts=slice_boxes(truth))  # the user's own prompts say where
    assert max(seen) == 0.0


def test_a_whole_volume_with_aligned_context_fills_one_progress_bar_class_by_class(segmenter, phantom):
    volume, truth = phantom
    target = Volume(np.roll(volume.array, 2, axis=1).copy(), volume.geometry, "MR")
    task = TaskEmbedding.stack([segmenter.encode_context([(volume, truth)], name) for name in ("a", "b")])
    heard = []
    segmenter.segment(target, task, progress=lambda fraction, message: heard.append((fraction, message)))
    fractions = [fraction for fraction, _ in heard]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # aligning, then both passes, never back
    aligning = [(fraction, message) for fraction, message in heard if "aligning" in message]
    assert aligning[0][1].startswith("a: aligning") and aligning[-1][1].startswith("b: aligning")
    assert any(message.startswith("a: aligning context 1/1 to the target: registering") for _, message in aligning)
    assert max(fraction for fraction, _ in aligning) <= session.ALIGNMENT_SHARE


def test_stacking_keeps_each_class_atlas_and_tuning_references(segmenter, phantom):
    volume, truth = phantom
    tasks = [segmenter.encode_context([(volume, truth)], "a"), segmenter.encode_context([(volume, slice_boxes(truth))], "b")]
    stacked = TaskEmbedding.stack(tasks)
    assert [len(items) for items in stacked.atlases] == [1, 1] == [len(items) for items in stacked.references]
    assert stacked.atlases[1][0] is tasks[1].atlases[0][0] and stacked.references[1][0] is tasks[1].references[0][0]
    tokens_only = TaskEmbedding.stack([tasks[0], TaskEmbedding(tasks[1].tokens, ["tokens only"])])
    assert tokens_only.atlases == [] and tokens_only.references == []


def test_whole_volume_windows_cover_only_where_the_aligned_context_points(segmenter):
    geometry = Geometry.identity((32, 64, 64))
    truth = ellipsoid(geometry.shape_kji, (16, 14, 14), (5, 5, 5))
    volume = Volume((80 * truth).astype(np.float32), geometry, "MR")
    task = segmenter.encode_context([(volume, truth)])
    aligned = segmenter.segment(volume, task)
    covered = aligned.changed_kji
    assert covered[2].stop < 64 and covered[1].stop < 64  # the far corner is never searched
    outside = np.ones(geometry.shape_kji, bool)
    outside[covered] = False
    assert not aligned.masks[0][outside].any()
    plain = segmenter.segment(volume, task, align_context=False)
    assert plain.changed_kji == tuple(slice(0, n) for n in geometry.shape_kji)


def test_tokens_alone_search_a_large_volume_coarse_first_as_the_aligned_context_does(segmenter, monkeypatch):
    """Without the registered context every window at full scale: 37 s a volume on the 128x256x256 phantom
    of scripts/benchmark_engine.py, Dice 0.34; seen whole and coarse first, 4.9 s and 0.59."""
    geometry = Geometry.identity((32, 64, 64))
    truth = ellipsoid(geometry.shape_kji, (16, 14, 14), (5, 5, 5))
    volume = Volume((80 * truth).astype(np.float32), geometry, "MR")
    task = segmenter.encode_context([(volume, truth)])
    first_pass, coarse = segmenter._first_pass, []
    monkeypatch.setattr(segmenter, "_first_pass", lambda *args, **kwargs: coarse.append(kwargs["coarse"]) or first_pass(*args, **kwargs))
    segmenter.segment(volume, task, align_context=False)
    segmenter.segment(volume, task, align_context=False, network_only=True)  # the ablation: every window as it is
    assert coarse == [True, False]


def test_windows_in_batches_give_the_windows_one_at_a_time(segmenter, phantom):
    volume, truth = phantom
    tasks = [segmenter.encode_context([(volume, truth)], "a"), segmenter.encode_context([(volume, slice_boxes(truth))], "b")]
    task = TaskEmbedding.stack(tasks)
    segmenter.window_batch = 1
    single = segmenter.segment(volume, task).probabilities
    segmenter.window_batch = 4  # the GPU's batching logic, run on the CPU
    try:
        batched = segmenter.segment(volume, task).probabilities
    finally:
        segmenter.window_batch = 0
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_whole_volumes_take_the_fewest_windows_that_overlap_by_the_minimum(segmenter, phantom, monkeypatch):
    from weakicl.session import MIN_WINDOW_OVERLAP_VOXELS, _window_tiling

    assert _window_tiling(256, 96)[0] == 3  # 3 windows of 96 overlap by 16 voxels; a fixed quarter took 4
    assert _window_tiling(96, 96) == (1, 0.0)
    volume, truth = phantom
    task = segmenter.encode_context([(volume, slice_boxes(truth))])
    image = np.zeros((16, 48, 120), np.float32)  # windows of 48: 3 along i would overlap by 12 voxels only
    starts, totals = [], set()
    encode = segmenter.model.encode_image
    monkeypatch.setattr(segmenter, "window_batch", 1)
    monkeypatch.setattr(session, "ONE_WINDOW_MAX_VOXELS", 0)  # tiled, as a region larger than any frame is
    monkeypatch.setattr(segmenter.model, "encode_image", lambda window: starts.append(window.shape) or encode(window))
    segmenter._sliding_window(image, None, task, lambda fraction, message: totals.add(message.split("/")[-1]))
    assert len(starts) == 4 and totals == {"4"}
    count, overlap = _window_tiling(120, 48)
    step = int(48 * (1 - overlap))
    assert count == 4 and 48 - step >= MIN_WINDOW_OVERLAP_VOXELS and 3 * step + 48 >= 120


def test_a_region_no_larger_than_a_frame_is_one_window_whatever_its_sides(segmenter, phantom, monkeypatch):
    volume, truth = phantom
    task = segmenter.encode_context([(volume, slice_boxes(truth))])
    image = np.zeros((16, 48, 120), np.float32)  # wider than a window of 48 along i: 4 tiled windows before
    seen = []
    encode = segmenter.model.encode_image
    monkeypatch.setattr(segmenter.model, "encode_image", lambda window: seen.append(tuple(window.shape[2:])) or encode(window))
    probabilities = segmenter._sliding_window(image, None, task, lambda fraction, message: None)
    assert seen == [image.shape] and probabilities.shape == (1,) + image.shape
    seen.clear()
    monkeypatch.setattr(session, "ONE_WINDOW_MAX_VOXELS", image.size - 1)
    segmenter._sliding_window(image, None, task, lambda fraction, message: None)
    assert len(seen) == 4 and all(max(shape) <= WINDOW_PATCHES * max(segmenter.config.patch_size) for shape in seen)


def test_boxes_drawn_on_oblique_slices_guide_the_segmentation(segmenter, phantom):
    from weakicl.slicebox import OrientedBox

    volume, truth = phantom
    centre = np.argwhere(truth).mean(axis=0)[::-1]  # IJK
    tilt = np.deg2rad(30)
    boxes = [OrientedBox(tuple(centre + offset * np.array([0.0, np.sin(tilt), np.cos(tilt)])),
                         (6.0, 0.0, 0.0), (0.0, 5.0 * np.cos(tilt), -5.0 * np.sin(tilt))) for offset in (-3.0, 0.0, 3.0)]
    prompts = PromptSet(oriented_boxes=boxes)
    task = segmenter.encode_context([(volume, prompts)])  # oblique boxes alone are a valid context
    prediction = segmenter.segment(volume, task, target_prompts=prompts)
    region = prediction.changed_kji
    inside = tuple(int(round(c)) for c in centre[::-1])
    assert all(s.start <= c < s.stop for s, c in zip(region, inside))  # the frame is around the oblique boxes
    assert prediction.probabilities[0][region].max() > 0.5  # the hull prior of the oblique boxes is read


def test_a_click_is_a_seed_unless_the_network_alone_is_asked_for(segmenter, phantom, monkeypatch):
    from weakicl import session

    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    first = segmenter.segment(volume, task, target_prompts=boxes).masks[0]
    outside = tuple(int(c) for c in np.argwhere(~first & ~truth)[0])  # a background voxel
    inside = tuple(int(c) for c in np.argwhere(truth)[len(np.argwhere(truth)) // 2])
    clicks = PromptSet(points=[Point(tuple(float(c) for c in inside[::-1]), True), Point(tuple(float(c) for c in outside[::-1]), False)])
    for click in clicks.points:
        new = PromptSet(points=[click])
        seeded = segmenter.segment(volume, task, boxes + new, first, new_prompts=new).masks[0]
        kji = tuple(int(round(c)) for c in click.ijk[::-1])
        assert seeded[kji] == click.positive
    network = segmenter.segment(volume, task, boxes + clicks, first, new_prompts=clicks, network_only=True)
    probed = segmenter.segment(volume, task, boxes + clicks, first, new_prompts=clicks)
    outside_region = np.ones(truth.shape, bool)
    outside_region[network.changed_kji] = False
    assert np.array_equal(probed.masks[0][outside_region], network.masks[0][outside_region])  # the rest of `first` stands
    monkeypatch.setattr(session, "APPEARANCE_WEIGHT", 0.0)
    monkeypatch.setattr(session, "GEODESIC_WEIGHT", 0.0)
    seeded = segmenter.segment(volume, task, boxes + clicks, first, new_prompts=clicks)
    differ = np.argwhere(network.masks[0] != seeded.masks[0])
    spacing_kji = np.asarray(volume.geometry.spacing)[::-1]
    near = [min(np.linalg.norm((voxel - np.asarray(p.ijk)[::-1]) * spacing_kji) for p in clicks.points) for voxel in differ]
    assert max(near, default=0.0) <= CLICK_SEED_MM + 1e-6  # without probe and geodesic, only the seed balls differ


def test_a_correction_tells_the_probe_and_the_competition_where_the_previous_result_was(segmenter, phantom, monkeypatch):
    """So that a negative click deep inside it can drop the box-centre seeds of its tissue
    (`adaptation.CONTRADICTION_DEPTH`); propagation has no previous result to give."""
    from weakicl import session

    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    given = []
    labels = session.appearance_labels
    monkeypatch.setattr(session, "appearance_labels", lambda prompts, image, previous=None, regions=None:
                        given.append(previous) or labels(prompts, image, previous, regions))
    first = segmenter.segment(volume, task, target_prompts=boxes).masks[0]
    assert len(given) == 2 and given == [None, None]  # the competition's seeds, the probe's labels
    given.clear()
    inside = tuple(float(c) for c in np.argwhere(first)[len(np.argwhere(first)) // 2][::-1])
    click = PromptSet(points=[Point(inside, False)])
    segmenter.segment(volume, task, boxes + click, first, new_prompts=click)
    assert len(given) == 3 and given[0] is None  # the seeds the clicks' regions are guarded by: as the boxes give them
    assert all(previous is not None and previous.dtype == bool and previous.any() for previous in given[1:])


def test_a_correction_sampled_by_torch_on_the_device_gives_what_numpy_gives(segmenter, phantom, monkeypatch):
    """The CUDA path (frames sampled from the image and previous mask as tensors), run on the CPU."""
    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    first = segmenter.segment(volume, task, target_prompts=boxes).masks[0]
    inside = np.argwhere(truth & ~first)
    point = inside[len(inside) // 2] if len(inside) else np.argwhere(truth)[0]
    click = PromptSet(points=[Point(tuple(float(c) for c in point[::-1]), True)])
    on_host = segmenter.segment(volume, task, boxes + click, first, new_prompts=click).probabilities
    sampled = []
    original = segmenter._tensor
    monkeypatch.setattr(segmenter, "sample_on_device", True)
    monkeypatch.setattr(segmenter, "_tensor", lambda array: sampled.append(array.shape) or original(array))
    on_device = segmenter.segment(volume, task, boxes + click, first, new_prompts=click).probabilities
    assert volume.geometry.shape_kji in sampled  # the image went to the device whole, once
    np.testing.assert_allclose(on_device, on_host, atol=1e-5)
    propagated = segmenter.segment(volume, task, target_prompts=boxes).masks[0]  # propagation samples there too
    assert np.array_equal(propagated, first)


def test_a_click_of_one_sign_changes_the_result_in_its_direction_only(segmenter, phantom):
    """A negative click only removes, a positive one only adds: recomputing the click's neighbourhood
    must not also drop or add voxels nobody pointed at (the network alone does, here)."""
    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    previous = np.roll(truth, 2, axis=2)  # a result off by two voxels: voxels missed and voxels extra
    for wrong, positive in ((truth & ~previous, True), (previous & ~truth, False)):
        kji = np.argwhere(wrong)[len(np.argwhere(wrong)) // 2]
        click = PromptSet(points=[Point(tuple(float(c) for c in kji[::-1]), positive)])
        corrected = segmenter.segment(volume, task, boxes + click, previous, new_prompts=click).masks[0]
        alone = segmenter.segment(volume, task, boxes + click, previous, new_prompts=click, network_only=True).masks[0]
        if positive:
            assert corrected[tuple(kji)] and (corrected >= previous).all() and (corrected > previous).any()
            assert (alone < previous).any()
        else:
            assert not corrected[tuple(kji)] and (corrected <= previous).all() and (corrected < previous).any()
            assert (alone > previous).any()


@pytest.mark.parametrize("local", [True, False])
def test_a_click_on_the_result_s_border_moves_the_border_there_only(segmenter, phantom, monkeypatch, local):
    """A click whose face neighbour is already on its side points at an error one voxel thick: the
    correction sets the click's ball, runs no network pass and changes nothing else (recomputing the
    neighbourhood changed more voxels wrongly than rightly on the tuning structures)."""
    monkeypatch.setattr(session, "BORDER_CLICKS_LOCAL", local)
    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    previous = np.roll(truth, 2, axis=2)
    extra = previous & ~truth & ~np.roll(previous, -1, axis=2)  # on the border: the next voxel along i is out
    kji = np.argwhere(extra)[len(np.argwhere(extra)) // 2]  # background: its tissue is everywhere, it has no region
    click = PromptSet(points=[Point(tuple(float(c) for c in kji[::-1]), False)])
    windows = []
    original = session.Segmenter._sliding_window
    monkeypatch.setattr(session.Segmenter, "_sliding_window", lambda self, *a, **k: windows.append(1) or original(self, *a, **k))
    prediction = segmenter.segment(volume, task, boxes + click, previous, new_prompts=click)
    corrected = prediction.masks[0]
    assert not corrected[tuple(kji)] and (corrected <= previous).all()
    changed = np.argwhere(corrected != previous)
    if local:
        assert not windows and np.abs(changed - kji).max() <= 1  # the click's 1 mm ball on this grid
        assert all(a.start <= c < a.stop for a, c in zip(prediction.changed_kji, kji))
    else:
        assert windows and np.abs(changed - kji).max() > 1


def test_a_new_click_s_frame_covers_its_own_region_not_the_other_side_s_beside_it():
    from weakicl.framing import Frame
    from weakicl.session import _new_regions_extent

    frame = Frame(np.zeros(3), np.ones(3), (40, 40, 40), np.ones(3))
    regions = np.zeros((40, 40, 40), np.int8)
    regions[:, 18:22, 18:22] = 1  # an earlier positive click's region: a vessel along k
    regions[18:22, 22:26, 18:22] = -1  # the new negative click's compartment, touching it
    lo, hi = _new_regions_extent(frame, regions, PromptSet(points=[Point((20.0, 23.0, 20.0), False)]))
    assert np.array_equal(lo, [18, 22, 18]) and np.array_equal(hi, [21, 25, 21])


def test_a_negative_region_of_the_tissue_the_box_centres_hold_is_not_taken():
    """The guard against a vanishing structure counts the box-centre seeds as the boxes give them, not
    after a negative click of their tissue made them unknown: a result that ran on along its own tissue
    keeps its seeds, and the click its neighbourhood."""
    from weakicl.framing import Frame
    from weakicl.session import _structure_click_regions

    image = np.full((12, 48, 48), 0.5, np.float32)  # noise-free: the click's tissue is exactly the seeds' tissue
    image[:, 8:24, 8:24] = 1.0  # the structure ...
    image[:, 8:24, 18:24] = 0.8  # ... with a part of another tissue
    image[:, 24:44, 10:14] = 1.0  # its main tissue running on from it
    previous = np.zeros(image.shape, bool)
    previous[:, 4:46, 4:28] = True  # the result took the run-on and the tissue around it too
    boxes = PromptSet([Box((8, 8, k), (23, 23, k)) for k in (2, 6, 10)])
    frame = Frame(np.zeros(3), np.ones(3), image.shape, np.ones(3))
    click = PromptSet(points=[Point((12.0, 36.0, 6.0), False)])  # deep in the run-on
    assert _structure_click_regions(frame, image, boxes + click, previous) is None


def _tube(length: int = 96) -> tuple[Volume, np.ndarray, np.ndarray, np.ndarray]:
    """A tube along k (1 mm voxels): a bright pool in a dark wall in mid-grey tissue; and each voxel's k."""
    k, j, i = np.ogrid[:length, :48, :48]
    radius = np.hypot(j - 24, i - 24) + 0 * k
    along = (k >= 4) & (k < length - 4)
    pool, wall = along & (radius < 8), along & (radius >= 8) & (radius < 11)  # a wall smaller than its pool
    image = np.where(pool, 300.0, np.where(wall, 60.0, 150.0)) + np.random.default_rng(0).normal(0, 6, radius.shape)
    return Volume(image.astype(np.float32), Geometry.identity(image.shape, (1.0, 1.0, 1.0)), "MR"), pool, wall, k + 0 * radius


@pytest.mark.parametrize("regions", [True, False])
def test_clicks_on_a_ring_s_wall_and_in_its_pool_mean_the_wall_and_the_pool_along_the_whole_ring(segmenter, monkeypatch, regions):
    """A tube's wall boxed on 3 slices, a previous result that took its pool only (the box centres): a
    positive click on the wall, then a negative one in the pool, mean the wall and the pool (their
    compartments), also on slices far beyond the clicks' neighbourhood; without click regions only the
    neighbourhood changes."""
    import weakicl.adaptation as adaptation

    if not regions:
        monkeypatch.setattr(adaptation, "CLICK_REGION_TOLERANCE", None)
    volume, pool, wall, k = _tube()
    boxes = slice_boxes(wall)
    task = segmenter.encode_context([(volume, boxes)])
    clicks = PromptSet(points=[Point((33.0, 24.0, 48.0), True)])
    added = segmenter.segment(volume, task, boxes + clicks, pool, new_prompts=clicks).masks[0]
    clicks = clicks + PromptSet(points=[Point((24.0, 24.0, 48.0), False)])
    removed = segmenter.segment(volume, task, boxes + clicks, added, new_prompts=PromptSet(points=clicks.points[-1:])).masks[0]
    far = np.abs(k - 48) > 30  # beyond the clicks' own neighbourhood (the frame's least side)
    assert (added >= pool).all() and (removed <= added).all() and not removed[48, 24, 24]
    if regions:  # the wall's partial-volume rim aside
        assert added[wall & far].mean() > 0.8 and removed[wall].mean() > 0.8
        assert removed[pool & far].mean() < 0.05
    else:
        assert added[wall & far].mean() < 0.05 and removed[pool & far].mean() > 0.95


def test_a_lone_negative_click_in_a_ring_s_pool_leaves_the_result_a_structure(segmenter):
    """Every box-centre seed in the pool and no positive click: the pool's region is not taken (the
    structure would vanish); beyond the click's neighbourhood the result stands."""
    volume, pool, wall, k = _tube()
    boxes = slice_boxes(wall)
    task = segmenter.encode_context([(volume, boxes)])
    click = PromptSet(points=[Point((24.0, 24.0, 48.0), False)])
    corrected = segmenter.segment(volume, task, boxes + click, pool | wall, new_prompts=click).masks[0]
    far = np.abs(k - 48) > 30
    assert not corrected[48, 24, 24] and corrected[(pool | wall) & far].mean() > 0.95


def test_a_frame_of_several_windows_hands_the_probe_blended_encoder_levels(segmenter, phantom, monkeypatch):
    """The probe reads the sliding window's padded image and encoder levels instead of encoding the frame
    again: one per level at the level's own scale, equal to the window's own features where one window
    alone covers (a frame larger than ONE_WINDOW_MAX_VOXELS, as weights whose framing allows larger frames make)."""
    import torch

    from weakicl.adaptation import FEATURE_LEVELS

    monkeypatch.setattr(session, "ONE_WINDOW_MAX_VOXELS", 0)
    volume, truth = phantom
    task = segmenter.encode_context([(volume, slice_boxes(truth))])
    image = np.random.default_rng(0).standard_normal((16, 32, 96)).astype(np.float32)  # 3 windows of 48 along i
    encoded: list = []
    segmenter._sliding_window(image, None, task, lambda fraction, message: None, encoded=encoded)
    padded, *levels = encoded
    assert torch.equal(padded, torch.from_numpy(image)[None, None])  # already a multiple of the downsampling
    assert len(levels) == FEATURE_LEVELS
    with torch.no_grad():
        first_window = segmenter.model.encode_image(torch.from_numpy(image[None, None, :, :, :48]))
    for level, (blended, own) in enumerate(zip(levels, first_window)):
        assert blended.shape[2:] == tuple(n // 2**level for n in image.shape)
        assert torch.allclose(blended[..., :2], own[..., :2], atol=1e-4)  # the first window's own columns


def test_components_that_nowhere_reach_what_the_prompts_or_the_context_point_to_are_dropped():
    from weakicl.session import _drop_components_off

    values = np.zeros((12, 12, 12), dtype=np.float32)
    values[2:5, 2:5, 2:5] = 0.9  # where the support points
    values[8:11, 8:11, 8:11] = 0.8  # a look-alike far from it
    support = np.zeros_like(values)
    support[3, 3, 3] = 0.5
    _drop_components_off(values, support, 0.05)
    assert values[3, 3, 3] == 0.9 and values.max() == 0.9 and values[9, 9, 9] == 0.0
    alone = np.zeros((12, 12, 12), dtype=np.float32)
    alone[8:11, 8:11, 8:11] = 0.8
    _drop_components_off(alone, np.zeros_like(alone), 0.05)
    assert alone.max() == 0.8  # a single component stands: a registration can be off, an empty mask helps no one


def test_dropping_components_keeps_exactly_those_that_reach_the_support():
    from scipy import ndimage

    from weakicl.session import _drop_components_off
    from weakicl.simulation import FULL_CONNECTIVITY

    rng = np.random.default_rng(1)
    for _ in range(20):
        values = ndimage.gaussian_filter(rng.random((20, 24, 28)), 1.5).astype(np.float32)
        values = (values - values.min()) / (values.max() - values.min())
        support = ndimage.gaussian_filter(rng.random(values.shape), 2.0).astype(np.float32)
        support[support < np.quantile(support, 0.9)] = 0.0
        components, count = ndimage.label(values > 0.5, FULL_CONNECTIVITY)
        expected = values.copy()
        if count > 1:
            for label in range(1, count + 1):
                if not (support[components == label] > 0.05).any():
                    expected[components == label] = 0.0
        _drop_components_off(values, support, 0.05)
        np.testing.assert_array_equal(values, expected)


def test_own_slice_boxes_are_the_protocols_boxes_of_the_largest_sure_component():
    from weakicl.session import OWN_BOX_SLICES, own_slice_boxes

    sure = np.zeros((20, 16, 18), dtype=bool)
    sure[4:15, 3:9, 5:12] = True
    sure[17:19, 14:16, 0:2] = True  # a smaller component elsewhere draws no box
    boxes = own_slice_boxes(sure, (1.0, 1.0, 1.0))
    assert boxes.boxes == slice_boxes(sure[:16], slice_fractions(OWN_BOX_SLICES)).boxes and len(boxes.boxes) == 4  # a box more than users draw
    across_i = own_slice_boxes(sure, (3.0, 1.0, 1.0))  # thick along I: boxes on the scan's own (J, K) slices
    assert all(box.lo_ijk[0] == box.hi_ijk[0] for box in across_i.boxes)
    line = np.zeros((10, 10, 10), dtype=bool)
    line[2:8, 4, 9] = True  # one voxel wide in both in-plane axes: widened into valid boxes inside the image
    thin = own_slice_boxes(line, (1.0, 1.0, 1.0))  # ... as wide as a slice box must be to count as one
    for box in thin.boxes:
        assert np.subtract(box.hi_ijk, box.lo_ijk)[:2].tolist() == [2.0, 2.0] and box.hi_ijk[0] <= 9.0 and box.thin_axes() == [2]
    PromptSet(boxes=thin.boxes).validate(Geometry.identity((10, 10, 10)))
    assert own_slice_boxes(np.zeros((4, 4, 4), dtype=bool), (1.0, 1.0, 1.0)) is None
    single_slice = np.zeros((1, 10, 12), dtype=bool)
    single_slice[0, 3:6, 4:9] = True  # a 2D image: its one slice, whatever the spacing says
    (box,) = own_slice_boxes(single_slice, (1.0, 1.0, 0.5)).boxes
    assert box.lo_ijk == (4.0, 3.0, 0.0) and box.hi_ijk == (8.0, 5.0, 0.0)
    assert own_slice_boxes(np.ones((1, 1, 10), dtype=bool), (1.0, 1.0, 1.0)) is None  # a line: no box to draw


def test_a_whole_volume_is_propagated_again_from_boxes_around_its_sure_part(segmenter, monkeypatch):
    import torch

    from weakicl import session
    from weakicl.session import Prediction

    geometry = Geometry.identity((32, 64, 64))
    truth = ellipsoid(geometry.shape_kji, (16, 14, 14), (5, 5, 5))
    volume = Volume((80 * truth).astype(np.float32), geometry, "MR")
    task = TaskEmbedding.stack([segmenter.encode_context([(volume, truth)], name) for name in ("a", "b")])
    first = np.zeros((2,) + truth.shape, dtype=np.float32)
    first[0][truth] = 0.9  # class a: the structure, sure
    first[0][16, 14, 14:61] = first[0][16, 14:61, 60] = first[0][16:31, 60, 60] = 0.6  # a thread, not sure, to
    first[0][30, 60, 60] = 0.9  # ... a sure voxel far away (one component with the structure, so not dropped)
    first[1][truth] = 0.6  # class b: found, but nowhere sure
    monkeypatch.setattr(segmenter, "_first_pass", lambda image, spacing, task, progress, priors, coarse:
                        first[:, :image.shape[0], :image.shape[1], :image.shape[2]])
    answer = {}
    calls = []
    framed = segmenter._segment_framed

    def second_pass(target, prepared, single, boxes, *rest):
        """The real propagation's frame, with the probabilities the test chooses."""
        region = framed(target, prepared, single, boxes, *rest).changed_kji
        calls.append((single.names, boxes, region))
        assert torch.equal(single.tokens, task.tokens[:1])
        return Prediction(answer["probabilities"][None], single.names, region)

    monkeypatch.setattr(segmenter, "_segment_framed", second_pass)
    with monkeypatch.context() as first_only:
        first_only.setattr(session, "OWN_BOX_LEVEL", None)
        alone = segmenter.segment(volume, task).probabilities
    answer["probabilities"] = np.where(truth, 0.5, 0.0).astype(np.float32)  # agrees with the first pass
    fractions = []
    prediction = segmenter.segment(volume, task, progress=lambda fraction, message: fractions.append(fraction))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one progress bar for both passes
    assert [names for names, _, _ in calls] == [["a"]]
    assert calls[0][1] == session.own_slice_boxes(first[0] >= session.OWN_BOX_LEVEL, geometry.spacing)
    region = calls[0][2]
    expected = np.zeros(truth.shape, np.float32)  # the mean of both passes in the second one's frame, nothing beyond
    expected[region] = 0.5 * (alone[0][region] + answer["probabilities"][region])
    np.testing.assert_allclose(prediction.probabilities[0], expected, atol=1e-6)
    assert np.isclose(prediction.probabilities[0][16, 16, 14], 0.7)
    np.testing.assert_allclose(prediction.probabilities[1], alone[1], atol=1e-6)  # class b keeps its first pass
    answer["probabilities"] = np.roll(answer["probabilities"], 12, axis=2)  # disagrees: the first pass stands
    np.testing.assert_array_equal(segmenter.segment(volume, task).probabilities, alone)
    calls.clear()
    segmenter.segment(volume, task, network_only=True)
    monkeypatch.setattr(session, "OWN_BOX_LEVEL", None)
    segmenter.segment(volume, task)
    assert calls == []


def test_the_own_box_pass_is_repeated_only_while_it_refines(segmenter, monkeypatch):
    from weakicl import session
    from weakicl.session import Prediction

    geometry = Geometry.identity((32, 64, 64))
    truth = ellipsoid(geometry.shape_kji, (16, 14, 14), (5, 5, 5))  # where the search region starts
    volume = Volume((80 * truth).astype(np.float32), geometry, "MR")
    task = segmenter.encode_context([(volume, truth)], "a")
    first = np.where(truth, 0.9, 0.0).astype(np.float32)[None]
    monkeypatch.setattr(segmenter, "_first_pass", lambda image, spacing, task, progress, priors, coarse:
                        first[:, :image.shape[0], :image.shape[1], :image.shape[2]])
    answers, calls = [], []
    framed = segmenter._segment_framed

    def own_pass(target, prepared, single, boxes, *rest):
        region = framed(target, prepared, single, boxes, *rest).changed_kji
        calls.append(boxes)
        return Prediction(answers[len(calls) - 1][None], single.names, region)

    monkeypatch.setattr(segmenter, "_segment_framed", own_pass)
    sure, shifted = truth.astype(np.float32), np.roll(truth, 1, axis=2).astype(np.float32)  # Dice 0.85: no mere refinement
    answers[:] = [sure, sure]
    values = segmenter.segment(volume, task).probabilities[0]
    assert len(calls) == session.OWN_BOX_ROUNDS == 2  # the second round's boxes come from the first round's mean
    assert calls[1] == session.own_slice_boxes(np.where(truth, 0.95, 0.0) >= session.OWN_BOX_LEVEL, geometry.spacing)
    assert np.isclose(values[16, 14, 14], 0.975)  # (0.9 + 1) / 2, then (0.95 + 1) / 2
    calls.clear()
    answers[:] = [sure, shifted]  # the second round moves the structure: it does not refine, the first round stands
    values = segmenter.segment(volume, task).probabilities[0]
    assert len(calls) == 2 and np.isclose(values[16, 14, 14], 0.95) and values[16, 14, 20] == 0.0
    calls.clear()
    monkeypatch.setattr(session, "OWN_BOX_ROUNDS", 1)
    assert np.isclose(segmenter.segment(volume, task).probabilities[0][16, 14, 14], 0.95) and len(calls) == 1


def test_a_single_slice_image_is_segmented_whole_with_its_second_pass(segmenter, monkeypatch):
    from weakicl import session

    geometry = Geometry.identity((1, 40, 40), (1.0, 2.0, 1.0))  # J the coarsest axis, K the single slice
    truth = np.zeros(geometry.shape_kji, bool)
    truth[0, 10:25, 12:30] = True
    volume = Volume((80 * truth).astype(np.float32), geometry, "MR")
    task = segmenter.encode_context([(volume, truth)])
    sure = np.where(truth, 0.9, 0.0).astype(np.float32)[None]
    monkeypatch.setattr(segmenter, "_first_pass", lambda image, spacing, task, progress, priors, coarse: sure[:, :, :image.shape[1], :image.shape[2]])
    boxes = []
    framed = segmenter._segment_framed
    monkeypatch.setattr(segmenter, "_segment_framed", lambda target, prepared, single, prompts, *rest:
                        boxes.append(prompts) or framed(target, prepared, single, prompts, *rest))
    assert segmenter.segment(volume, task).probabilities.shape == (1, 1, 40, 40)
    assert boxes[0] == session.own_slice_boxes(truth, geometry.spacing) and len(boxes[0].boxes) == 1  # then its refinement


def test_a_coarse_first_pass_sees_a_search_region_larger_than_a_window_whole_as_one_window(segmenter, phantom, monkeypatch):
    volume, truth = phantom
    task = segmenter.encode_context([(volume, slice_boxes(truth))])
    window = WINDOW_PATCHES * max(segmenter.config.patch_size)
    shape = (window // 2, window, 2 * window + 5)
    ramp = sum(np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]) * (axis + 1)
               for axis, n in enumerate(shape)) / 1000.0
    seen = []
    monkeypatch.setattr(segmenter, "_sliding_window", lambda image, channels, task, progress, priors=None, encoded=None:
                        seen.append(image.shape) or image[None])  # a "network" that returns its input
    isotropic = np.ones(3)
    coarse = segmenter._first_pass(ramp, isotropic, task, lambda fraction, message: None, None, coarse=True)
    assert len(seen) == 1 and max(seen[0]) <= window and seen[0][0] < shape[0]  # one window, every axis coarser
    np.testing.assert_allclose(coarse[0], ramp, atol=1e-5)  # back on the region's grid, voxel for voxel
    seen.clear()
    thick = segmenter._first_pass(ramp, np.array([4.0, 1.0, 1.0]), task, lambda fraction, message: None, None, coarse=True)
    assert seen[0][0] == shape[0] and seen[0][2] <= window  # thick slices that fit stay as they are
    np.testing.assert_allclose(thick[0], ramp, atol=1e-5)
    seen.clear()
    segmenter._first_pass(ramp, isotropic, task, lambda fraction, message: None, None, coarse=False)
    assert seen == [shape]
    seen.clear()
    small = ramp[:, :, :window]
    segmenter._first_pass(small, isotropic, task, lambda fraction, message: None, None, coarse=True)
    assert seen == [small.shape]  # a region that fits one window is seen as it is


def test_caches_forget_the_least_recently_used_entry():
    from weakicl.session import BoundedCache

    cache = BoundedCache(3)
    cache["a"], cache["b"], cache["c"] = 1, 2, 3
    assert cache["a"] == 1  # read: "a" is now the most recent
    cache["d"] = 4
    assert list(cache) == ["c", "a", "d"]


def test_no_prompts_decode_like_empty_prompt_channels(tiny_model):
    """The whole-volume path passes no prompt channels instead of zeros: the same logits, less work."""
    import torch

    from weakicl.prompts import PROMPT_CHANNELS

    image = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        features = tiny_model.encode_image(image)
        tokens = tiny_model.encode_task(features, torch.rand(2, len(PROMPT_CHANNELS), 32, 32, 32))
        zeros = tiny_model.decode(features, tokens, torch.zeros(2, len(PROMPT_CHANNELS), 32, 32, 32))
        torch.testing.assert_close(tiny_model.decode(features, tokens, None), zeros)


def test_hull_and_mask_go_on_past_the_image_edge_boxes_and_points_do_not():
    from weakicl.prompts import PROMPT_CHANNELS
    from weakicl.session import padded_prompts

    channels = np.zeros((len(PROMPT_CHANNELS), 20, 24, 24), np.float32)
    channels[:, :, 10:14, 10:14] = 1.0  # every channel reaches both ends of the K axis (a cut tube)
    padded = padded_prompts(channels, 8, 32)
    assert padded.shape == (len(PROMPT_CHANNELS), 32, 32, 32)
    recover = (slice(6, 26), slice(4, 28), slice(4, 28))
    for index, name in enumerate(PROMPT_CHANNELS):
        assert np.array_equal(padded[index][recover], channels[index])
        beyond = padded[index][:6, 14:18, 14:18]  # the K padding, where the tube ran
        if name in ("box_hull", "mask"):
            assert np.all(beyond == 1.0)
        else:
            assert np.all(beyond == 0.0)
    assert np.all(padded[:, :, :4] == 0.0)  # nothing reached the J edge: nothing goes on there


def test_point_slice_boxes_are_drawn_around_the_component_at_each_point_on_the_points_slices():
    from weakicl.session import point_slice_boxes

    mask = np.zeros((12, 20, 24), dtype=bool)
    mask[1:11, 4:10, 5:12] = True  # the structure, longest along K
    mask[1:11, 15:18, 18:22] = True  # something else on the same slices, at no point: no box around it
    points = [Point((8.0, 7.0, 3.0), True), Point((9.0, 8.0, 6.0), True), Point((20.0, 16.0, 6.0), False)]
    boxes = point_slice_boxes(mask, points, (1.0, 1.0, 1.0))  # across its longest side: axial slices 3 and 6
    assert [(box.lo_ijk, box.hi_ijk) for box in boxes] == [((5.0, 4.0, 3.0), (11.0, 9.0, 3.0)), ((5.0, 4.0, 6.0), (11.0, 9.0, 6.0))]
    fine_k = point_slice_boxes(mask, points, (1.0, 1.0, 0.5))  # K 5 mm, I 7 mm: the longest side in mm is I's
    assert [box.lo_ijk[0] for box in fine_k] == [8.0, 9.0] and all(box.thin_axes() == [0] for box in fine_k)
    long_i = np.zeros((12, 20, 24), dtype=bool)
    long_i[4:8, 6:10, 2:22] = True  # longest along I: boxes on the (J, K) slices of the points
    across_i = point_slice_boxes(long_i, [Point((4.0, 7.0, 5.0), True), Point((12.0, 8.0, 6.0), True)], (1.0, 1.0, 1.0))
    assert [(box.lo_ijk, box.hi_ijk) for box in across_i] == [((4.0, 6.0, 4.0), (4.0, 9.0, 7.0)), ((12.0, 6.0, 4.0), (12.0, 9.0, 7.0))]
    thick_k = point_slice_boxes(long_i, [Point((4.0, 7.0, 5.0), True)], (1.0, 1.0, 3.0))  # a thick-slice scan: its own slices
    assert [box.thin_axes() for box in thick_k] == [[2]]
    dot = np.zeros((12, 20, 24), dtype=bool)
    dot[5, 9, 9] = True  # one voxel: widened into a slice box, across the coarsest axis for a lone point
    (box,) = point_slice_boxes(dot, [Point((9.0, 9.0, 5.0), True)], (1.0, 1.0, 3.0))
    assert box.thin_axes() == [2] and np.subtract(box.hi_ijk, box.lo_ijk)[:2].tolist() == [2.0, 2.0]
    assert point_slice_boxes(dot, [Point((1.0, 1.0, 1.0), True)], (1.0, 1.0, 1.0)) == []  # nothing at the point
    assert point_slice_boxes(mask, [Point((8.0, 7.0, 3.0), False)], (1.0, 1.0, 1.0)) == []  # no positive point


def _record_framed_passes(segmenter, monkeypatch) -> list:
    """The prompts of every framed pass the segmenter runs from now on, with the mask it gave (p >= 0.5)."""
    calls, framed = [], segmenter._segment_framed

    def recorded(target, prepared, task, prompts, *rest):
        prediction = framed(target, prepared, task, prompts, *rest)
        calls.append((prompts, prediction.probabilities[0] >= 0.5))
        return prediction

    monkeypatch.setattr(segmenter, "_segment_framed", recorded)
    return calls


def test_points_alone_are_propagated_again_from_slice_boxes_around_each_pass(segmenter, phantom, monkeypatch):
    from weakicl.session import POINT_BOX_ROUNDS, point_slice_boxes

    volume, truth = phantom
    points = PromptSet(points=[Point((9.0, 10.0, float(k)), True) for k in (4, 6, 8)])
    task = segmenter.encode_context([(volume, points)], "s")
    calls = _record_framed_passes(segmenter, monkeypatch)
    fractions = []
    prediction = segmenter.segment(volume, task, points, progress=lambda fraction, message: fractions.append(fraction))
    assert len(calls) == 1 + POINT_BOX_ROUNDS >= 2 and calls[0][0] is points
    for (_, before), (prompts, _) in zip(calls, calls[1:]):  # each round: the points, and boxes around the pass before
        assert prompts.points == points.points
        assert prompts.boxes == point_slice_boxes(before, points.points, volume.geometry.spacing) != []
    np.testing.assert_array_equal(prediction.masks[0], calls[-1][1])
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one progress bar for all passes
    calls.clear()
    segmenter.segment(volume, task, PromptSet(boxes=slice_boxes(truth, slice_fractions(3)).boxes, points=points.points))
    assert len(calls) == 1  # boxes say how far the structure reaches: one pass
    calls.clear()
    segmenter.segment(volume, task, points, network_only=True)
    assert len(calls) == 1 and calls[0][0] is points  # the network alone: one pass, the points as they are
    previous = prediction.masks[0]  # the propagation's result
    click = Point((12.0, 13.0, 6.0), True)
    clicked = PromptSet(points=points.points + [click])
    segmenter.segment(volume, task, clicked, previous=previous, new_prompts=PromptSet(points=[click]))
    assert len(calls) == 2  # a correction: one pass, with the boxes of what it corrects around the points
    expected = point_slice_boxes(previous, clicked.points, volume.geometry.spacing)
    assert calls[-1][0].boxes == expected != [] and calls[-1][0].points == clicked.points
    assert any(box.lo_ijk[0] <= 12.0 <= box.hi_ijk[0] and box.lo_ijk[2] == 6.0 for box in expected)  # ... and the click
    calls.clear()  # clicks on a result that no points were propagated from (a whole volume's): the clicks as they are
    whole_volume_clicks = PromptSet(points=[Point((9.0, 10.0, 5.0), True), click])
    segmenter.segment(volume, task, whole_volume_clicks, previous=previous, new_prompts=PromptSet(points=[click]))
    assert len(calls) == 1 and calls[0][0].boxes == [] and calls[0][0].points == whole_volume_clicks.points


def test_a_slice_box_around_points_reaches_every_positive_point_on_its_slice():
    from weakicl.session import point_slice_boxes

    previous = np.zeros((8, 20, 20), dtype=bool)
    previous[0:8, 5:10, 5:10] = True  # longest along K: axial boxes
    inside, beyond = Point((7.0, 7.0, 3.0), True), Point((15.0, 16.0, 3.0), True)  # a click where the result misses
    (box,) = point_slice_boxes(previous, [inside, beyond, Point((18.0, 2.0, 3.0), False)], (1.0, 1.0, 1.0))
    assert box.lo_ijk == (5.0, 5.0, 3.0) and box.hi_ijk == (15.0, 16.0, 3.0)
    assert point_slice_boxes(previous, [beyond], (1.0, 1.0, 1.0)) == []  # a slice whose points miss the mask draws none


def test_a_3d_box_alone_is_propagated_again_from_slice_boxes_around_each_pass_with_the_box_kept(segmenter, phantom, monkeypatch):
    from weakicl.preprocess import bounding_box
    from weakicl.prompts import Box
    from weakicl.session import BOX3D_ROUNDS, own_slice_boxes

    volume, truth = phantom
    lo, hi = bounding_box(truth)
    roi = PromptSet(boxes=[Box(tuple(lo[::-1].astype(float)), tuple(hi[::-1].astype(float)))])
    assert roi.boxes[0].thin_axes() == []
    task = segmenter.encode_context([(volume, roi)], "s")
    calls = _record_framed_passes(segmenter, monkeypatch)
    prediction = segmenter.segment(volume, task, roi)
    assert len(calls) == 1 + BOX3D_ROUNDS >= 2 and calls[0][0] is roi
    for (_, before), (prompts, _) in zip(calls, calls[1:]):
        assert prompts.boxes == own_slice_boxes(before, volume.geometry.spacing).boxes + roi.boxes
    np.testing.assert_array_equal(prediction.masks[0], calls[-1][1])
    calls.clear()
    segmenter.segment(volume, task, roi, network_only=True)
    assert len(calls) == 1
    with pytest.raises(InputError, match="does not match the target"):  # before any box is drawn around it
        segmenter.segment(volume, task, roi, previous=prediction.masks[0][None], new_prompts=roi)
    calls.clear()
    empty = np.zeros_like(prediction.probabilities)
    with monkeypatch.context() as nothing_found:  # no box can be drawn: the first pass stands, the bar still ends
        nothing_found.setattr(segmenter, "_segment_framed", lambda *args: session.Prediction(empty, ["s"], (slice(None),) * 3))
        fractions = []
        segmenter.segment(volume, task, roi, progress=lambda fraction, message: fractions.append(fraction))
        assert fractions[-1] == 1.0
    click = Point((9.0, 10.0, 6.0), False)
    clicked = PromptSet(boxes=roi.boxes, points=[click])
    segmenter.segment(volume, task, clicked, previous=prediction.masks[0], new_prompts=PromptSet(points=[click]))
    assert len(calls) == 1  # a correction: one pass, guided by slice boxes around what it corrects, the 3D box kept
    assert calls[-1][0].boxes == own_slice_boxes(prediction.masks[0], volume.geometry.spacing).boxes + roi.boxes
    assert calls[-1][0].points == [click]


def test_points_alone_compete_with_the_frames_outer_band_for_the_seed_competition(monkeypatch):
    from weakicl.framing import Frame

    shape = (24, 32, 32)
    blob = ellipsoid(shape, (12, 16, 16), (6, 9, 9))
    image = np.where(blob, 1.0, 0.0) + np.random.default_rng(0).normal(0, 0.05, shape)
    frame = Frame(np.zeros(3), np.ones(3), shape, np.ones(3))
    points = PromptSet(points=[Point((16.0, 16.0, 12.0), True)])
    margin = Segmenter._geodesic_margin(frame, image, points, None, "cpu")
    assert margin is not None and margin.shape == shape
    assert np.all(margin[blob] > 0) and np.all(margin[:, :, :session.POINT_BACKGROUND_BAND_VOXELS] < 0)
    assert (margin > 0).sum() == pytest.approx(blob.sum(), rel=0.1)  # the point takes the blob, up to its edge
    assert Segmenter._geodesic_margin(frame, image, points, np.zeros(shape, bool), "cpu") is None  # clicks on a result
    assert Segmenter._geodesic_margin(frame, image, PromptSet(points=[Point((16.0, 16.0, 12.0), False)]), None, "cpu") is None
    monkeypatch.setattr(session, "POINT_BACKGROUND_BAND_VOXELS", None)
    assert Segmenter._geodesic_margin(frame, image, points, None, "cpu") is None


@pytest.mark.skipif(not __import__("torch").backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_cpu_convolutions_with_spatial_kernels_run_through_onednn_with_the_same_values():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from conftest import tiny_config
    from weakicl.network import WeakICLNet, prefer_onednn_convolutions

    torch.manual_seed(0)
    native = WeakICLNet(tiny_config()).eval()
    onednn = WeakICLNet(tiny_config()).eval()
    onednn.load_state_dict(native.state_dict())
    patched = prefer_onednn_convolutions(onednn)
    assert patched == sum(isinstance(m, torch.nn.Conv3d) and max(m.kernel_size) > 1 for m in onednn.modules())
    image, prompts = torch.randn(1, 1, 16, 16, 16), torch.zeros(1, 5, 16, 16, 16)
    prompts[:, 2, 4:12, 4:12, 4:12] = 1.0
    with torch.inference_mode():
        tokens = native.encode_task(native.encode_image(image), prompts)
        expected = native.decode(native.encode_image(image), tokens, prompts)
        with profile(activities=[ProfilerActivity.CPU]) as run:
            logits = onednn.decode(onednn.encode_image(image), tokens, prompts)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert sum(event.count for event in run.key_averages() if event.key == "aten::mkldnn_convolution") >= patched
    trained = onednn.decode(onednn.encode_image(image), tokens.clone(), prompts)  # with gradients: PyTorch's own path
    trained.sum().backward()
    assert all(p.grad is not None for p in onednn.decoder.parameters() if p.requires_grad)


def test_on_ct_bone_and_fat_in_a_structure_s_boxes_are_left_out_and_an_mr_is_untouched(segmenter, monkeypatch):
    """The support rule (`adaptation.outside_support`): on CT, what it changes is only voxels of densities
    the box centres never show (or beside them, as a frame interpolates), all to background; an MR
    (uncalibrated intensities) is segmented as without it."""
    from weakicl import adaptation

    shape = (20, 40, 40)
    truth = ellipsoid(shape, (10, 20, 20), (7, 10, 10))
    rng = np.random.default_rng(3)
    image = np.where(truth, 50.0, -100.0) + rng.normal(0, 5, shape)  # soft tissue in fat
    bone = np.zeros(shape, bool)
    bone[:, 9:14, 9:14] = True  # in a corner of the middle box, beside the structure
    image[bone] = 500.0
    boxes = slice_boxes(truth)
    monkeypatch.setattr(session, "GEODESIC_WEIGHT", 0.0)  # the competition alone keeps this bone out
    quantile, results = adaptation.SUPPORT_QUANTILE, {}
    for modality in ("CT", "MR"):
        volume = Volume(image.astype(np.float32), Geometry.identity(shape), modality)
        task = segmenter.encode_context([(volume, boxes)])
        with_rule = segmenter.segment(volume, task, target_prompts=boxes).masks[0]
        monkeypatch.setattr(adaptation, "SUPPORT_QUANTILE", None)
        results[modality] = with_rule, segmenter.segment(volume, task, target_prompts=boxes).masks[0]
        monkeypatch.setattr(adaptation, "SUPPORT_QUANTILE", quantile)
    with_rule, without = results["CT"]
    assert not (with_rule & bone).any() and (without & bone).any() and (without & ~truth & ~bone).any()  # the tiny network fills its box
    changed = with_rule != without
    assert not with_rule[changed].any()
    assert not (changed & ~ndimage.binary_dilation(bone | ~truth, np.ones((3, 3, 3)))).any()
    assert np.array_equal(*results["MR"])
