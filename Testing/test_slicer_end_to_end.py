"""End to end on a real case, the way the Widget drives the Logic: three slice boxes placed by two
clicks each on slice views, Segment, a positive and a negative correction click, Undo, Redo, bank the
segment, Batch over two more subjects; a segment drawn beforehand must come out byte-identical.
Shipped weights, validation hippocampi from ../shared/data (skipped when absent), CPU, under a minute."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "WeakICLSegment"))

from conftest import application_scene, require_shared_data  # noqa: E402
from weakicl.simulation import corrective_click, slice_boxes  # noqa: E402
from WeakICLSegmentLib import mrml_bridge as bridge  # noqa: E402

import WeakICLSegment as module  # noqa: E402

Role = bridge.PromptRole
TARGET, OTHERS = "hippocampus_326", ("hippocampus_327", "hippocampus_328")
LABEL = 1  # hippocampus_anterior


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def load(scene, manifest: dict, root: Path, case_id: str):
    from weakicl.volume import read_label_map, read_volume

    (case,) = [c for c in manifest["cases"] if c["id"] == case_id]
    volume = read_volume(root / case["image"], case["modality"])
    return bridge.volume_node_from_volume(scene, volume, case_id), read_label_map(root / case["label"], volume.geometry) == LABEL


def slice_view_of(scene, geometry, normal_axis: int):
    """A slice view in the volume's own axes (as Slicer shows a volume's acquired slices), mouse on it."""
    axes = geometry.ijk_to_ras_matrix()[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    in_plane = [a for a in range(3) if a != normal_axis]
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, 0], slice_to_ras[:3, 1] = axes[:, in_plane[0]], axes[:, in_plane[1]]
    slice_to_ras[:3, 2] = np.cross(slice_to_ras[:3, 0], slice_to_ras[:3, 1])
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.GetSliceToRAS().DeepCopy(bridge.vtk_matrix(slice_to_ras))
    node.UpdateMatrices()
    scene.GetFirstNodeByClass("vtkMRMLCrosshairNode").SetCursorPositionXYZ([5.0, 5.0, 0.0], node)


def segment_bytes(segmentation, segment_id: str, geometry) -> tuple:
    """A segment as stored: its voxels on the target grid, name and colour (Slicer may keep several
    segments on one shared labelmap layer, whose extent grows as others are added)."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    return bridge.read_segment(segmentation, segment_id, geometry).tobytes(), segment.GetName(), tuple(segment.GetColor())


def test_three_slice_boxes_clicks_undo_redo_bank_and_batch_on_real_hippocampi():
    import json

    from weakicl.weights import default_weights_path

    root = require_shared_data()
    if not default_weights_path().is_file():
        pytest.skip("no shipped weights in model_weights/")
    manifest = json.loads((root / "manifest.json").read_text())
    start = time.perf_counter()
    scene = application_scene(crosshair=True)
    logic = module.WeakICLSegmentLogic(scene)
    target, truth = load(scene, manifest, root, TARGET)
    geometry = bridge.geometry_from_volume_node(target)

    # a segment drawn by hand beforehand, in the output segmentation
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # the selector's "Create new"
    drawn = np.zeros(geometry.shape_kji, dtype=bool)
    drawn[2:6, 3:9, 4:12] = True
    drawn_id = bridge.write_segment(output, drawn, geometry, "marker")
    drawn_before = segment_bytes(output, drawn_id, geometry)

    # three slice boxes, each by two clicks on a slice view (Box button, click, click)
    slice_view_of(scene, geometry, normal_axis=2)
    for box in slice_boxes(truth).boxes:
        roi = logic.placePrompt(Role.CONTEXT_BOX, target)
        for corner in (box.lo_ijk, box.hi_ijk):
            roi.AddControlPointWorld(*geometry.ijk_to_ras([corner])[0])
    assert all("slice K=" in entry.label for entry in logic.contextEntries())

    device = "cpu"
    segmented = logic.run(logic.prepareSegment(target, output, "hippocampus", device=device))
    segment_id = segmented.segmentId
    mask = bridge.read_segment(output, segment_id, geometry)
    first = dice(mask, truth)
    assert first >= 0.75, f"Dice after Segment {first:.3f}"

    scores = [first]
    for positive in (True, False):
        point = corrective_click(mask, truth)
        if point is None or point.positive != positive:  # the field's click: the largest error of that side
            errors = (truth & ~mask) if positive else (mask & ~truth)
            k, j, i = np.argwhere(errors)[len(np.argwhere(errors)) // 2]
            point_ijk = (float(i), float(j), float(k))
        else:
            point_ijk = point.ijk
        role = Role.CORRECTION_POSITIVE if positive else Role.CORRECTION_NEGATIVE
        logic.placePrompt(role, target).AddControlPointWorld(*geometry.ijk_to_ras([point_ijk])[0])
        logic.run(logic.prepareRefine(target, device=device))
        mask = bridge.read_segment(output, segment_id, geometry)
        voxel = tuple(int(round(c)) for c in point_ijk[::-1])
        assert mask[voxel] == positive, f"the {'positive' if positive else 'negative'} click's voxel is on its side"
        scores.append(dice(mask, truth))
        # a click on a low-contrast T1 border may let the geodesic competition claim a little background
        # around it (this case: 0.843 -> 0.832; over 100 validation hippocampi 5 clicks gain +0.003)
        assert scores[-1] >= scores[-2] - 0.02, f"Dice dropped after a click: {scores}"

    after_clicks = mask.copy()
    logic.undo()
    undone = bridge.read_segment(output, segment_id, geometry)
    assert not np.array_equal(undone, after_clicks)
    logic.redo()
    np.testing.assert_array_equal(bridge.read_segment(output, segment_id, geometry), after_clicks)

    bank = [logic.bankEntryOfActiveSegment(target)]
    others = [load(scene, manifest, root, case_id) for case_id in OTHERS]
    batch = logic.run(logic.prepareBatchVolumes([node for node, _ in others], "hippocampus", bank, device=device))
    for (node, other_truth), segmentation in zip(others, batch.segmentationNodes):
        other_geometry = bridge.geometry_from_volume_node(node)
        score = dice(bridge.read_segment(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), other_geometry), other_truth)
        assert score >= 0.6, f"batch Dice on {node.GetName()}: {score:.3f}"

    assert segment_bytes(output, drawn_id, geometry) == drawn_before, "the segment drawn beforehand is untouched"
    np.testing.assert_array_equal(bridge.read_segment(output, drawn_id, geometry), drawn)
    assert time.perf_counter() - start < 60
