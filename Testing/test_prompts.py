"""Prompt files in every format and coordinate system, rasterisation, and prompt validation."""

import json

import numpy as np
import pytest

from conftest import oblique_geometry
from weakicl.errors import InputError
from weakicl.prompts import Box, Point, PromptSet, box_hull, clip_box, rasterize, read_prompts
from weakicl.simulation import corrective_click, largest_component, slice_boxes
from weakicl.volume import Geometry


def write_json(path, document):
    path.write_text(json.dumps(document))
    return path


def markups(kind, system, **fields):
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [dict(type=kind, coordinateSystem=system, **fields)]}


@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_markups_point_lands_on_the_known_voxel(tmp_path, system):
    geometry = oblique_geometry()
    voxel = np.array([7.0, 11.0, 4.0])
    position = geometry.ijk_to_ras(voxel)[0] if system == "RAS" else geometry.ijk_to_lps(voxel)[0]
    path = write_json(tmp_path / "p.mrk.json", markups("Fiducial", system, controlPoints=[{"label": "F-1", "position": list(position)}]))
    prompts = read_prompts(path, geometry)
    np.testing.assert_allclose(prompts.points[0].ijk, voxel, atol=1e-6)
    assert prompts.points[0].positive


def test_points_still_being_placed_are_skipped(tmp_path):
    geometry = Geometry.identity((10, 10, 10))
    points = [{"position": [2, 3, 4], "positionStatus": "defined"}, {"position": "", "positionStatus": "undefined"}]
    path = write_json(tmp_path / "p.mrk.json", markups("Fiducial", "LPS", controlPoints=points))
    assert read_prompts(path, geometry).points == [Point((2, 3, 4))]


def test_negative_point_list_by_name(tmp_path):
    geometry = Geometry.identity((10, 10, 10))
    path = write_json(tmp_path / "n.mrk.json", markups("Fiducial", "LPS", name="negative", controlPoints=[{"position": [2, 3, 4]}]))
    assert read_prompts(path, geometry).points == [Point((2, 3, 4), positive=False)]


def test_points_of_a_file_named_negative_are_negative(tmp_path):
    geometry = Geometry.identity((10, 10, 10))
    path = write_json(tmp_path / "negative.mrk.json", markups("Fiducial", "LPS", controlPoints=[{"label": "F-1", "position": [2, 3, 4]}]))
    assert read_prompts(path, geometry).points == [Point((2, 3, 4), positive=False)]


def test_markups_roi_becomes_the_box_of_its_corners(tmp_path):
    geometry = Geometry.identity((20, 20, 20), spacing=(1.0, 1.0, 2.0))
    # RAS centre (-5, -6, 8) is LPS (5, 6, 8) -> IJK (5, 6, 4); size 4 x 2 x 0 mm: a box drawn on one slice
    path = write_json(tmp_path / "b.mrk.json", markups("ROI", "RAS", center=[-5, -6, 8], size=[4, 2, 0], orientation=list(np.eye(3).ravel())))
    box = read_prompts(path, geometry).boxes[0]
    np.testing.assert_allclose(box.lo_ijk, (3, 5, 4))
    np.testing.assert_allclose(box.hi_ijk, (7, 7, 4))
    assert box.thin_axes() == [2]


def test_voxel_json(tmp_path):
    geometry = Geometry.identity((10, 12, 14))
    path = write_json(tmp_path / "v.json", {"coordinate_system": "IJK", "boxes": [{"min": [1, 2, 3], "max": [5, 6, 3]}],
                                             "points": [{"ijk": [4, 4, 4], "positive": False}]})
    prompts = read_prompts(path, geometry)
    assert prompts.boxes == [Box((1, 2, 3), (5, 6, 3))] and prompts.points == [Point((4, 4, 4), False)]


