"""Boxes placed the way the application places them (defect 1 of issue 14): the Box button, then two
clicks on a slice view (`AddControlPointWorld` twice, with the crosshair on that view, as the mouse puts
it), which Slicer's `UpdateBoxROIFromControlPoints` pads to the shortest side and the module flattens
again. Axial and sagittal boxes must come out as slice boxes of their IJK axis, oblique ones as oriented
boxes in their plane, also after resizing their sides; markups files saved by Slicer (padded, or flat)
are read by the engine with the same rule."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "WeakICLSegment"))

from conftest import application_scene  # noqa: E402
from weakicl.prompts import Box, PromptSet, box_hull, rasterize, read_prompts  # noqa: E402
from weakicl.slicebox import OrientedBox, oriented_hull, padded_axis, rasterize_oriented  # noqa: E402
from weakicl.volume import Geometry, Volume  # noqa: E402
from WeakICLSegmentLib import mrml_bridge as bridge  # noqa: E402
from WeakICLSegmentLib.scene_logic import SceneLogic  # noqa: E402

Role = bridge.PromptRole
AXIAL = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]])  # Slicer's SliceToRAS rotations of the three views
SAGITTAL = np.array([[0, 0, 1.0], [-1, 0, 0], [0, 1, 0]])
angle = np.deg2rad(30)
OBLIQUE = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]) @ AXIAL  # axial tilted 30 deg about A


@pytest.fixture()
def scene():
    return application_scene(crosshair=True)


@pytest.fixture()
def logic(scene):
    return SceneLogic(scene, lambda device: None)


def add_volume(scene, geometry: Geometry):
    return bridge.volume_node_from_volume(scene, Volume(np.zeros(geometry.shape_kji, np.float32), geometry), "MR")


def slice_view(scene, rotation: np.ndarray, centre_ras) -> object:
    """A slice view with this orientation through `centre_ras`, and the mouse on it."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, :3] = rotation
    slice_to_ras[:3, 3] = centre_ras
    node.GetSliceToRAS().DeepCopy(bridge.vtk_matrix(slice_to_ras))
    node.UpdateMatrices()
    scene.GetFirstNodeByClass("vtkMRMLCrosshairNode").SetCursorPositionXYZ([10.0, 10.0, 0.0], node)
    return node


def draw_box(logic, volume, rotation, centre_ras, half_x: float, half_y: float):
    """Box button, then two clicks on the view: opposite corners of a rectangle in the slice plane."""
    slice_view(logic.scene, rotation, centre_ras)
    roi = logic.placePrompt(Role.CONTEXT_BOX, volume)
    corner = rotation[:, 0] * half_x + rotation[:, 1] * half_y
    roi.AddControlPointWorld(*(np.asarray(centre_ras) - corner))
    roi.AddControlPointWorld(*(np.asarray(centre_ras) + corner))
    return roi


AXIAL_GRID = Geometry((0.8, 0.8, 2.0), (-30.0, -40.0, -20.0), np.diag([-1.0, -1.0, 1.0]), (30, 90, 80))  # LPS direction: i to L


def test_two_clicks_on_an_axial_slice_give_a_slice_box_on_that_slice(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    centre = AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0]  # on slice k=12, between voxels in plane
    roi = draw_box(logic, volume, AXIAL, centre, 8.1, 12.3)
    np.testing.assert_allclose(roi.GetSize(), [16.2, 24.6, 0.0], atol=1e-6)  # Slicer's padding undone: flat on its slice
    box = bridge.box_from_roi(roi, AXIAL_GRID)
    assert isinstance(box, Box) and box.thin_axes() == [2]
    np.testing.assert_allclose([box.lo_ijk[2], box.hi_ijk[2]], [12.0, 12.0], atol=1e-6)
    np.testing.assert_allclose(np.subtract(box.hi_ijk, box.lo_ijk)[:2], [2 * 8.1 / 0.8, 2 * 12.3 / 0.8], atol=1e-6)
    assert "slice K=12" in logic.contextEntries()[0].label


