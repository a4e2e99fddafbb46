"""The geodesic seed competition: seeds from prompts and a previous result, the margin it adds."""

import numpy as np
import pytest

from conftest import ellipsoid
from weakicl.geodesic import geodesic_margin, seed_labels


def test_seeds_take_sure_labels_and_make_everything_outside_the_undecided_region_background():
    sure = np.full((6, 6, 6), -1, np.int8)
    sure[3, 3, 3], sure[3, 0, 3] = 1, 0
    undecided = np.zeros(sure.shape, bool)
    undecided[1:5, 1:5, 1:5] = True
    seeds = seed_labels(sure, undecided)
    assert seeds[3, 3, 3] == 1 and seeds[3, 0, 3] == 2 and seeds[0, 0, 0] == 2
    assert seeds[2, 2, 2] == 0 and (seeds == 0).sum() == undecided.sum() - 1


def test_the_margin_follows_the_image_s_border_between_the_seeds():
    rng = np.random.default_rng(0)
    truth = ellipsoid((24, 32, 32), (12, 16, 16), (7, 10, 8))
    image = (100 * truth + rng.normal(0, 8, truth.shape)).astype(np.float32)
    sure = np.full(truth.shape, -1, np.int8)
    sure[12, 14:19, 14:19] = 1  # the central part of one slice box
    undecided = ellipsoid(truth.shape, (12, 16, 16), (10, 14, 12))  # a loose hull around the structure
    margin = geodesic_margin(image, seed_labels(sure, undecided))
    assert margin.shape == truth.shape and margin.min() >= -1 and margin.max() <= 1
    assert np.mean(margin[truth] > 0) > 0.97 and np.mean(margin[undecided & ~truth] < 0) > 0.97
    assert np.all(margin[~undecided] == -1)  # background seeds stay background


def test_a_large_search_on_a_coarser_grid_still_follows_the_border(monkeypatch):
    from weakicl import geodesic

    rng = np.random.default_rng(1)
    truth = ellipsoid((30, 40, 40), (15, 20, 20), (9, 13, 11))
    image = (100 * truth + rng.normal(0, 8, truth.shape)).astype(np.float32)
    sure = np.full(truth.shape, -1, np.int8)
    sure[15, 17:24, 17:24] = 1
    seeds = seed_labels(sure, ellipsoid(truth.shape, (15, 20, 20), (13, 18, 16)))
    monkeypatch.setattr(geodesic, "MAX_SEARCH_VOXELS", 4096)  # the box is ~30x38x34 voxels: a factor 3
    coarse = geodesic_margin(image, seeds)
    assert coarse.shape == truth.shape and np.all(coarse[seeds == 1] == 1) and np.all(coarse[seeds == 2] == -1)
    assert np.mean((coarse > 0) == truth) > 0.97


def test_no_margin_without_seeds_of_both_kinds():
    image = np.zeros((5, 5, 5), np.float32)
    assert geodesic_margin(image, np.zeros((5, 5, 5), np.int8)) is None
    assert geodesic_margin(image, np.full((5, 5, 5), 2, np.int8)) is None


def test_voxels_no_seed_reaches_are_not_pushed_either_way():
    seeds = np.zeros((3, 3, 9), np.int8)
    seeds[:, :, 0], seeds[:, :, 8] = 1, 2
    image = np.zeros(seeds.shape, np.float32)
    margin = geodesic_margin(image, seeds)
    assert margin[1, 1, 1] > 0 and margin[1, 1, 7] < 0 and abs(margin[1, 1, 4]) < 0.05  # halfway: a tie


@pytest.fixture()
def segmenter(tiny_model):
    from weakicl.session import Segmenter

    return Segmenter(model=tiny_model, device="cpu")


def test_propagation_follows_a_border_the_network_ignores(segmenter, phantom, monkeypatch):
    """A randomly initialised network knows no borders; the seed competition from the slice boxes does."""
    from weakicl import session
    from weakicl.evaluation.metrics import dice
    from weakicl.simulation import slice_boxes

    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    with_margin = dice(segmenter.segment(volume, task, target_prompts=boxes).masks[0], truth)
    monkeypatch.setattr(session, "GEODESIC_WEIGHT", 0.0)
    without = dice(segmenter.segment(volume, task, target_prompts=boxes).masks[0], truth)
    assert with_margin > 0.97 and with_margin > without + 0.05


