"""The Slicer module without the application: WeakICLSegment.py imports with pip's slicer-core, and its
Logic segments, corrects, undoes, banks and batches on a scene of its own (tiny random network, CPU)."""

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "WeakICLSegment"))

from conftest import application_scene, ellipsoid, oblique_geometry  # noqa: E402
from weakicl.errors import InputError  # noqa: E402
from weakicl.prompts import Box  # noqa: E402
from weakicl.session import Segmenter  # noqa: E402
from weakicl.simulation import slice_boxes  # noqa: E402
from weakicl.volume import Volume, read_label_map, write_mask  # noqa: E402
from WeakICLSegmentLib import mrml_bridge as bridge  # noqa: E402
from WeakICLSegmentLib import synthetic_study  # noqa: E402
from WeakICLSegmentLib.batch import image_files, output_path  # noqa: E402
from weakicl.batch import image_stem  # noqa: E402

import WeakICLSegment as module  # noqa: E402

Role = bridge.PromptRole


@pytest.fixture()
def scene():
    return application_scene()


@pytest.fixture()
def logic(scene, tiny_model):
    return module.WeakICLSegmentLogic(scene, lambda device: Segmenter(model=tiny_model, device="cpu"))


@pytest.fixture()
def study(scene):
    """A volume with an ellipsoid and context boxes on three of its slices."""
    geometry = oblique_geometry()
    truth = ellipsoid(geometry.shape_kji, (6, 10, 9), (4, 6, 5))
    image = (100 * truth + np.random.default_rng(1).normal(0, 10, truth.shape)).astype(np.float32)
    volume_node = bridge.volume_node_from_volume(scene, Volume(image, geometry, "MR"), "CT")
    for box in slice_boxes(truth).boxes:
        bridge.set_roi_box(bridge.create_prompt_node(scene, Role.CONTEXT_BOX, volume_node), box, geometry)
    return volume_node, geometry, truth


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def test_segment_writes_a_new_named_segment_on_the_target_grid(logic, study):
    volume_node, geometry, _ = study
    segmentation = logic.createSegmentation(volume_node)
    result = logic.segment(volume_node, segmentation, "liver")
    assert segment_names(segmentation) == ["liver"] and result.device == "CPU" and result.seconds > 0
    mask = bridge.read_segment(segmentation, result.segmentId, geometry)
    assert mask.shape == geometry.shape_kji
    assert logic.activeSegment().segmentId == result.segmentId


def test_second_segment_is_added_and_undo_redo_walk_the_steps(logic, scene, study):
    volume_node, geometry, _ = study
    segmentation = logic.createSegmentation(volume_node)
    first = logic.segment(volume_node, segmentation, "liver")
    first_mask = bridge.read_segment(segmentation, first.segmentId, geometry)
    clicks = logic.placePrompt(Role.CORRECTION_POSITIVE, volume_node)
    clicks.AddControlPoint(*geometry.ijk_to_ras([[9, 10, 6]])[0])
    second = logic.segment(volume_node, segmentation, "liver")
    assert segment_names(segmentation) == ["liver", "liver 2"]
    assert clicks.GetNumberOfControlPoints() == 0  # a new segment starts without the old corrections
    np.testing.assert_array_equal(bridge.read_segment(segmentation, first.segmentId, geometry), first_mask)

    logic.undo()
    assert segment_names(segmentation) == ["liver"] and clicks.GetNumberOfControlPoints() == 1
    assert logic.activeSegment().segmentId == first.segmentId
    logic.redo()
    assert segment_names(segmentation) == ["liver", "liver 2"] and clicks.GetNumberOfControlPoints() == 0
    assert logic.activeSegment().segmentId == second.segmentId
    logic.undo()
    logic.undo()
    assert segment_names(segmentation) == [] and not logic.history.can_undo


def test_refine_reuses_the_encoded_context_updates_the_segment_in_place_and_is_undoable(logic, study):
    volume_node, geometry, _ = study
    segmentation = logic.createSegmentation(volume_node)
    result = logic.segment(volume_node, segmentation, "liver")
    before = bridge.read_segment(segmentation, result.segmentId, geometry)
    logic.placePrompt(Role.CORRECTION_NEGATIVE, volume_node).AddControlPoint(*geometry.ijk_to_ras([[2, 3, 2]])[0])
    messages = []
    refined = logic.refine(progress=lambda fraction, message: messages.append(message))
    assert refined.segmentId == result.segmentId and segment_names(segmentation) == ["liver"]
    assert messages and not any("encoding context" in m for m in messages)  # the context was encoded once
    logic.undo()
    np.testing.assert_array_equal(bridge.read_segment(segmentation, result.segmentId, geometry), before)


def test_refine_before_segment_says_what_to_do(logic):
    with pytest.raises(InputError, match="Segment first"):
        logic.refine()


def test_segment_without_context_says_what_to_draw(logic, scene):
    volume_node = bridge.volume_node_from_volume(scene, Volume(np.zeros((4, 5, 6), np.float32), oblique_geometry((4, 5, 6))), "empty")
    with pytest.raises(InputError, match="draw a box"):
        logic.segment(volume_node, logic.createSegmentation(volume_node), "liver")


