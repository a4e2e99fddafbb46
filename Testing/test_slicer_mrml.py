"""MRML <-> engine conversion with real Slicer MRML classes (pip's slicer-core): volumes, prompts and
segments keep their geometry, and every prompt lands on the voxel it was drawn on."""

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "WeakICLSegment"))

from conftest import ellipsoid, oblique_geometry  # noqa: E402
from weakicl.errors import InputError  # noqa: E402
from weakicl.prompts import Box  # noqa: E402
from weakicl.volume import Geometry, Volume  # noqa: E402
from WeakICLSegmentLib import mrml_bridge as bridge  # noqa: E402
from WeakICLSegmentLib import history  # noqa: E402
from WeakICLSegmentLib.history import EditHistory, PackedMask  # noqa: E402

GEOMETRIES = {
    "axis-aligned": Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), (8, 10, 12)),
    "oblique-anisotropic": oblique_geometry(),
}


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def add_volume(scene, geometry: Geometry, name: str = "volume"):
    rng = np.random.default_rng(0)
    return bridge.volume_node_from_volume(scene, Volume(rng.normal(size=geometry.shape_kji).astype(np.float32), geometry), name)


def node_ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return bridge.numpy_matrix(matrix)


def translation(scene, offset) -> object:
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    transform.SetMatrixTransformToParent(bridge.vtk_matrix(matrix))
    return transform


# --- volumes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GEOMETRIES)
def test_volume_round_trip_keeps_voxels_and_geometry(scene, name):
    geometry = GEOMETRIES[name]
    node = add_volume(scene, geometry)
    volume = bridge.volume_from_node(node)
    np.testing.assert_array_equal(volume.array, slicer.util.arrayFromVolume(node))
    assert volume.geometry.same_grid(geometry, tolerance=1e-9)
    np.testing.assert_allclose(node_ijk_to_ras(node), geometry.ijk_to_ras_matrix(), atol=1e-9)


def test_volume_set_up_the_slicer_way_gives_the_same_ras_for_every_voxel(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.SetAndObserveImageData(bridge.image_data(np.zeros((5, 6, 7), dtype=np.int16)))
    node.SetSpacing(0.7, 0.8, 3.0)
    node.SetOrigin(-12.0, 30.0, 5.0)
    angle = np.deg2rad(30)
    directions = np.array([[-np.cos(angle), np.sin(angle), 0], [-np.sin(angle), -np.cos(angle), 0], [0, 0, 1]])
    node.SetIJKToRASDirections(directions.tolist())
    geometry = bridge.geometry_from_volume_node(node)
    ijk = np.array([[0, 0, 0], [6, 5, 4], [3.5, 2.0, 1.25]])
    expected = (np.c_[ijk, np.ones(3)] @ node_ijk_to_ras(node).T)[:, :3]
    np.testing.assert_allclose(geometry.ijk_to_ras(ijk), expected, atol=1e-9)
    assert geometry.shape_kji == (5, 6, 7)
    np.testing.assert_allclose(geometry.spacing, (0.7, 0.8, 3.0))


def test_parent_transform_of_a_volume_is_applied(scene):
    node = add_volume(scene, GEOMETRIES["oblique-anisotropic"])
    node.SetAndObserveTransformNodeID(translation(scene, (10.0, -4.0, 2.5)).GetID())
    geometry = bridge.geometry_from_volume_node(node)
    np.testing.assert_allclose(geometry.ijk_to_ras([[1, 2, 3]])[0], GEOMETRIES["oblique-anisotropic"].ijk_to_ras([[1, 2, 3]])[0] + (10.0, -4.0, 2.5))


def test_warping_parent_transform_is_refused_with_advice(scene):
    node = add_volume(scene, GEOMETRIES["axis-aligned"])
    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    spline = vtk.vtkThinPlateSplineTransform()
    points = vtk.vtkPoints()
    for corner in ((0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)):
        points.InsertNextPoint(corner)
    spline.SetSourceLandmarks(points)
    spline.SetTargetLandmarks(points)
    warp.SetAndObserveTransformToParent(spline)
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(InputError, match="Harden transform"):
        bridge.volume_from_node(node)


# --- prompts -------------------------------------------------------------------------------------


def test_roi_drawn_in_ras_lands_on_the_expected_voxels(scene):
    # a DICOM-like grid: i runs to the patient's right (-R), j to posterior (-A)
    geometry = Geometry((0.5, 0.5, 2.0), (10.0, 20.0, -30.0), np.eye(3), (20, 40, 40))
    node = add_volume(scene, geometry)
    roi = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, node)
    roi.SetCenter(-15.0, -27.0, -20.0)  # RAS: LPS (15, 27, -20) -> IJK ((15-10)/0.5, (27-20)/0.5, (-20+30)/2) = (10, 14, 5)
    roi.SetSize(4.0, 6.0, 0.0)  # 8 x 12 voxels in plane, drawn on one slice
    box = bridge.box_from_roi(roi, geometry)
    np.testing.assert_allclose(box.lo_ijk, (6, 8, 5), atol=1e-6)
    np.testing.assert_allclose(box.hi_ijk, (14, 20, 5), atol=1e-6)
    assert box.thin_axes() == [2]