def test_points_alone_compete_with_the_frames_outer_band(segmenter, phantom, monkeypatch):
    """Without a box nothing says for sure where the structure ends, but the frame reaches well past the
    points: its outer band is background (`session.POINT_BACKGROUND_BAND_VOXELS`), so the points' own pass
    grows to the structure's edge instead of staying a blob around them. (The rounds from boxes drawn
    around that pass compete as boxes do.)"""
    from weakicl import session
    from weakicl.prompts import Point, PromptSet

    monkeypatch.setattr(session, "POINT_BOX_ROUNDS", 0)
    volume, truth = phantom
    centre = np.argwhere(truth).mean(axis=0)
    points = PromptSet(points=[Point(tuple(float(c) for c in centre[::-1]), True)])
    task = segmenter.encode_context([(volume, points)])
    competing = segmenter.segment(volume, task, target_prompts=points).masks[0]
    monkeypatch.setattr(session, "POINT_BACKGROUND_BAND_VOXELS", None)
    alone = segmenter.segment(volume, task, target_prompts=points).masks[0]
    assert (competing & truth).sum() > 4 * (alone & truth).sum()  # 157 of 491 voxels against 5
    assert (competing & ~truth).sum() <= 0.1 * competing.sum()  # up to the edge, not past it
    monkeypatch.setattr(session, "GEODESIC_WEIGHT", 0.0)
    assert np.array_equal(segmenter.segment(volume, task, target_prompts=points).masks[0], alone)


@pytest.fixture()
def oracle_segmenter(tiny_model, monkeypatch):
    """A Segmenter whose network answers the truth of `oracle_segmenter.truth` in whatever frame it is
    asked about (probabilities 0.999 / 0.001), appearance probe off: what the competition adds alone."""
    from weakicl import session
    from weakicl.session import Segmenter

    segmenter = Segmenter(model=tiny_model, device="cpu")
    framed = Segmenter._frame
    asked = {}

    def frame(self, *args, **kwargs):
        asked["frame"] = framed(self, *args, **kwargs)
        return asked["frame"]

    def network(self, image, channels, task, progress, priors=None, encoded=None):
        if encoded is not None:
            encoded += [None, None]  # no image, no encoder levels: the probe is off
        inside = asked["frame"].sample(segmenter.truth.astype(np.float32), fill=0.0) > 0.5
        return (0.001 + 0.998 * inside)[None].astype(np.float32)

    monkeypatch.setattr(Segmenter, "_frame", frame)
    monkeypatch.setattr(Segmenter, "_sliding_window", network)
    monkeypatch.setattr(session, "appearance_logits", lambda levels, image, labels: None)
    return segmenter


def test_a_lone_slice_box_does_not_cap_what_the_network_finds(oracle_segmenter):
    """Beyond the box hull the competition's background seeds add nothing: a structure that goes on past
    one slice box (or bunched ones) keeps its length."""
    from weakicl.evaluation.metrics import dice
    from weakicl.prompts import Box, PromptSet
    from weakicl.volume import Geometry, Volume

    shape = (48, 48, 48)
    truth = ellipsoid(shape, (24, 24, 24), (16, 10, 10))  # k 8-40
    image = (100 * truth + np.random.default_rng(0).normal(0, 30, shape)).astype(np.float32)
    volume = Volume(image, Geometry.identity(shape, (1.0, 1.0, 1.0)), "MR")
    oracle_segmenter.truth = truth

    def box(k):
        j, i = np.nonzero(truth[k])
        return Box((float(i.min()), float(j.min()), float(k)), (float(i.max()), float(j.max()), float(k)))

    for prompts in (PromptSet([box(24)]), PromptSet([box(20), box(24), box(28)])):
        task = oracle_segmenter.encode_context([(volume, prompts)])
        assert dice(oracle_segmenter.segment(volume, task, target_prompts=prompts).masks[0], truth) > 0.95


def test_a_correction_changes_the_competition_only_around_its_click(segmenter, phantom, monkeypatch):
    """A correction runs the competition over the whole structure with every prompt: with or without it,
    the correction's result differs only near the new click, never far from it."""
    from weakicl import session
    from weakicl.prompts import Point, PromptSet
    from weakicl.simulation import corrective_click, slice_boxes

    volume, truth = phantom
    boxes = slice_boxes(truth)
    task = segmenter.encode_context([(volume, boxes)])
    first = segmenter.segment(volume, task, target_prompts=boxes).masks[0]
    click = corrective_click(first, truth) or Point(tuple(float(c) for c in np.argwhere(truth).mean(axis=0)[::-1]), True)
    new = PromptSet(points=[click])
    corrected = segmenter.segment(volume, task, boxes + new, first.astype(np.float32), new_prompts=new)
    region = np.zeros(truth.shape, bool)
    region[corrected.changed_kji] = True
    assert np.array_equal(corrected.masks[0][~region], first[~region])  # the rest of the previous result stands
    assert corrected.masks[0][tuple(int(round(c)) for c in click.ijk[::-1])] == click.positive
    monkeypatch.setattr(session, "GEODESIC_WEIGHT", 0.0)
    without = segmenter.segment(volume, task, boxes + new, first.astype(np.float32), new_prompts=new)
    assert without.changed_kji == corrected.changed_kji