def test_placing_enters_place_mode_and_reuses_an_unplaced_box(logic, scene, study):
    volume_node, geometry, _ = study
    roi = logic.placePrompt(Role.CORRECTION_BOX, volume_node)
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place and not interaction.GetPlaceModePersistence()
    assert scene.GetNodeByID("vtkMRMLSelectionNodeSingleton").GetActivePlaceNodeID() == roi.GetID()
    assert logic.placePrompt(Role.CORRECTION_BOX, volume_node) is roi
    bridge.set_roi_box(roi, Box((8, 9, 6), (10, 11, 6)), geometry)
    assert logic.placePrompt(Role.CORRECTION_BOX, volume_node) is not roi
    points = logic.placePrompt(Role.CONTEXT_NEGATIVE, volume_node)
    assert interaction.GetPlaceModePersistence() and logic.placePrompt(Role.CONTEXT_NEGATIVE, volume_node) is points


def test_context_list_names_each_box_and_deletes_entries(logic, study):
    entries = logic.contextEntries()
    assert len(entries) == 3 and all("Context box on CT: slice K=" in entry.label for entry in entries)
    logic.removePromptNodes([entries[0].nodeId])
    assert len(logic.contextEntries()) == 2


def test_bank_entry_becomes_dense_context(logic, study):
    volume_node, geometry, _ = study
    segmentation = logic.createSegmentation(volume_node)
    logic.segment(volume_node, segmentation, "liver")
    entry = logic.bankEntryOfActiveSegment()
    assert logic.describeBankEntry(entry) == "liver on CT"
    items = logic.contextItems([entry])
    assert len(items) == 2 and items[1][1].shape == geometry.shape_kji
    segmentation.GetSegmentation().RemoveAllSegments()  # the original goes: the bank keeps its snapshot
    np.testing.assert_array_equal(logic.contextItems([entry])[1][1], items[1][1])
    entry[1].GetSegmentation().RemoveAllSegments()
    with pytest.raises(InputError, match="clear the bank"):
        logic.contextItems([entry])


def test_batch_over_scene_volumes_adds_one_segmentation_each_and_saves_them(logic, scene, study, tmp_path):
    volume_node, _, _ = study
    others = [bridge.volume_node_from_volume(scene, bridge.volume_from_node(volume_node), f"follow-up {i}") for i in (1, 2)]
    assert logic.otherVolumes(volume_node) == (others, [])
    reports = []
    nodes = logic.batchVolumes(others, "liver", folder=tmp_path, progress=lambda f, m: reports.append(f)).segmentationNodes
    assert [segment_names(node) for node in nodes] == [["liver"], ["liver"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["follow-up 1 liver.seg.nrrd", "follow-up 2 liver.seg.nrrd"]
    assert reports == sorted(reports) and reports[-1] <= 1.0


def test_batch_starts_each_volume_from_the_context_registered_onto_it_unless_told_not_to(logic, scene, study):
    volume_node, geometry, truth = study
    follow_up = bridge.volume_node_from_volume(scene, bridge.volume_from_node(volume_node), "follow-up")
    masks = []
    for align in (True, False):
        (node,) = logic.batchVolumes([follow_up], "liver", alignContext=align).segmentationNodes
        masks.append(bridge.read_segment(node, node.GetSegmentation().GetNthSegmentID(0), geometry))
    aligned, plain = masks
    assert not np.array_equal(aligned, plain)
    between_boxes = slice(5, 8)  # the context boxes lie on slices 4, 6 and 8 of the structure's k extent
    assert (aligned & truth)[between_boxes].sum() > 0.8 * truth[between_boxes].sum()  # even an untrained network starts there


def test_batch_over_files_writes_results_next_to_them(logic, study, tmp_path):
    volume_node, geometry, _ = study
    for name in ("a.nii.gz", "b.nrrd"):
        write_mask(tmp_path / name, bridge.volume_from_node(volume_node).array > 50, geometry, ["image"])
    written = logic.batchFiles(image_files(tmp_path), "liver")
    assert [p.name for p in written] == ["a liver.seg.nrrd", "b liver.seg.nrrd"]
    assert read_label_map(written[0], geometry).shape == geometry.shape_kji
    assert [p.name for p in image_files(tmp_path)] == ["a.nii.gz", "b.nrrd"]  # results are not inputs next time


def test_batch_paths_never_overwrite(tmp_path):
    assert image_stem("ct.nii.gz") == "ct" and image_stem("scan") == "scan"
    first = output_path("ct.nii.gz", "liver", tmp_path)
    first.write_text("")
    assert first.name == "ct liver.seg.nrrd" and output_path("ct.nii.gz", "liver", tmp_path).name == "ct liver 2.seg.nrrd"


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setitem(module.REQUIRED_PACKAGES, "surely_not_installed_pkg", "surely_not_installed_pkg")
    logic = module.WeakICLSegmentLogic(slicer.vtkMRMLScene())
    assert logic.missingPackages() == ["surely_not_installed_pkg"]
    with pytest.raises(InputError, match="Install dependencies"):
        logic.segmenter("cpu")


def test_self_test_scenario_reaches_its_dice_with_the_shipped_weights():
    """The module self-test's path (ellipsoid, boxes on 3 slices, Segment) headless, shipped weights, CPU."""
    from weakicl.weights import default_weights_path

    if not default_weights_path().is_file():
        pytest.skip("no shipped weights in model_weights/")
    dice, result = module.segmentEllipsoid(module.WeakICLSegmentLogic(slicer.vtkMRMLScene()), device="cpu")
    assert dice >= synthetic_study.DICE_THRESHOLD, f"Dice {dice:.3f} in {result.seconds:.1f} s"