def test_a_box_is_flattened_also_when_slicer_skips_the_second_clicks_defined_event(scene):
    """Slicer reads the second corner after its box update has freed it to decide whether to invoke
    PointPositionDefinedEvent: without that event the box must come out flat all the same."""
    volume = add_volume(scene, AXIAL_GRID)
    centre = AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0]
    slice_node = slice_view(scene, AXIAL, centre)
    roi = bridge.create_prompt_node(scene, Role.CONTEXT_BOX, volume)
    placed = []
    on_defined, *others = bridge.watch_box_placement(roi, lambda: slice_node, placed.append)
    corner = AXIAL[:, 0] * 8.1 + AXIAL[:, 1] * 12.3
    roi.AddControlPointWorld(*(centre - corner))
    assert placed == []
    roi.RemoveObserver(on_defined)  # as when the event does not come
    roi.AddControlPointWorld(*(centre + corner))
    np.testing.assert_allclose(roi.GetSize(), [16.2, 24.6, 0.0], atol=1e-6)
    assert bridge.recorded_slice_axis(roi) == 2 and roi.GetAttribute(bridge.FIRST_CORNER_ATTRIBUTE) is None
    assert placed == [roi]  # those who listened for that event to list the box hear this instead


def test_the_logic_tells_once_when_a_box_is_in(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    placed = []
    logic.onBoxPlaced = placed.append
    roi = draw_box(logic, volume, AXIAL, AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0], 8.1, 12.3)
    assert placed == [roi]
    roi.SetNthControlPointPositionWorld(0, *AXIAL_GRID.ijk_to_ras([[41.0, 44.0, 12.0]])[0])  # moved later: not placed again
    assert placed == [roi]