def test_axis_aligned_roi_on_an_oblique_volume_gives_the_ijk_bounds_of_its_corners(scene):
    geometry = GEOMETRIES["oblique-anisotropic"]
    node = add_volume(scene, geometry)
    roi = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, node)
    centre = geometry.ijk_to_ras([[9, 10, 6]])[0]
    roi.SetCenter(*centre)
    roi.SetSize(6.0, 4.0, 9.0)  # no side thin, none padded the way two clicks pad: a 3D box
    corners = centre + np.array([[x, y, z] for x in (-3, 3) for y in (-2, 2) for z in (-4.5, 4.5)], dtype=float)
    ras_to_ijk = np.linalg.inv(node_ijk_to_ras(node))
    expected = (np.c_[corners, np.ones(8)] @ ras_to_ijk.T)[:, :3]
    box = bridge.box_from_roi(roi, geometry)
    np.testing.assert_allclose(box.lo_ijk, expected.min(axis=0), atol=1e-5)
    np.testing.assert_allclose(box.hi_ijk, expected.max(axis=0), atol=1e-5)


def test_roi_under_a_transform_and_past_the_edge_is_moved_and_clipped(scene):
    geometry = GEOMETRIES["axis-aligned"]
    node = add_volume(scene, geometry)
    roi = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, node)
    roi.SetCenter(-2.0, -3.0, 4.0)  # IJK (2, 3, 4) before the transform
    roi.SetSize(2.0, 3.0, 4.0)
    roi.SetAndObserveTransformNodeID(translation(scene, (-8.0, 0.0, 0.0)).GetID())  # IJK i + 8 -> 9..11, clipped to 11
    box = bridge.box_from_roi(roi, geometry)
    np.testing.assert_allclose(box.lo_ijk, (9, 1.5, 2), atol=1e-6)
    np.testing.assert_allclose(box.hi_ijk, (11, 4.5, 6), atol=1e-6)
    roi.SetCenter(100.0, 100.0, 100.0)
    with pytest.raises(InputError, match="outside"):
        bridge.box_from_roi(roi, geometry)


def test_roi_placed_from_an_ijk_box_reads_back_as_that_box(scene):
    geometry = GEOMETRIES["oblique-anisotropic"]
    node = add_volume(scene, geometry)
    roi = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, node)
    roi.SetAndObserveTransformNodeID(translation(scene, (3.0, 1.0, -2.0)).GetID())
    bridge.set_roi_box(roi, Box((2, 3, 4), (9, 12, 4)), geometry)
    box = bridge.box_from_roi(roi, geometry)
    np.testing.assert_allclose(box.lo_ijk, (2, 3, 4), atol=1e-4)
    np.testing.assert_allclose(box.hi_ijk, (9, 12, 4), atol=1e-4)


