"""The self-test's study: a synthetic ellipsoid with boxes on three of its slices, segmented through the
Logic (shared by the module's self-test and the pytest suite)."""

from __future__ import annotations

import numpy as np

from . import mrml_bridge as bridge
from .scene_logic import SegmentResult

DICE_THRESHOLD = 0.7


def ellipsoidStudy(scene):
    """A synthetic MR-like volume with an ellipsoid and context boxes on 3 of its slices, as a user
    would draw them: (volume node, true mask). Shared by the self-test and the pytest suite."""
    from weakicl.simulation import slice_boxes
    from weakicl.volume import Geometry, Volume

    shape = (48, 72, 72)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    truth = ((grids[0] - 24) / 14) ** 2 + ((grids[1] - 36) / 16) ** 2 + ((grids[2] - 34) / 20) ** 2 <= 1.0
    image = (60.0 + 80.0 * truth + np.random.default_rng(0).normal(0.0, 8.0, shape)).astype(np.float32)
    geometry = Geometry((0.9, 0.9, 1.5), (-30.0, -30.0, -35.0), np.eye(3), shape)
    volumeNode = bridge.volume_node_from_volume(scene, Volume(image, geometry, "MR"), "Ellipsoid")
    for box in slice_boxes(truth).boxes:
        bridge.set_roi_box(bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, volumeNode), box, geometry)
    return volumeNode, truth


def segmentEllipsoid(logic, device: str = "auto") -> tuple[float, SegmentResult]:
    """Segment the ellipsoid study through the Logic: (Dice against the truth, the result)."""
    volumeNode, truth = ellipsoidStudy(logic.scene)
    segmentationNode = logic.createSegmentation(volumeNode)
    result = logic.segment(volumeNode, segmentationNode, "ellipsoid", device=device)
    mask = bridge.read_segment(segmentationNode, result.segmentId, bridge.geometry_from_volume_node(volumeNode))
    return float(2.0 * (mask & truth).sum() / (mask.sum() + truth.sum())), result
