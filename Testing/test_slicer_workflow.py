"""The module's Logic on the paths the desktop application really takes (issue 14): a segmentation made
by the selector's "Create new", clicks arriving while a refine runs, corrections after changing the
target, volumes the engine cannot take, bank snapshots, the Segment Editor's masking and edits, undo
after such edits, and the dependency commands. Real MRML (pip's slicer-core), tiny network, CPU."""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "WeakICLSegment"))

from conftest import application_scene, ellipsoid  # noqa: E402
from weakicl.errors import Cancelled, InputError  # noqa: E402
from weakicl.session import Segmenter  # noqa: E402
from weakicl.simulation import slice_boxes  # noqa: E402
from weakicl.volume import Geometry, Volume  # noqa: E402
from WeakICLSegmentLib import dependencies  # noqa: E402
from WeakICLSegmentLib import mrml_bridge as bridge  # noqa: E402
from WeakICLSegmentLib.corrections import RefineQueue  # noqa: E402

import WeakICLSegment as module  # noqa: E402

Role = bridge.PromptRole
GEOMETRY = Geometry((1.0, 1.0, 1.5), (-30.0, -30.0, -20.0), np.eye(3), (36, 64, 64))
TRUTH = ellipsoid(GEOMETRY.shape_kji, (18, 30, 32), (8, 12, 14))


@pytest.fixture()
def scene():
    scene = application_scene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())  # the Segment Editor module registers it
    return scene


@pytest.fixture()
def logic(scene, tiny_model):
    return module.WeakICLSegmentLogic(scene, lambda device: Segmenter(model=tiny_model, device="cpu"))


def add_volume(scene, name: str = "CT", boxes: bool = True):
    image = (60 + 80 * TRUTH + np.random.default_rng(len(name)).normal(0, 8, TRUTH.shape)).astype(np.float32)
    node = bridge.volume_node_from_volume(scene, Volume(image, GEOMETRY, "MR"), name)
    if boxes:
        for box in slice_boxes(TRUTH).boxes:
            bridge.set_roi_box(bridge.create_prompt_node(scene, Role.CONTEXT_BOX, node), box, GEOMETRY)
    return node


def click(logic, volume, ijk, positive: bool = True):
    points = logic.placePrompt(Role.CORRECTION_POSITIVE if positive else Role.CORRECTION_NEGATIVE, volume)
    points.AddControlPointWorld(*GEOMETRY.ijk_to_ras([ijk])[0])
    return points


def mask_of(node, segment_id: str) -> np.ndarray:
    return bridge.read_segment(node, segment_id, GEOMETRY)


def region_size(region) -> int:
    return int(np.prod([s.stop - s.start for s in region]))


# --- defect 2: a segmentation made by the node selector ------------------------------------------


def test_segment_into_a_node_made_by_the_selectors_create_new(logic, scene):
    volume = add_volume(scene)
    created = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # what qMRMLNodeComboBox::addNode does: no display node
    assert created.GetDisplayNode() is None
    result = logic.segment(volume, created, "liver")
    assert result.segmentationNode is created and created.GetDisplayNode() is not None
    assert created.GetDisplayNode().GetVisibility() and mask_of(created, result.segmentId).any()


# --- defect 8: a failed or cancelled Segment leaves nothing behind --------------------------------


def test_cancelled_or_failed_segment_creates_no_segmentation_node(logic, scene):
    volume = add_volume(scene)

    def cancel(fraction, message):
        raise Cancelled("Segmenting cancelled")

    with pytest.raises(Cancelled):
        logic.segment(volume, None, "liver", progress=cancel)
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    empty = add_volume(scene, "empty", boxes=False)
    logic.removePromptNodes([n.GetID() for n in bridge.prompt_nodes(scene, bridge.CONTEXT_ROLES)])
    with pytest.raises(InputError, match="draw a box"):
        logic.segment(empty, None, "liver")
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


# --- defects 3 and 4: work off the GUI thread, clicks queued and refined around themselves -------


def spy_on_segment(logic, monkeypatch, changed=None):
    """Record what the Logic asks the engine; with `changed`, the engine answers "all foreground,
    recomputed only in `changed`", so that what the Logic writes can be checked."""
    from weakicl.session import Prediction

    segmenter = logic.segmenter("auto")
    real, calls = segmenter.segment, []

    def segment(target, task, target_prompts=None, previous=None, new_prompts=None, **options):
        calls.append(new_prompts)
        prediction = real(target, task, target_prompts, previous, new_prompts, **options)
        if changed is None:
            return prediction
        return Prediction(np.ones_like(prediction.probabilities), prediction.names, changed)

    monkeypatch.setattr(segmenter, "segment", segment)
    return calls