def test_unplaced_roi_gives_no_box(scene):
    node = add_volume(scene, GEOMETRIES["axis-aligned"])
    roi = bridge.create_prompt_node(scene, bridge.PromptRole.CORRECTION_BOX, node)
    assert bridge.box_from_roi(roi, GEOMETRIES["axis-aligned"]) is None


@pytest.mark.parametrize("name", GEOMETRIES)
def test_points_land_on_their_voxels_with_their_sign(scene, name):
    geometry = GEOMETRIES[name]
    node = add_volume(scene, geometry)
    positive = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_POSITIVE, node)
    negative = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_NEGATIVE, node)
    matrix = node_ijk_to_ras(node)
    for target, ijk in ((positive, (3, 4, 5)), (positive, (1, 2, 3)), (negative, (6, 7, 2))):
        target.AddControlPoint(*(matrix @ (*ijk, 1.0))[:3])
    prompts = bridge.prompts_from_nodes([positive, negative], geometry)
    assert [(tuple(np.round(p.ijk, 6)), p.positive) for p in prompts.points] == [
        ((3, 4, 5), True), ((1, 2, 3), True), ((6, 7, 2), False)]
    assert positive is not negative
    assert positive.GetDisplayNode().GetSelectedColor() != negative.GetDisplayNode().GetSelectedColor()


def test_point_outside_the_image_is_refused(scene):
    node = add_volume(scene, GEOMETRIES["axis-aligned"])
    points = bridge.create_prompt_node(scene, bridge.PromptRole.CORRECTION_NEGATIVE, node)
    points.AddControlPoint(500.0, 0.0, 0.0)
    with pytest.raises(InputError, match="outside"):
        bridge.prompts_from_nodes([points], GEOMETRIES["axis-aligned"])


def test_prompt_nodes_are_found_by_role_and_volume(scene):
    first, second = add_volume(scene, GEOMETRIES["axis-aligned"], "a"), add_volume(scene, GEOMETRIES["axis-aligned"], "b")
    box = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, first)
    click = bridge.create_prompt_node(scene, bridge.PromptRole.CORRECTION_POSITIVE, first)
    other = bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_POSITIVE, second)
    scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "someone else's points")
    assert bridge.prompt_nodes(scene, bridge.CONTEXT_ROLES, first) == [box]
    assert bridge.prompt_nodes(scene, bridge.CONTEXT_ROLES) == [box, other]
    assert bridge.prompt_nodes(scene, bridge.CORRECTION_ROLES, first) == [click]
    assert bridge.prompt_volume(other) is second


def test_markups_are_restored_as_captured(scene):
    geometry = GEOMETRIES["oblique-anisotropic"]
    node = add_volume(scene, geometry)
    roi = bridge.create_prompt_node(scene, bridge.PromptRole.CORRECTION_BOX, node)
    bridge.set_roi_box(roi, Box((1, 2, 3), (8, 9, 3)), geometry)
    points = bridge.create_prompt_node(scene, bridge.PromptRole.CORRECTION_POSITIVE, node)
    points.AddControlPoint(1.0, 2.0, 3.0)
    states = [history.capture_markup(roi), history.capture_markup(points)]
    roi.RemoveAllControlPoints()
    points.AddControlPoint(4.0, 5.0, 6.0)
    for state in states:
        history.restore_markup(scene, state)
    np.testing.assert_allclose(bridge.box_from_roi(roi, geometry).hi_ijk, (8, 9, 3), atol=1e-4)
    np.testing.assert_allclose(bridge.defined_positions(points), [[1.0, 2.0, 3.0]])


# --- segments ------------------------------------------------------------------------------------


@pytest.fixture()
def segmentation(scene):
    return scene.AddNewNodeByClass("vtkMRMLSegmentationNode")