def test_two_clicks_on_a_sagittal_slice_give_a_slice_box_of_the_i_axis(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    centre = AXIAL_GRID.ijk_to_ras([[31.0, 40.4, 14.3]])[0]
    roi = draw_box(logic, volume, SAGITTAL, centre, 9.7, 11.1)
    box = bridge.box_from_roi(roi, AXIAL_GRID)
    assert isinstance(box, Box) and box.thin_axes() == [0]
    np.testing.assert_allclose([box.lo_ijk[0], box.hi_ijk[0]], [31.0, 31.0], atol=1e-6)
    np.testing.assert_allclose(np.subtract(box.hi_ijk, box.lo_ijk)[1:], [2 * 9.7 / 0.8, 2 * 11.1 / 2.0], atol=1e-6)


def test_two_clicks_on_an_oblique_slice_give_an_oriented_box_in_that_plane(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    centre = AXIAL_GRID.ijk_to_ras([[40.0, 45.0, 15.0]])[0]
    roi = draw_box(logic, volume, OBLIQUE, centre, 10.0, 6.0)
    box = bridge.box_from_roi(roi, AXIAL_GRID)
    assert isinstance(box, OrientedBox)
    np.testing.assert_allclose(box.centre_ijk, [40.0, 45.0, 15.0], atol=1e-6)
    # its corners are the rectangle drawn in the plane
    drawn = centre + np.array([sx * 10.0 * OBLIQUE[:, 0] + sy * 6.0 * OBLIQUE[:, 1] for sx in (-1, 1) for sy in (-1, 1)])
    expected = AXIAL_GRID.ras_to_ijk(drawn)
    for corner in box.corners_ijk():
        assert np.min(np.linalg.norm(expected - corner, axis=1)) < 1e-6
    prompts = bridge.prompts_from_nodes([roi], AXIAL_GRID)
    assert prompts.oriented_boxes == [box] and not prompts.boxes
    assert "oblique slice" in logic.contextEntries()[0].label


def test_oriented_box_rasterises_to_its_slab_and_interpolates_between_parallel_slices():
    geometry = AXIAL_GRID
    normal_ras = OBLIQUE[:, 2]
    centre = geometry.ijk_to_ras([[40.0, 45.0, 12.0]])[0]
    boxes = []
    for offset in (-8.0, 8.0):  # two boxes of one oblique view, 16 mm apart
        c = centre + offset * normal_ras
        corner_u, corner_v = 10.0 * OBLIQUE[:, 0], 6.0 * OBLIQUE[:, 1]
        u = geometry.ras_to_ijk([c + corner_u])[0] - geometry.ras_to_ijk([c])[0]
        v = geometry.ras_to_ijk([c + corner_v])[0] - geometry.ras_to_ijk([c])[0]
        boxes.append(OrientedBox(tuple(geometry.ras_to_ijk([c])[0]), tuple(u), tuple(v)))
    thin = rasterize_oriented(boxes[0], geometry.shape_kji, 0.5)
    kji = np.argwhere(thin)
    ras = geometry.ijk_to_ras(kji[:, ::-1])
    local = (ras - (centre - 8.0 * normal_ras)) @ OBLIQUE
    assert np.all(np.abs(local[:, 0]) <= 10.0 + 1e-6) and np.all(np.abs(local[:, 1]) <= 6.0 + 1e-6)
    assert np.all(np.abs(local[:, 2]) <= 2.0 + 1e-6)  # within one slab of the plane (2 mm slices)
    area_voxels = (20.0 * 12.0) / (0.8 * 0.8)  # the rectangle seen along k covers about this many voxels per slice
    assert 0.6 * area_voxels < thin.sum() < 2.5 * area_voxels
    hull = oriented_hull(boxes, geometry.shape_kji)
    middle = geometry.ras_to_ijk([centre])[0]
    assert hull[tuple(np.round(middle[::-1]).astype(int))], "the slices between the two boxes are filled"
    channels = rasterize(PromptSet(oriented_boxes=boxes), geometry)
    assert channels[1].sum() > 5 * thin.sum() and channels[0].sum() >= 2 * thin.sum()


def test_padding_is_recognised_without_a_placement_record_and_in_files_saved_by_slicer(scene, tmp_path):
    volume = add_volume(scene, AXIAL_GRID)
    roi = bridge.create_prompt_node(scene, Role.CONTEXT_BOX, volume)  # not watched: like a scene saved by another tool
    centre = AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0]
    for sign in (-1, 1):
        roi.AddControlPointWorld(*(centre + sign * np.array([8.1, 8.1, 0.0])))  # a square: 16.2 x 16.2 x 16.2 mm
    box = bridge.box_from_roi(roi, AXIAL_GRID)
    assert box.thin_axes() == [2] and box.lo_ijk[2] == pytest.approx(12.0)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "box.mrk.json"))
    assert storage.WriteData(roi)
    assert json.loads((tmp_path / "box.mrk.json").read_text())["markups"][0]["coordinateSystem"] == "LPS"
    (read,) = read_prompts(tmp_path / "box.mrk.json", AXIAL_GRID).boxes
    np.testing.assert_allclose(read.lo_ijk, box.lo_ijk, atol=1e-6)
    np.testing.assert_allclose(read.hi_ijk, box.hi_ijk, atol=1e-6)


def test_a_placed_box_resized_through_its_slice_is_a_3d_box_and_a_set_box_stays_as_set(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    centre = AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0]
    roi = draw_box(logic, volume, AXIAL, centre, 8.1, 12.3)
    size = list(roi.GetSize())
    roi.SetSize(size[0], size[1], 30.0)  # dragged the handle along the normal
    assert bridge.box_from_roi(roi, AXIAL_GRID).thin_axes() == []
    scripted = bridge.create_prompt_node(logic.scene, Role.CONTEXT_BOX, volume)
    bridge.set_roi_box(scripted, Box((30, 40, 10), (40, 50, 20)), AXIAL_GRID)  # a cube-ish 3D box set by a script
    assert bridge.box_from_roi(scripted, AXIAL_GRID).thin_axes() == []


