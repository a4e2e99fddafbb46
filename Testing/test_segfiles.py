"""Slicer segmentation files through slicerio: what the tool writes opens in slicerio with names, colours,
terminology and layers for overlapping classes; what Slicer writes reads back as a named label image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import oblique_geometry
from weakicl.context import context_names, load_context
from weakicl.segfiles import read_segmentation
from weakicl.volume import SEGMENT_COLOURS, Volume, read_label_map, read_volume, write_mask, write_volume

slicerio = pytest.importorskip("slicerio")


def two_overlapping_masks(geometry):
    masks = np.zeros((2,) + geometry.shape_kji, dtype=bool)
    masks[0, 2:8, 3:9, 4:8] = True
    masks[1, 5:10, 3:9, 4:8] = True  # overlaps the first in slices 5-7
    return masks


def test_seg_nrrd_opens_in_slicerio_with_names_colours_terminology_and_layers(tmp_path):
    geometry = oblique_geometry()
    masks = two_overlapping_masks(geometry)
    record = {"tool": {"name": "weakicl", "version": "test"}}
    path = write_mask(tmp_path / "out.seg.nrrd", masks, geometry, ["liver", "liver tumour"], values=[1, 2], provenance=record)

    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == ["liver", "liver tumour"]
    assert np.allclose(segments[1]["color"], SEGMENT_COLOURS[1])
    assert segments[0]["terminology"]["category"] == ["SCT", "85756007", "Tissue"]
    assert segments[0]["terminology"]["type"] == ["SCT", "85756007", "Tissue"]
    assert segmentation["voxels"].ndim == 4 and {s["layer"] for s in segments} == {0, 1}  # overlap kept, not flattened
    assert np.allclose(segmentation["ijkToLPS"], geometry.ijk_to_lps_matrix())
    for index, segment in enumerate(segments):
        assert np.array_equal(slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0), masks[index])
    assert json.loads(segmentation["WeakICL_Provenance"])["tool"]["version"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]


def test_seg_nrrd_reads_back_as_segments_and_as_a_named_label_image(tmp_path):
    geometry = oblique_geometry()
    masks = two_overlapping_masks(geometry)
    path = write_mask(tmp_path / "ref.seg.nrrd", masks, geometry, ["liver", "tumour"], values=[5, 29])
    segments = read_segmentation(path)
    assert segments.geometry.same_grid(geometry) and segments.names == ["liver", "tumour"] and segments.values == [5, 29]
    assert np.array_equal(segments.masks, masks)
    labels = read_label_map(path, geometry)  # flattened: the first segment wins where they overlap
    assert set(np.unique(labels)) == {0, 5, 29} and np.array_equal(labels == 5, masks[0])

    image = write_volume(tmp_path / "ref.nii.gz", Volume(masks[0].astype(np.float32), geometry))
    items = load_context([(image, path)])
    assert np.array_equal(items[0][1], labels) and context_names([(image, path)]) == {5: "liver", 29: "tumour"}


def test_a_slicer_style_seg_nrrd_with_shared_label_values_across_layers_is_renumbered(tmp_path):
    geometry = oblique_geometry()
    masks = two_overlapping_masks(geometry)
    segmentation = slicerio.create_segmentation(geometry.shape_ijk, geometry.ijk_to_lps_matrix())
    for name, mask in zip(("a", "b"), masks):
        slicerio.add_segment(segmentation, mask.transpose(2, 1, 0), {"name": name})
    slicerio.write_segmentation(str(tmp_path / "slicer.seg.nrrd"), segmentation)
    segments = read_segmentation(tmp_path / "slicer.seg.nrrd")
    assert segments.values == [1, 2] and segments.names == ["a", "b"] and np.array_equal(segments.masks, masks)


def test_mha_output_keeps_the_grid(tmp_path):
    geometry = oblique_geometry()
    masks = two_overlapping_masks(geometry)[:1]
    path = write_mask(tmp_path / "out.mha", masks, geometry, ["liver"])
    assert read_volume(path).geometry.same_grid(geometry) and np.array_equal(read_label_map(path, geometry) == 1, masks[0])


def test_slicer_itself_reads_the_layers_names_colours_and_terminology(tmp_path):
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    geometry = oblique_geometry()
    path = write_mask(tmp_path / "out.seg.nrrd", two_overlapping_masks(geometry), geometry, ["liver", "liver tumour"])
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 2
    segment = segmentation.GetNthSegment(1)
    terminology = vtk.mutable("")
    segment.GetTag("TerminologyEntry", terminology)
    assert segment.GetName() == "liver tumour" and np.allclose(segment.GetColor(), SEGMENT_COLOURS[1])
    assert "SCT^85756007^Tissue" in str(terminology)