def test_compute_runs_on_a_worker_thread_and_a_click_meanwhile_is_refined_next_around_itself(logic, scene, monkeypatch):
    volume = add_volume(scene)
    logic.segment(volume, None, "liver")
    calls = spy_on_segment(logic, monkeypatch)
    first_click = click(logic, volume, (32, 30, 18))
    queue = RefineQueue()
    assert queue.request()
    job = logic.prepareRefine(volume)
    started, resume, outcome = threading.Event(), threading.Event(), {}

    def progress(fraction, message):
        started.set()
        resume.wait(60)

    worker = threading.Thread(target=lambda: outcome.setdefault("prediction", job.compute(progress)))
    worker.start()
    assert started.wait(60)
    second = click(logic, volume, (40, 44, 18), positive=False)  # placed while the refine runs
    assert not queue.request(), "queued behind the running refine, not dropped"
    resume.set()
    worker.join(60)
    job.apply(outcome["prediction"])
    assert [p.ijk for p in calls[-1].points] == [(32.0, 30.0, 18.0)], "the engine recomputes around the new click only"
    assert queue.finished(), "the queued click is refined next"
    logic.run(logic.prepareRefine(volume))
    assert [(p.ijk, p.positive) for p in calls[-1].points] == [((40.0, 44.0, 18.0), False)]
    assert not queue.finished()

    second.RemoveAllControlPoints()  # deleting a point refines around where it was
    logic.run(logic.prepareRefine(volume))
    assert [p.ijk for p in calls[-1].points] == [(40.0, 44.0, 18.0)]
    assert first_click.GetNumberOfControlPoints() == 1


def test_refine_writes_only_the_region_the_engine_recomputed(logic, scene, monkeypatch):
    volume = add_volume(scene)
    result = logic.segment(volume, None, "liver")
    before = mask_of(result.segmentationNode, result.segmentId)
    changed = (slice(10, 20), slice(20, 40), slice(25, 45))
    spy_on_segment(logic, monkeypatch, changed)
    click(logic, volume, (32, 30, 18))
    refined = logic.refine(volume)
    after = mask_of(result.segmentationNode, result.segmentId)
    assert refined.changedKJI == changed and after[changed].all()
    outside = np.ones(GEOMETRY.shape_kji, dtype=bool)
    outside[changed] = False
    np.testing.assert_array_equal(after[outside], before[outside])