@pytest.mark.parametrize("name", GEOMETRIES)
def test_mask_becomes_a_named_segment_on_the_target_grid(scene, segmentation, name):
    geometry = GEOMETRIES[name]
    mask = ellipsoid(geometry.shape_kji, np.array(geometry.shape_kji) / 2, np.array(geometry.shape_kji) / 3)
    segment_id = bridge.write_segment(segmentation, mask, geometry, "liver")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"
    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    np.testing.assert_allclose(bridge.numpy_matrix(image_to_world), geometry.ijk_to_ras_matrix(), atol=1e-6)
    np.testing.assert_array_equal(bridge.read_segment(segmentation, segment_id, geometry), mask)


def test_second_run_adds_a_second_segment_and_leaves_the_first_alone(segmentation):
    geometry = GEOMETRIES["oblique-anisotropic"]
    first = ellipsoid(geometry.shape_kji, (6, 10, 9), (4, 6, 5))
    second = ellipsoid(geometry.shape_kji, (6, 12, 9), (4, 6, 5))  # overlaps the first
    first_id = bridge.write_segment(segmentation, first, geometry, "liver")
    second_id = bridge.write_segment(segmentation, second, geometry, "liver")
    names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in (first_id, second_id)]
    assert first_id != second_id and names == ["liver", "liver 2"]
    np.testing.assert_array_equal(bridge.read_segment(segmentation, first_id, geometry), first)
    np.testing.assert_array_equal(bridge.read_segment(segmentation, second_id, geometry), second)


def test_replacing_a_segment_changes_only_that_segment(segmentation):
    geometry = GEOMETRIES["axis-aligned"]
    kept, edited = np.zeros(geometry.shape_kji, bool), np.zeros(geometry.shape_kji, bool)
    kept[1:4, 2:6, 2:6] = True
    edited[4:7, 2:6, 2:6] = True
    kept_id = bridge.write_segment(segmentation, kept, geometry, "kidney")
    edited_id = bridge.write_segment(segmentation, edited, geometry, "spleen")
    smaller = edited.copy()
    smaller[6] = False
    assert bridge.write_segment(segmentation, smaller, geometry, "spleen", edited_id) == edited_id
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    np.testing.assert_array_equal(bridge.read_segment(segmentation, edited_id, geometry), smaller)
    np.testing.assert_array_equal(bridge.read_segment(segmentation, kept_id, geometry), kept)


def test_segment_under_a_transformed_segmentation_stays_in_place_in_the_world(scene, segmentation):
    geometry = GEOMETRIES["oblique-anisotropic"]
    segmentation.SetAndObserveTransformNodeID(translation(scene, (5.0, 0.0, -3.0)).GetID())
    mask = ellipsoid(geometry.shape_kji, (6, 10, 9), (4, 6, 5))
    segment_id = bridge.write_segment(segmentation, mask, geometry, "lesion")
    np.testing.assert_array_equal(bridge.read_segment(segmentation, segment_id, geometry), mask)


def test_undo_restores_the_previous_segment_and_redo_the_next(scene, segmentation):
    geometry = GEOMETRIES["oblique-anisotropic"]
    steps = EditHistory()
    segment_id = segmentation.GetSegmentation().GenerateUniqueSegmentID("liver")
    before_first = history.capture_segment_state(segmentation, segment_id, "liver", geometry, [])
    first = ellipsoid(geometry.shape_kji, (6, 10, 9), (4, 6, 5))
    bridge.write_segment(segmentation, first, geometry, "liver", segment_id)
    steps.record(before_first)
    before_second = history.capture_segment_state(segmentation, segment_id, "liver", geometry, [])
    bridge.write_segment(segmentation, ellipsoid(geometry.shape_kji, (6, 10, 9), (2, 3, 3)), geometry, "liver", segment_id)
    steps.record(before_second)

    def capture(state):
        return history.capture_segment_state(segmentation, state.segment_id, state.name, geometry, [])

    history.restore_segment_state(scene, steps.undo(capture))
    np.testing.assert_array_equal(bridge.read_segment(segmentation, segment_id, geometry), first)
    history.restore_segment_state(scene, steps.undo(capture))
    assert segmentation.GetSegmentation().GetSegment(segment_id) is None  # before the first run: no segment
    history.restore_segment_state(scene, steps.redo(capture))
    np.testing.assert_array_equal(bridge.read_segment(segmentation, segment_id, geometry), first)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"


