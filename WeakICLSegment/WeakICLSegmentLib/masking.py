"""Where the module may write a segment: the Segment Editor's masking settings, other segments, and
edits made by hand since the module last wrote.

The module never changes another segment. The Segment Editor's settings for the segmentation are
honoured the way its effects do: the *editable area* (everywhere, inside/outside all or visible
segments, inside one segment), the *editable intensity range* of its source volume (which need not be
the target), and *modify other
segments*: where that would overwrite another segment (all, or the visible ones), the module leaves
those voxels out of its own segment instead, since it never changes the other one; with "allow overlap"
the segments may overlap. Without a Segment Editor node for the segmentation, everything is editable and
overlap is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import slicer
from weakicl.volume import Geometry

from . import mrml_bridge as bridge

EDITOR_CLASS = "vtkMRMLSegmentEditorNode"


@dataclass(frozen=True)
class EditSettings:
    mask_mode: int
    mask_segment_id: str
    overwrite_mode: int
    intensity_range: Optional[tuple[float, float]]
    source_volume_id: str = ""  # the volume the intensity range is of ("": the target's)

    @classmethod
    def default(cls) -> EditSettings:
        return cls(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere, "", slicer.vtkMRMLSegmentEditorNode.OverwriteNone, None)


def edit_settings(scene, segmentation_node) -> EditSettings:
    """The settings of the Segment Editor node editing this segmentation (the module's defaults if none)."""
    nodes = scene.GetNodesByClass(EDITOR_CLASS)
    for index in range(nodes.GetNumberOfItems()):
        editor = nodes.GetItemAsObject(index)
        edited = editor.GetSegmentationNode()
        if edited is None or edited.GetID() != segmentation_node.GetID():
            continue
        # 5.2+ call it the source volume; 5.0/5.1 the master volume
        enabled = getattr(editor, "GetSourceVolumeIntensityMask", None) or editor.GetMasterVolumeIntensityMask
        span = getattr(editor, "GetSourceVolumeIntensityMaskRange", None) or editor.GetMasterVolumeIntensityMaskRange
        source = (getattr(editor, "GetSourceVolumeNode", None) or editor.GetMasterVolumeNode)()
        return EditSettings(editor.GetMaskMode(), editor.GetMaskSegmentID() or "", editor.GetOverwriteMode(),
                            tuple(span()) if enabled() else None, source.GetID() if source is not None else "")
    return EditSettings.default()


def writable(segmentation_node, segment_id: str, geometry: Geometry, settings: EditSettings,
             image: np.ndarray, image_volume_id: str, region: Optional[tuple] = None) -> np.ndarray:
    """Bool (K, J, I): where the segment `segment_id` may take new values, on `geometry`, the grid of
    `image` (the voxels of the volume node `image_volume_id`); with `region` (slices k, j, i) only in
    that block, and only the other segments' voxels there are read. The editable intensity range is of
    the Segment Editor's source volume: another volume than `image`'s is resampled onto `geometry`."""
    region = region or (slice(None),) * 3
    shape = tuple(len(range(*block.indices(size))) for block, size in zip(region, geometry.shape_kji))  # no whole-volume array
    segmentation_node_class = slicer.vtkMRMLSegmentationNode
    editor_class = slicer.vtkMRMLSegmentEditorNode
    others = [sid for sid in bridge.segment_ids(segmentation_node) if sid != segment_id]
    display = segmentation_node.GetDisplayNode()
    visible = [sid for sid in others if display is None or display.GetSegmentVisibility(sid)]

    def union(ids: list[str]) -> np.ndarray:
        combined = np.zeros(shape, dtype=bool)
        for sid in ids:
            combined |= bridge.read_segment(segmentation_node, sid, geometry, region)
        return combined

    mode = settings.mask_mode
    allowed = np.ones(shape, dtype=bool)
    if mode == segmentation_node_class.EditAllowedInsideAllSegments:
        allowed = union(others)
    elif mode == segmentation_node_class.EditAllowedInsideVisibleSegments:
        allowed = union(visible)
    elif mode == segmentation_node_class.EditAllowedOutsideAllSegments:
        allowed = ~union(others)
    elif mode == segmentation_node_class.EditAllowedOutsideVisibleSegments:
        allowed = ~union(visible)
    elif mode == segmentation_node_class.EditAllowedInsideSingleSegment and settings.mask_segment_id:
        allowed = bridge.read_segment(segmentation_node, settings.mask_segment_id, geometry, region)
    if settings.overwrite_mode == editor_class.OverwriteAllSegments:
        allowed &= ~union(others)
    elif settings.overwrite_mode == editor_class.OverwriteVisibleSegments:
        allowed &= ~union(visible)
    if settings.intensity_range is not None:
        if settings.source_volume_id and settings.source_volume_id != image_volume_id:
            image = bridge.volume_on_grid(segmentation_node.GetScene().GetNodeByID(settings.source_volume_id), geometry)
        low, high = settings.intensity_range
        allowed &= (image[region] >= low) & (image[region] <= high)
    return allowed


def compose(prediction: np.ndarray, current: np.ndarray, allowed: np.ndarray, last_written: Optional[np.ndarray]) -> np.ndarray:
    """The segment to write: the prediction where writable, the current segment elsewhere, and the
    current segment wherever it differs from what the module last wrote (a hand edit since)."""
    result = np.where(allowed, prediction, current)
    if last_written is not None and last_written.shape == current.shape:
        edited = current != last_written
        result[edited] = current[edited]
    return result