def test_a_refine_reads_the_other_segments_only_where_the_engine_recomputed(logic, scene, monkeypatch):
    volume = add_volume(scene)
    result = logic.segment(volume, None, "liver")
    segmentation = result.segmentationNode
    organs = []
    for n in range(3):  # other organs; with a Segment Editor node, Slicer's default "overwrite all segments" applies
        organ = np.zeros(GEOMETRY.shape_kji, bool)
        organ[12:20, 10 + 16 * n:20 + 16 * n, 20:44] = True
        organs.append((bridge.write_segment(segmentation, organ, GEOMETRY, f"organ {n}"), organ))
    editor_for(scene, segmentation, slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere,
               slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    changed = (slice(10, 20), slice(20, 40), slice(25, 45))
    before = mask_of(segmentation, result.segmentId)
    spy_on_segment(logic, monkeypatch, changed)  # the engine answers "all foreground" in `changed`
    reads = []
    real_read = bridge.read_segment
    monkeypatch.setattr(bridge, "read_segment", lambda node, sid, geometry, region=None: reads.append((sid, region)) or real_read(node, sid, geometry, region))
    click(logic, volume, (32, 30, 18))
    logic.refine(volume)
    organ_ids = {organ_id for organ_id, _ in organs}
    assert {sid for sid, _ in reads} >= organ_ids
    assert all(region == changed for sid, region in reads if sid in organ_ids), "no whole-volume reads per other segment"
    after = mask_of(segmentation, result.segmentId)
    for organ_id, organ in organs:
        np.testing.assert_array_equal(mask_of(segmentation, organ_id), organ)
        assert not (after & organ & ~before)[changed].any()  # overwrite-all still honoured inside the region


class SlicerWrites:
    """Slicer's segmentations logic, every call passed through, noting how many voxels each labelmap
    handed to SetBinaryLabelmapToSegment holds."""

    def __init__(self, real):
        self.real, self.voxels = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def SetBinaryLabelmapToSegment(self, labelmap, *args):
        self.voxels.append(labelmap.GetNumberOfPoints())
        return self.real.SetBinaryLabelmapToSegment(labelmap, *args)


def test_a_refine_hands_slicer_only_its_region_and_leaves_every_other_voxel_and_segment_bit_identical(logic, scene, monkeypatch):
    volume = add_volume(scene)
    segmentation = logic.createSegmentation(volume)
    marker = np.zeros(GEOMETRY.shape_kji, bool)
    marker[2:6, 3:9, 4:12] = True  # drawn first: the liver comes second in its labelmap layer (label value 2)
    others = {bridge.write_segment(segmentation, marker, GEOMETRY, "marker"): marker}
    segment_id = logic.segment(volume, segmentation, "liver").segmentId
    changed = (slice(10, 20), slice(20, 40), slice(25, 45))
    organ = np.zeros(GEOMETRY.shape_kji, bool)
    organ[12:24, 30:50, 20:30] = True  # partly inside the refined region: the liver will overlap it there
    others[bridge.write_segment(segmentation, organ, GEOMETRY, "organ")] = organ
    edited = mask_of(segmentation, segment_id)
    edited[30:33, 50:55, 5:9] = True  # a Segment Editor paint outside the region, kept by the refine
    bridge.write_segment(segmentation, edited, GEOMETRY, "liver", segment_id)
    spy_on_segment(logic, monkeypatch, changed)  # the engine answers "all foreground" in `changed`
    writes = SlicerWrites(slicer.vtkSlicerSegmentationsModuleLogic)
    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", writes)
    click(logic, volume, (32, 30, 18))
    logic.refine(volume)
    assert writes.voxels and set(writes.voxels) == {region_size(changed)}, "only the region is handed to Slicer"
    after = mask_of(segmentation, segment_id)
    outside = np.ones(GEOMETRY.shape_kji, dtype=bool)
    outside[changed] = False
    assert after[changed].all()
    np.testing.assert_array_equal(after[outside], edited[outside])
    for other_id, other in others.items():
        np.testing.assert_array_equal(mask_of(segmentation, other_id), other)
    logic.undo()
    np.testing.assert_array_equal(mask_of(segmentation, segment_id), edited)
    logic.redo()
    np.testing.assert_array_equal(mask_of(segmentation, segment_id), after)
    for other_id, other in others.items():
        np.testing.assert_array_equal(mask_of(segmentation, other_id), other)
    hand = after.copy()
    hand[1, 60, 60] = True  # an edit outside the region after the module's last step
    bridge.write_segment(segmentation, hand, GEOMETRY, "liver", segment_id)
    with pytest.raises(InputError, match="Segment Editor"):
        logic.undo()


def test_a_packed_mask_updated_in_a_region_is_what_packing_the_whole_updated_mask_gives():
    from WeakICLSegmentLib.history import PackedMask

    rng = np.random.default_rng(3)
    for _ in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 9, 3))
        mask = np.zeros(shape, bool)
        lo = rng.integers(0, shape)
        box = tuple(slice(int(a), int(rng.integers(a, n + 1))) for a, n in zip(lo, shape))
        mask[box] = rng.random(mask[box].shape) < rng.choice([0.0, 0.3, 1.0])
        lo = rng.integers(0, shape)
        region = tuple(slice(int(a), int(rng.integers(a, n + 1))) for a, n in zip(lo, shape))
        block = rng.random(mask[region].shape) < rng.choice([0.0, 0.5, 1.0])
        packed = PackedMask.pack(mask)
        np.testing.assert_array_equal(packed.unpack(), mask)
        np.testing.assert_array_equal(packed.unpack(region), mask[region])
        mask[region] = block
        assert packed.with_block(region, block).same_as(PackedMask.pack(mask))