def closed_surface_segmentation(scene, centre_ras, radius: float):
    """A segmentation kept as closed surfaces, as an RTSTRUCT or a model imported as a segment is."""
    bridge.register_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    node.GetSegmentation().SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre_ras)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    return node, node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "lesion", [1.0, 0.0, 0.0])


def sphere_mask(geometry: Geometry, centre_ras, radius: float) -> np.ndarray:
    kji = np.argwhere(np.ones(geometry.shape_kji, bool))
    inside = np.linalg.norm(geometry.ijk_to_ras(kji[:, ::-1]) - np.asarray(centre_ras), axis=1) <= radius
    return inside.reshape(geometry.shape_kji)


def test_a_segment_kept_as_a_closed_surface_reads_as_its_voxels(scene):
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), (24, 24, 24))
    centre = geometry.ijk_to_ras([[12.0, 11.0, 12.0]])[0]
    segmentation, lesion = closed_surface_segmentation(scene, centre, 6.0)
    read, expected = bridge.read_segment(segmentation, lesion, geometry), sphere_mask(geometry, centre, 6.0)
    assert (read & expected).sum() > 0.9 * expected.sum() and (read & ~expected).sum() < 0.1 * expected.sum()
    assert segmentation.GetSegmentation().GetSourceRepresentationName() == "Closed surface", "reading leaves it as it is"


def test_writing_into_a_closed_surface_segmentation_converts_it_and_keeps_its_segments(scene):
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), (24, 24, 24))
    centre = geometry.ijk_to_ras([[12.0, 11.0, 12.0]])[0]
    segmentation, lesion = closed_surface_segmentation(scene, centre, 6.0)
    mask = np.zeros(geometry.shape_kji, bool)
    mask[2:6, 3:9, 4:10] = True
    liver = bridge.write_segment(segmentation, mask, geometry, "liver")
    converted = segmentation.GetSegmentation()
    assert converted.GetSourceRepresentationName() == slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    assert converted.ContainsRepresentation("Closed surface"), "the surface it had is kept, made from the labelmaps"
    assert [converted.GetNthSegment(i).GetName() for i in range(converted.GetNumberOfSegments())] == ["lesion", "liver"]
    np.testing.assert_array_equal(bridge.read_segment(segmentation, liver, geometry), mask)
    read, expected = bridge.read_segment(segmentation, lesion, geometry), sphere_mask(geometry, centre, 6.0)
    assert (read & expected).sum() > 0.9 * expected.sum() and (read & ~expected).sum() < 0.1 * expected.sum()


def test_packed_masks_unpack_exactly_and_stay_small():
    geometry = GEOMETRIES["oblique-anisotropic"]
    mask = ellipsoid(geometry.shape_kji, (6, 10, 9), (3, 4, 4))
    packed = PackedMask.pack(mask)
    np.testing.assert_array_equal(packed.unpack(), mask)
    assert packed.bits.nbytes < mask.size / 8
    np.testing.assert_array_equal(PackedMask.pack(np.zeros((3, 4, 5), bool)).unpack(), np.zeros((3, 4, 5), bool))


def test_a_new_edit_drops_the_redo_branch_and_the_history_is_bounded():
    history = EditHistory(limit=3)
    for state in range(5):
        history.record(state)
    assert history.undo(lambda state: "current") == 4
    history.record(9)
    assert not history.can_redo
    undone = [history.undo(lambda state: None) for _ in range(3)]
    assert undone == [9, 3, 2] and not history.can_undo