@pytest.mark.parametrize("rotation", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
@pytest.mark.parametrize("factor", [0.7, 1.3])
def test_a_slice_box_resized_in_its_plane_with_the_handles_stays_a_slice_box(logic, tmp_path, rotation, factor):
    volume = add_volume(logic.scene, AXIAL_GRID)
    roi = draw_box(logic, volume, rotation, AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0], 8.1, 12.3)
    x, y, z = roi.GetSize()
    roi.SetSize(x * factor, y, z)  # the L/R face handle: vtkSlicerROIWidget::ScaleWidget sets the in-plane sides only
    box = bridge.box_from_roi(roi, AXIAL_GRID)
    if rotation is AXIAL:
        assert isinstance(box, Box) and box.thin_axes() == [2] and box.lo_ijk[2] == pytest.approx(12.0)
        assert "slice K=12" in logic.contextEntries()[0].label
    else:
        assert isinstance(box, OrientedBox)
        assert "oblique slice" in logic.contextEntries()[0].label
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()  # saved and read back without the module's attributes
    logic.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "box.mrk.json"))
    assert storage.WriteData(roi)
    read = read_prompts(tmp_path / "box.mrk.json", AXIAL_GRID)
    assert (read.boxes[0].thin_axes() == [2]) if rotation is AXIAL else (len(read.oriented_boxes) == 1)


def test_padded_axis_prefers_the_side_whose_centre_lies_on_a_slice():
    assert padded_axis(np.array([40.0, 56.0, 40.0]), np.array([30.37, 12.0, 60.0]), np.array([1.0, 1.0, 1.0])) == 2
    assert padded_axis(np.array([40.0, 56.0, 40.0]), np.array([30.0, 12.0, 60.0]), np.array([1.0, 1.0, 3.0])) == 2
    assert padded_axis(np.array([40.0, 56.0, 41.0])) is None


def test_slice_boxes_placed_by_clicks_interpolate_across_the_slices_between_them(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    for k in (8.0, 14.0, 20.0):
        draw_box(logic, volume, AXIAL, AXIAL_GRID.ijk_to_ras([[40.3, 44.6, k]])[0], 8.1, 12.3)
    prompts = logic.targetPrompts(volume, bridge.CONTEXT_ROLES)
    hull = box_hull(prompts.boxes, AXIAL_GRID.shape_kji)
    assert all(hull[k].any() for k in range(8, 21)) and not hull[7].any() and not hull[21].any()


def test_an_oblique_box_saved_by_slicer_reads_back_as_the_same_oriented_box(logic, tmp_path):
    volume = add_volume(logic.scene, AXIAL_GRID)
    roi = draw_box(logic, volume, OBLIQUE, AXIAL_GRID.ijk_to_ras([[40.3, 44.6, 12.0]])[0], 10.0, 6.0)
    storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
    logic.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "oblique.mrk.json"))
    assert storage.WriteData(roi)
    read = read_prompts(tmp_path / "oblique.mrk.json", AXIAL_GRID)
    assert not read.boxes and len(read.oriented_boxes) == 1
    expected = bridge.box_from_roi(roi, AXIAL_GRID)
    np.testing.assert_allclose(read.oriented_boxes[0].centre_ijk, expected.centre_ijk, atol=1e-6)
    np.testing.assert_allclose(sorted(map(tuple, read.oriented_boxes[0].corners_ijk())), sorted(map(tuple, expected.corners_ijk())), atol=1e-6)


def test_a_correction_box_placed_by_two_clicks_is_a_slice_box_too(logic):
    volume = add_volume(logic.scene, AXIAL_GRID)
    slice_view(logic.scene, SAGITTAL, AXIAL_GRID.ijk_to_ras([[31.0, 40.0, 14.0]])[0])
    roi = logic.placePrompt(Role.CORRECTION_BOX, volume)
    for corner in ((31.0, 30.2, 9.0), (31.0, 52.6, 19.0)):
        roi.AddControlPointWorld(*AXIAL_GRID.ijk_to_ras([corner])[0])
    (box,) = logic.targetPrompts(volume, bridge.CORRECTION_ROLES).boxes
    assert box.thin_axes() == [0] and box.lo_ijk[0] == pytest.approx(31.0)
    np.testing.assert_allclose(box.lo_ijk[1:], (30.2, 9.0), atol=1e-6)
    np.testing.assert_allclose(box.hi_ijk[1:], (52.6, 19.0), atol=1e-6)