def test_a_refine_finishing_after_the_scene_was_closed_writes_nothing_into_the_next_scene(logic, scene, caplog):
    volume = add_volume(scene)
    logic.segment(volume, None, "liver")
    click(logic, volume, (32, 30, 18))
    job = logic.prepareRefine(volume)
    computed = job.compute(lambda fraction, message: None)
    logic.forgetEdits()  # File > Close Scene while the non-modal refine computes (the Widget's onSceneStartClose)
    scene.Clear(0)
    volume = add_volume(scene)  # the next scene: node IDs start again
    segmentation = logic.createSegmentation(volume)
    with caplog.at_level("INFO"):
        assert job.apply(computed) is None
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert "scene was closed" in caplog.text


def test_a_prepared_job_computes_with_no_scene_left(logic, scene):
    volume = add_volume(scene)
    job = logic.prepareSegment(volume, None, "liver")
    scene.Clear(0)  # the worker thread never reads MRML: everything it needs was read in prepare
    prediction = job.compute(lambda fraction, message: None)
    assert prediction.masks[0].shape == GEOMETRY.shape_kji


# --- defect 5: corrections after changing the target ----------------------------------------------


def test_corrections_refine_the_segment_of_the_target_they_are_drawn_on(logic, scene):
    first_target = add_volume(scene, "CT")
    second_target = add_volume(scene, "follow-up", boxes=False)
    first = logic.segment(first_target, None, "liver")
    (batch_node,) = logic.batchVolumes([second_target], "liver").segmentationNodes
    batch_before = mask_of(batch_node, batch_node.GetSegmentation().GetNthSegmentID(0))
    click(logic, first_target, (32, 30, 18))
    refined = logic.refine(first_target)
    assert refined.segmentationNode is first.segmentationNode and refined.segmentId == first.segmentId
    np.testing.assert_array_equal(mask_of(batch_node, batch_node.GetSegmentation().GetNthSegmentID(0)), batch_before)
    click(logic, second_target, (32, 30, 18))
    assert logic.refine(second_target).segmentationNode is batch_node  # the target's own segment, not the last one
    third = add_volume(scene, "another", boxes=False)
    with pytest.raises(InputError, match="Segment first"):
        logic.refine(third)


# --- defect 9: volumes the engine cannot take ------------------------------------------------------


def _vector_volume(scene, class_name: str, name: str):
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    node.SetAndObserveImageData(image)
    return node


def test_batch_over_the_scene_skips_vector_rgb_dwi_and_label_maps_with_a_message(logic, scene):
    target = add_volume(scene)
    other = add_volume(scene, "follow-up", boxes=False)
    rgb = _vector_volume(scene, "vtkMRMLVectorVolumeNode", "photo")
    dwi = _vector_volume(scene, "vtkMRMLDiffusionWeightedVolumeNode", "dwi")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    volumes, skipped = logic.otherVolumes(target)
    assert volumes == [other]
    assert any("photo" in m and "vector" in m for m in skipped) and any("dwi" in m and "diffusion" in m for m in skipped)
    result = logic.batchVolumes([other, rgb, dwi], "liver")
    assert len(result.segmentationNodes) == 1 and len(result.skipped) == 2