def test_sweeps_on_the_device_find_the_distances_of_the_search():
    from scipy import ndimage

    from weakicl.geodesic import _distances_from, _swept_distances

    rng = np.random.default_rng(2)
    image = ndimage.gaussian_filter(rng.normal(size=(12, 14, 16)), 1.0).astype(np.float32)  # winding cheapest paths
    sources = np.zeros((3,) + image.shape, bool)
    sources[0, 6, 7, 8] = True
    sources[1, rng.integers(0, 12, 5), rng.integers(0, 14, 5), rng.integers(0, 16, 5)] = True
    # sources[2] empty: nothing reachable
    swept = _swept_distances(image, sources, "cpu")  # the CUDA code path, run on the CPU
    for found, mask in zip(swept, sources):
        np.testing.assert_allclose(found, _distances_from(image, mask), rtol=1e-9, atol=1e-12)
    assert np.isinf(swept[2]).all()
    flat, seed = image[:1], np.zeros((1, 1, 14, 16), bool)  # a single slice: no steps along k
    seed[0, 0, 3, 4] = True
    np.testing.assert_allclose(_swept_distances(flat, seed, "cpu")[0], _distances_from(flat, seed[0]), rtol=1e-9)


def test_sweeps_that_do_not_settle_leave_the_distances_to_the_search(monkeypatch):
    from weakicl import geodesic

    image = np.ones((1, 12, 12), np.float32)
    image[0, 1:11:2, :11] = 50.0  # walls with a gap at alternating ends: a serpentine path
    image[0, 3:11:4, :1] = 1.0
    image[0, 3:11:4, 11:] = 50.0
    sources = np.zeros((1,) + image.shape, bool)
    sources[0, 0, 0, 0] = True
    monkeypatch.setattr(geodesic, "MAX_SWEEPS", 1)
    assert geodesic._swept_distances(image, sources, "cpu") is None  # one round cannot follow the turns
    monkeypatch.setattr(geodesic, "MAX_SWEEPS", 256)
    np.testing.assert_allclose(geodesic._swept_distances(image, sources, "cpu")[0], geodesic._distances_from(image, sources[0]), rtol=1e-9)
    seeds = np.zeros(image.shape, np.int8)
    seeds[0, 0, 0], seeds[0, -1, -1] = 1, 2
    monkeypatch.setattr(geodesic, "_swept_distances", lambda image, sources, device: None)  # as if unsettled on CUDA
    np.testing.assert_array_equal(geodesic._searched_margin(image, seeds, "cuda"), geodesic._searched_margin(image, seeds, "cpu"))


def test_a_3d_box_alone_seeds_its_centre_against_what_lies_beyond_it():
    from weakicl.prompts import Box, Point, PromptSet
    from weakicl.session import _box3d_seeds

    image = np.zeros((20, 30, 40))
    box = Box((10.0, 5.0, 4.0), (29.0, 24.0, 15.0))  # IJK: i 10-29, j 5-24, k 4-15
    inside, seeds = _box3d_seeds(PromptSet(boxes=[box], points=[Point((21.0, 16.0, 10.0), False)]), image)
    assert inside[3:17, 4:26, 9:31].all() and inside.sum() == 14 * 22 * 22  # one voxel of tolerance
    assert np.all(seeds[~inside] == 0)
    core = np.zeros(image.shape, bool)
    core[9:11, 13:17, 18:22] = True  # the central quarter of each side: k 9.5 +- 1.4, j and i +- 2.4
    assert np.all(seeds[core & (seeds != 0)] == 1) and np.all(seeds[inside & ~core] <= 0)
    # the negative point's 3x3x3 voxels are background, in the core too
    assert seeds[10, 16, 21] == 0 and (seeds[core] == 0).sum() == 2 * 2 * 2 and (seeds[inside] == 0).sum() == 27


def test_a_3d_box_alone_outlines_its_structure_in_its_own_pass(segmenter, phantom, monkeypatch):
    from weakicl import session
    from weakicl.evaluation.metrics import dice
    from weakicl.prompts import Box, PromptSet

    monkeypatch.setattr(session, "BOX3D_ROUNDS", 0)  # the box's own pass alone
    volume, truth = phantom
    nonzero = np.argwhere(truth)
    box = PromptSet(boxes=[Box(tuple(nonzero.min(axis=0)[::-1] - 0.5), tuple(nonzero.max(axis=0)[::-1] + 0.5))])
    task = segmenter.encode_context([(volume, box)])
    competing = segmenter.segment(volume, task, target_prompts=box).masks[0]
    monkeypatch.setattr(session, "BOX3D_CORE_FRACTION", None)
    alone = segmenter.segment(volume, task, target_prompts=box).masks[0]
    assert dice(competing, truth) > dice(alone, truth) + 0.1  # 0.996 against 0.513 with the tiny network
    monkeypatch.setattr(session, "GEODESIC_WEIGHT", 0.0)
    assert np.array_equal(segmenter.segment(volume, task, target_prompts=box).masks[0], alone)