def test_a_box_one_voxel_across_joins_the_slice_axis_of_the_other_boxes():
    """On thick slices the end of a structure can be one or two voxels across: tight around it, a box is a
    line, or a box the hull would not interpolate with the others."""
    geometry = Geometry.identity((10, 12, 14))
    line = Box((5, 4, 2), (5, 6, 2))  # thin along i and along the slice axis k
    prompts = PromptSet(boxes=[line, Box((3, 3, 5), (7, 8, 5))]).validate(geometry)
    widened = prompts.boxes[0]
    assert widened.thin_axes() == [2] and widened.lo_ijk == (4.0, 4.0, 2.0) and widened.hi_ijk == (6.0, 6.0, 2.0)
    two_wide = PromptSet(boxes=[Box((0, 4, 2), (1, 9, 2)), Box((3, 3, 5), (7, 8, 5))]).validate(geometry).boxes[0]
    assert two_wide.lo_ijk == (0.0, 4.0, 2.0) and two_wide.hi_ijk == (2.0, 9.0, 2.0)  # widened inside the image
    fractional = PromptSet(boxes=[Box((0.33585575305464355, 4, 2), (1.9256712853128057, 6, 2)), Box((3, 3, 5), (7, 8, 5))])
    assert fractional.validate(geometry).boxes[0].thin_axes() == [2]  # a slice box despite rounding
    with pytest.raises(InputError, match="less than one voxel along 2 axes"):  # alone, or among boxes of another axis
        PromptSet(boxes=[line]).validate(geometry)
    with pytest.raises(InputError, match="less than one voxel along 2 axes"):
        PromptSet(boxes=[line, Box((3, 5, 1), (7, 5, 6))]).validate(geometry)


@pytest.mark.parametrize("document, message", [
    ({"boxes": [{"min": [20, 0, 0], "max": [40, 2, 2]}]}, "outside the image"),
    ({"boxes": [{"min": [2, 2, 2], "max": [2, 2.5, 6]}]}, "less than one voxel along 2 axes"),
    ({"boxes": [{"min": [2, 2, 2], "max": [2, 2, 2]}]}, "less than one voxel along 3 axes"),
    ({"boxes": [{"min": [2, 2, 2], "max": [float("nan"), 5, 5]}]}, "not a finite number"),
    ({"points": [{"ijk": [float("inf"), 1, 1]}]}, "outside the image"),
    ({"markups": {"type": "ROI"}}, "must be a list"),
    ({"markups": ["ROI"]}, "must be a list"),
    ({"markups": [{"type": "ROI", "center": [5, 5, 5], "size": [4, -2, 0]}]}, "non-negative"),
    ({"markups": [{"type": "Fiducial", "coordinateSystem": 5, "controlPoints": []}]}, "malformed"),
    ({"boxes": [{"min": [5, 5, 5], "max": [2, 6, 6]}]}, "inverted"),
    ({"points": [{"ijk": [-3, 0, 0]}]}, "outside the image"),
    ({"boxes": [], "points": []}, "no prompts"),
    ({"coordinate_system": "RAS", "points": [{"ijk": [1, 1, 1]}]}, "IJK"),
    ({"points": [{"ijk": [1, 1]}]}, "malformed"),
    ({"markups": [{"type": "Curve", "controlPoints": []}]}, "unsupported markup"),
    ({"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ", "controlPoints": []}]}, "coordinateSystem"),
    ({"something": 1}, "neither"),
    # audit D8: "false" as a string counted as a positive point, and true as the coordinate 1
    ({"points": [{"ijk": [5, 5, 5], "positive": "false"}]}, r'"positive" must be true or false, got "false"'),
    ({"points": [{"ijk": [5, 5, 5], "positive": 0}]}, r'"positive" must be true or false, got 0'),
    ({"points": [{"ijk": [True, 5, 5]}]}, r"coordinates must be numbers, got \[true, 5, 5\]"),
    ({"boxes": [{"min": ["2", 2, 2], "max": [6, 6, 6]}]}, "coordinates must be numbers"),
])
def test_bad_prompt_files(tmp_path, document, message):
    with pytest.raises(InputError, match=message):
        read_prompts(write_json(tmp_path / "bad.json", document), Geometry.identity((10, 10, 10)))


def test_slice_box_thin_along_one_axis_is_accepted():
    box = Box((2, 2, 4), (7, 6, 4))
    assert PromptSet([box]).validate(Geometry.identity((10, 10, 10))).boxes == [box]


def test_box_past_the_edge_is_clipped_with_a_warning(weakicl_log):
    """Defect 8: Slicer users drag boxes past the edge; a box 3 voxels past it was refused."""
    geometry = Geometry.identity((10, 10, 10))
    prompts = PromptSet([Box((-3, 2, 4), (12, 6, 4)), Box((0, 0, 0), (9, 9, 9.4))]).validate(geometry)
    assert prompts.boxes == [Box((0, 2, 4), (9, 6, 4)), Box((0, 0, 0), (9, 9, 9))]
    assert weakicl_log == ["box 1 reaches past the image edge; clipped to IJK (0.0, 2.0, 4.0)-(9.0, 6.0, 4.0)"]
    assert clip_box(Box((11, 0, 0), (12, 3, 3)), geometry) is None