def test_dicom_loading_leaves_label_maps_out_and_can_be_cancelled(logic, scene):
    def load(series):
        (uid,) = series
        if uid == "labels":
            return [scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg").GetID()]
        if uid == "rgb":
            return [_vector_volume(scene, "vtkMRMLVectorVolumeNode", "screenshot").GetID()]
        return [add_volume(scene, uid, boxes=False).GetID()]

    volumes, skipped = logic.loadDicomStudy(["ct", "labels", "rgb"], load)
    assert [v.GetName() for v in volumes] == ["ct"]
    assert any("label map" in m for m in skipped) and any("vector" in m for m in skipped)
    loaded = []

    def cancel_after_first(fraction, message):
        if loaded:
            raise Cancelled("DICOM loading cancelled")
        loaded.append(message)

    with pytest.raises(Cancelled):
        logic.loadDicomStudy(["a", "b", "c"], load, cancel_after_first)
    assert scene.GetFirstNodeByName("b") is None  # stopped before the second series


# --- defect 10: bank entries are snapshots ---------------------------------------------------------


def test_bank_entry_is_a_snapshot_and_refining_never_re_encodes_it(logic, scene, tiny_model, monkeypatch):
    volume = add_volume(scene)
    result = logic.segment(volume, None, "liver")
    entry = logic.bankEntryOfActiveSegment(volume)
    banked = logic.contextItems([entry])[-1][1].copy()
    assert entry[1] is not result.segmentationNode and entry[1].GetHideFromEditors()
    calls = []
    original = tiny_model.encode_task
    monkeypatch.setattr(tiny_model, "encode_task", lambda *a, **k: calls.append(1) or original(*a, **k))
    click(logic, volume, (32, 30, 18))
    logic.refine(volume, bank=[entry])
    encoded = len(calls)
    click(logic, volume, (28, 26, 20), positive=False)
    logic.refine(volume, bank=[entry])
    assert len(calls) == encoded, "the same bank encodes to the same task: cached"
    np.testing.assert_array_equal(logic.contextItems([entry])[-1][1], banked)
    logic.removeBankSnapshots([entry])
    assert not scene.IsNodePresent(entry[1])


# --- defect 11: the Segment Editor's settings and edits are respected ------------------------------


def editor_for(scene, segmentation, mask_mode, overwrite_mode):
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(segmentation)
    editor.SetMaskMode(mask_mode)
    editor.SetOverwriteMode(overwrite_mode)
    return editor


@pytest.mark.parametrize("mask_mode, overwrite_mode, overlap", [
    ("EditAllowedOutsideAllSegments", "OverwriteNone", False),
    ("EditAllowedEverywhere", "OverwriteAllSegments", False),
    ("EditAllowedEverywhere", "OverwriteNone", True),
])
def test_segment_honours_the_editable_area_and_overwrite_setting_and_never_changes_another_segment(
        logic, scene, mask_mode, overwrite_mode, overlap):
    volume = add_volume(scene)
    segmentation = logic.createSegmentation(volume)
    other = ellipsoid(GEOMETRY.shape_kji, (18, 30, 24), (6, 8, 8))  # overlaps the structure's left half
    other_id = bridge.write_segment(segmentation, other, GEOMETRY, "vessel")
    editor_for(scene, segmentation, getattr(slicer.vtkMRMLSegmentationNode, mask_mode),
               getattr(slicer.vtkMRMLSegmentEditorNode, overwrite_mode))
    result = logic.segment(volume, segmentation, "liver")
    mine = mask_of(segmentation, result.segmentId)
    np.testing.assert_array_equal(mask_of(segmentation, other_id), other)
    assert (mine & other).any() == overlap


def test_the_editable_intensity_range_is_of_the_segment_editors_source_volume_when_it_is_not_the_target(logic, scene):
    volume = add_volume(scene)
    segmentation = logic.createSegmentation(volume)
    other_grid = Geometry((1.0, 1.0, 1.5), (-29.5, -30.5, -20.75), np.eye(3), (36, 64, 64))  # another series
    bright_left = np.zeros(other_grid.shape_kji, np.float32)
    bright_left[:, :, :32] = 500.0  # in range on its left half only; the target is in range on the structure
    source = bridge.volume_node_from_volume(scene, Volume(bright_left, other_grid, "MR"), "T1")
    editor = editor_for(scene, segmentation, slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere,
                        slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor.SetAndObserveSourceVolumeNode(source)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(100.0, 1000.0)
    mine = mask_of(segmentation, logic.segment(volume, segmentation, "liver").segmentId)
    in_range = bridge.volume_on_grid(source, GEOMETRY) >= 100.0
    assert mine.any() and not (mine & ~in_range).any()
    assert not mine[:, :, 33:].any(), "the source volume's range, on the target's grid, bounds the segment"


def test_refine_keeps_hand_edits_and_undo_refuses_to_restore_over_them(logic, scene):
    volume = add_volume(scene)
    segmentation = logic.segment(volume, None, "liver").segmentationNode
    segment_id = logic.activeSegment(volume).segmentId
    click(logic, volume, (32, 30, 18))
    logic.refine(volume)
    edited = mask_of(segmentation, segment_id)
    edited[18, 28:33, 30:35] = ~edited[18, 28:33, 30:35]  # a Segment Editor paint/erase inside the refined region
    bridge.write_segment(segmentation, edited, GEOMETRY, "liver", segment_id)
    click(logic, volume, (34, 31, 18))
    logic.refine(volume)
    after = mask_of(segmentation, segment_id)
    np.testing.assert_array_equal(after[18, 28:33, 30:35], edited[18, 28:33, 30:35])
    hand = after.copy()
    hand[5, 5, 5] = True  # an edit after the module's last step
    bridge.write_segment(segmentation, hand, GEOMETRY, "liver", segment_id)
    with pytest.raises(InputError, match="Segment Editor"):
        logic.undo()
    np.testing.assert_array_equal(mask_of(segmentation, segment_id), hand)
    assert not logic.history.can_undo


@pytest.mark.parametrize("own_grid", [
    Geometry((0.4, 0.4, 0.4), (-30.0, -30.0, -20.0), np.eye(3), (130, 160, 160)),  # the Segment Editor's "Specify geometry"
    Geometry((1.3, 1.3, 1.3), (-29.6, -29.7, -19.8), np.eye(3), (44, 52, 52)),  # made on another series
], ids=["oversampled", "another-series"])
def test_segment_and_refine_on_a_segmentation_of_another_grid_leave_its_other_segments_exactly_as_they_were(
        logic, scene, own_grid):
    volume = add_volume(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    other = ellipsoid(own_grid.shape_kji, np.array(own_grid.shape_kji) / 2, np.array(own_grid.shape_kji) / 8)
    other_id = bridge.write_segment(segmentation, other, own_grid, "vessel")  # sets the segmentation's reference geometry
    segment_id = logic.segment(volume, segmentation, "liver").segmentId
    np.testing.assert_array_equal(bridge.read_segment(segmentation, other_id, own_grid), other)
    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    np.testing.assert_allclose(labelmap.GetSpacing(), own_grid.spacing)  # written on the segmentation's own lattice
    click(logic, volume, (32, 30, 18))
    logic.refine(volume)
    np.testing.assert_array_equal(bridge.read_segment(segmentation, other_id, own_grid), other)
    logic.undo()  # the round trip through the segmentation's lattice is not taken for a hand edit
    logic.undo()
    assert segmentation.GetSegmentation().GetSegment(segment_id) is None
    np.testing.assert_array_equal(bridge.read_segment(segmentation, other_id, own_grid), other)


# --- defects 6 and 12: dependency commands, ctest registration -------------------------------------


def test_install_commands_run_in_pythonslicer_inside_the_application_never_in_slicer_itself(monkeypatch):
    monkeypatch.setattr(dependencies.shutil, "which", lambda name: "/opt/Slicer/bin/PythonSlicer" if name == "PythonSlicer" else None)
    assert dependencies.python_launcher() == "/opt/Slicer/bin/PythonSlicer"
    monkeypatch.setattr(dependencies.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="PythonSlicer"):  # never sys.executable: that is the Slicer application
        dependencies.python_launcher()


def test_the_default_target_is_a_volume_the_selector_lists_not_a_label_map(logic, scene):
    assert logic.defaultTargetVolume() is None
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labels.SetAndObserveImageData(bridge.image_data(TRUTH.astype(np.uint8)))
    volume = add_volume(scene, boxes=False)
    assert logic.defaultTargetVolume() is volume


def test_the_module_declares_the_modules_it_uses():
    parent = type("Parent", (), {})()  # the qSlicerScriptedLoadableModule that Slicer's ScriptedLoadableModule keeps
    registered = module.WeakICLSegment.__new__(module.WeakICLSegment)
    registered.parent = parent  # the stand-in base without the application does not keep it
    registered.__init__(parent)
    assert {"Markups", "Segmentations"} <= set(parent.dependencies)


def test_installing_the_other_packages_pins_the_installed_torch():
    command = dependencies.other_packages_command(["monai", "scipy"], "2.4.1+cu121")
    assert command == ["pip", "install", "monai>=1.3", "scipy>=1.10", "torch==2.4.1+cu121"]
    assert dependencies.other_packages_command(["torch"], None) is None
    assert dependencies.torch_commands(True)[-1][0] == "light_the_torch"  # the PyTorch extension's tool
    assert dependencies.torch_commands(False) == [["pip", "install", "torch>=2.2"]]
    assert dependencies.installed_torch_version().split("+")[0].count(".") >= 1


def test_tests_that_need_torch_are_registered_with_ctest_only_when_asked():
    cmake = (Path(__file__).resolve().parent.parent / "WeakICLSegment" / "CMakeLists.txt").read_text()
    guarded = cmake.split("if(BUILD_TESTING AND WeakICLSegment_TESTS_WITH_TORCH)", 1)
    assert len(guarded) == 2 and "slicer_add_python_unittest" not in guarded[0]
    assert "option(WeakICLSegment_TESTS_WITH_TORCH" in cmake and "OFF)" in cmake