def test_utf8_bom_is_accepted(tmp_path):
    """Defect 8: files saved by Windows editors start with a byte-order mark."""
    (tmp_path / "v.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"points": [{"ijk": [1, 2, 3]}]}).encode())
    assert read_prompts(tmp_path / "v.json", Geometry.identity((10, 10, 10))).points == [Point((1, 2, 3))]


def test_folder_as_prompt_file_says_so(tmp_path):
    """Defect 8: a folder gave "not found"."""
    with pytest.raises(InputError, match="is a folder"):
        read_prompts(tmp_path, Geometry.identity((10, 10, 10)))


def test_prompt_file_that_is_not_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_prompts(tmp_path / "bad.json", Geometry.identity((10, 10, 10)))


def test_slice_box_is_thickened_to_three_slices():
    geometry = Geometry.identity((20, 20, 20))
    channels = rasterize(PromptSet([Box((2, 3, 10), (6, 8, 10))]), geometry)
    assert np.flatnonzero(channels[0].any(axis=(1, 2))).tolist() == [9, 10, 11]
    assert channels[0][10].sum() == 5 * 6


def test_box_hull_interpolates_between_annotated_slices():
    small, large = Box((10, 10, 0), (12, 12, 0)), Box((6, 6, 10), (16, 16, 10))
    hull = box_hull([small, large], (20, 30, 30))
    areas = hull.sum(axis=(1, 2))
    assert areas[0] == 9 and areas[10] == 121 and areas[11] == 0
    assert 9 < areas[5] < 121 and np.all(np.diff(areas[:11]) >= 0)



def test_box_hull_goes_on_past_the_outermost_boxes_by_a_fraction_of_their_gap():
    boxes = [Box((10, 10, 15), (12, 12, 15)), Box((6, 6, 25), (16, 16, 25)), Box((8, 8, 35), (14, 14, 35))]
    plain = box_hull(boxes, (52, 30, 30))
    extended = box_hull(boxes, (52, 30, 30), extension_gaps=0.6)
    assert np.flatnonzero(plain.any(axis=(1, 2))).tolist() == list(range(15, 36))
    # gap 10 slices: 6 more slices each way, each a copy of the outermost box
    assert np.flatnonzero(extended.any(axis=(1, 2))).tolist() == list(range(9, 42))
    assert np.array_equal(extended[9], plain[15]) and np.array_equal(extended[41], plain[35])
    assert np.array_equal(extended[15:36], plain[15:36])


def test_box_hull_goes_on_to_an_image_edge_within_a_gap_of_the_outermost_boxes():
    """A spinal cord or an aorta running out of the image: the boxes at 25/50/75 % of its extent lie one
    gap (and a slice of rounding) from the edge, and the structure goes on to it."""
    boxes = [Box((10, 10, 5), (12, 12, 5)), Box((10, 10, 9), (12, 12, 9)), Box((10, 10, 14), (12, 12, 14))]
    hull = box_hull(boxes, (20, 30, 30), extension_gaps=0.6)
    assert np.flatnonzero(hull.any(axis=(1, 2))).tolist() == list(range(0, 20))  # gap 4.5; 5 slices to each edge
    inside = box_hull(boxes, (26, 30, 30), extension_gaps=0.6)  # 11 slices to the upper edge: 0.6 gap there
    assert np.flatnonzero(inside.any(axis=(1, 2))).tolist() == list(range(0, 18))
    # the same boxes on a frame that made each slice of the image 3 voxels: 1.5 slices apart, too close to tell
    thick = box_hull(boxes, (20, 30, 30), extension_gaps=0.6, slices_per_voxel_ijk=(1.0, 1.0, 1 / 3))
    assert np.flatnonzero(thick.any(axis=(1, 2))).tolist() == list(range(2, 18))


def test_a_lone_slice_box_or_a_3d_box_is_not_extended():
    for boxes in ([Box((10, 10, 10), (12, 12, 10))], [Box((10, 10, 10), (12, 12, 14))]):
        assert np.array_equal(box_hull(boxes, (30, 30, 30), extension_gaps=1.0), box_hull(boxes, (30, 30, 30)))

def test_point_sphere_is_one_at_the_centre_and_zero_beyond_its_radius():
    geometry = Geometry.identity((20, 20, 20), spacing=(2.0, 2.0, 2.0))
    channel = rasterize(PromptSet(points=[Point((10, 10, 10))]), geometry, point_radius_mm=6.0)[2]
    assert channel[10, 10, 10] == 1.0
    assert channel[10, 10, 13] == 0.0 and 0 < channel[10, 10, 12] < 1
    assert rasterize(PromptSet(points=[Point((10, 10, 10), False)]), geometry)[3].max() == 1.0


def test_slice_boxes_are_tight_on_the_chosen_slices():
    mask = np.zeros((21, 30, 30), bool)
    mask[0:21, 5:15, 8:20] = True
    mask[10, 3:16, 8:22] = True
    boxes = slice_boxes(mask).boxes
    assert [b.lo_ijk[2] for b in boxes] == [5, 10, 15]
    assert boxes[1] == Box((8, 3, 10), (21, 15, 10))
    assert boxes[0] == Box((8, 5, 5), (19, 14, 5))


def test_corrective_click_targets_the_largest_error():
    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    prediction = truth.copy()
    prediction[5:15, 5:15, 10:15] = False  # a large miss
    prediction[0:2, 0:2, 0:2] = True  # a small overshoot
    click = corrective_click(prediction, truth)
    assert click.positive and truth[tuple(int(c) for c in click.ijk[::-1])]
    assert corrective_click(truth, truth) is None


def test_jittered_clicks_land_off_centre_but_deep_in_the_same_error():
    from scipy import ndimage

    truth = np.zeros((30, 30, 30), bool)
    truth[5:25, 5:25, 5:25] = True
    prediction = truth.copy()
    prediction[5:25, 5:25, 12:25] = False  # a slab-shaped miss, 13 voxels deep along i
    miss = truth & ~prediction
    depth = ndimage.distance_transform_edt(np.pad(miss, 1))[1:-1, 1:-1, 1:-1]
    rng = np.random.default_rng(0)
    clicks = [corrective_click(prediction, truth, 0.1, rng) for _ in range(20)]
    voxels = {tuple(int(c) for c in click.ijk[::-1]) for click in clicks}
    assert all(click.positive for click in clicks) and len(voxels) > 5  # people do not hit one voxel
    assert all(miss[v] and depth[v] >= depth.max() / 2 for v in voxels)


def test_clicks_found_in_the_error_s_bounding_box_are_those_of_the_whole_array():
    from scipy import ndimage

    from weakicl.simulation import FULL_CONNECTIVITY

    def whole_array_click(prediction, truth, jitter, rng):  # the depths over the whole array, as before
        errors = [(truth & ~prediction, True), (prediction & ~truth, False)]
        best = max(((labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1, positive, np.bincount(labels.ravel())[1:].max())
                    for error, positive in errors for labels in [ndimage.label(error, FULL_CONNECTIVITY)[0]] if labels.any()),
                   key=lambda item: item[2])  # the first of equal sizes, as corrective_click keeps
        depth = ndimage.distance_transform_edt(np.pad(best[0], 1))[1:-1, 1:-1, 1:-1]
        if jitter:
            deep = np.argwhere(depth >= max(1.0, depth.max() * (1.0 - 5.0 * jitter)))
            return tuple(deep[int(rng.integers(len(deep)))]), best[1]
        return np.unravel_index(int(np.argmax(depth)), depth.shape), best[1]

    rng = np.random.default_rng(5)
    for trial in range(30):
        truth = np.zeros((18, 22, 26), bool)  # blobs away from the array's corner: the boxes start inside it
        truth[4:14, 5:18, 6:21] = ndimage.gaussian_filter(rng.random((10, 13, 15)), 1.5) > 0.5
        prediction = ndimage.binary_dilation(truth, iterations=int(rng.integers(0, 3))) & (rng.random(truth.shape) > 0.05 * (trial % 3))
        for jitter in (0.0, 0.1):
            seed = int(rng.integers(1 << 30))
            click = corrective_click(prediction, truth, jitter, np.random.default_rng(seed))
            if click is None:
                continue
            kji, positive = whole_array_click(prediction, truth, jitter, np.random.default_rng(seed))
            assert click.positive == positive and tuple(int(c) for c in click.ijk[::-1]) == tuple(int(c) for c in kji)


def test_largest_component_keeps_the_biggest_26_connected_part():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[5:8, 5:8, 5:8] = True  # 27 voxels
    mask[4, 4, 4] = True  # touches the cube only at a corner: 26-connected to it
    largest = largest_component(mask)
    assert largest.sum() == 28 and largest[4, 4, 4] and not largest[0, 0, 0]
    twins = np.zeros((4, 4, 9), dtype=bool)
    twins[:2, :2, :2] = twins[:2, :2, 6:8] = True  # equal sizes: the first in label order
    assert largest_component(twins)[0, 0, 0] and not largest_component(twins)[0, 0, 6]
    assert not largest_component(np.zeros((3, 3, 3), dtype=bool)).any()
