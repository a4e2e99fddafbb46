"""The module's scene work: prompts, segment, refine, undo, context bank and batch, on a MRML scene and
without Qt, so it runs under pytest with pip's `slicer-core` and from Slicer's Python console.

Long work is split into a `Job`: `prepare*` reads the scene into engine objects (main thread),
`Job.compute(progress)` runs the engine only (safe on a worker thread: it touches no MRML node), and
`Job.apply(result)` writes the scene (main thread). `run(job)` does the three in a row for scripts and
tests; the Widget runs `compute` on a worker thread under a modal progress dialog.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from weakicl.errors import InputError
from weakicl.progress import ProgressCallback, silent
from weakicl.prompts import PromptSet

from . import masking
from . import mrml_bridge as bridge
from .batch import output_path
from .corrections import changed_prompts
from .history import (ActiveSegment, EditHistory, PackedMask, Step, capture_segment_state, restore_segment_state,
                      still_as_left)

BankEntry = tuple  # (vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode holding a snapshot, segment ID)
BANK_ATTRIBUTE = "WeakICLSegment.BankSnapshot"
UNSEGMENTABLE_CLASSES = {
    "vtkMRMLLabelMapVolumeNode": "a label map",
    "vtkMRMLVectorVolumeNode": "a vector or RGB volume",
    "vtkMRMLDiffusionWeightedVolumeNode": "a diffusion-weighted volume",
    "vtkMRMLDiffusionTensorVolumeNode": "a diffusion tensor volume",
}


@dataclass
class SegmentResult:
    segmentId: str
    seconds: float
    device: str
    segmentationNode: Any = None
    changedKJI: Optional[tuple] = None


@dataclass
class Job:
    """Engine work between two scene steps; see the module docstring."""

    title: str
    compute: Callable[[ProgressCallback], Any]
    apply: Callable[[Any], Any]


@dataclass
class ContextEntry:
    nodeId: str
    label: str


def unsegmentable_reason(node) -> Optional[str]:
    """Why a volume node cannot be segmented (None when it can): the engine takes one scalar channel."""
    for class_name, reason in UNSEGMENTABLE_CLASSES.items():
        if node.IsA(class_name):
            return reason
    image = node.GetImageData()
    if image is None:
        return "a volume without image data"
    if image.GetNumberOfScalarComponents() != 1:
        return f"a volume of {image.GetNumberOfScalarComponents()} components"
    return None


def split_segmentable(nodes: Sequence) -> tuple[list, list[str]]:
    """(segmentable nodes, one message per node left out)."""
    usable, skipped = [], []
    for node in nodes:
        reason = unsegmentable_reason(node)
        if reason is None:
            usable.append(node)
        else:
            skipped.append(f"'{node.GetName()}' skipped: {reason}")
    return usable, skipped


class SceneLogic:
    """All MRML and engine work of the module; `scene` and `segmenterFactory(device)` are given."""

    def __init__(self, scene, segmenterFactory: Callable[[str], Any]) -> None:
        self.scene = scene
        self.history: EditHistory[Step] = EditHistory()
        self._segmenterFactory = segmenterFactory
        self._segmenters: dict = {}
        self._volumes: dict = {}
        self._active: dict[str, ActiveSegment] = {}  # target volume ID -> the segment its corrections refine
        self._applied: dict[tuple[str, str], PromptSet] = {}  # (segmentation, segment) -> corrections refined
        self._written: dict[tuple[str, str], PackedMask] = {}  # (segmentation, segment) -> what was written
        self._placementObservers: dict[str, list[int]] = {}
        # called with an ROI once its second corner is in (the GUI lists it, a correction box is refined);
        # Slicer's own event for that does not always come (`mrml_bridge.watch_box_placement`)
        self.onBoxPlaced: Callable[[Any], None] = lambda roi: None
        self._sceneGeneration = 0  # bumped when the scene is closed (`forgetEdits`)

    # -- engine ---------------------------------------------------------------------------------------
    def segmenter(self, device: str = "auto"):
        """The engine session for a device, created once (loading weights takes a moment)."""
        if device not in self._segmenters:
            self._segmenters[device] = self._segmenterFactory(device)
        return self._segmenters[device]

    def _sceneJob(self, title: str, compute: Callable[[ProgressCallback], Any], apply: Callable[[Any], Any]) -> Job:
        """A Job that writes the scene it was prepared in, or nothing: when that scene was closed while
        it computed (a refine is not modal), its result is dropped and `apply` returns None. Node IDs
        start again in the next scene, so the IDs it holds could name unrelated nodes there."""
        generation = self._sceneGeneration

        def applyToItsScene(result):
            if self._sceneGeneration != generation:
                logging.info(f"WeakICLSegment: {title.lower()} result dropped: the scene was closed while it was computed")
                return None
            return apply(result)

        return Job(title, compute, applyToItsScene)

    @staticmethod
    def run(job: Job, progress: Optional[ProgressCallback] = None):
        """A job in the calling thread: compute, then apply."""
        return job.apply(job.compute(progress or silent))

    def engineVolume(self, volumeNode):
        """The engine Volume of a node, reused while voxels and geometry are unchanged, so the
        engine's caches (prepared image, encoded context) hit across calls."""
        reason = unsegmentable_reason(volumeNode)
        if reason:
            raise InputError(f"'{volumeNode.GetName()}' is {reason}: choose a scalar volume")
        geometry = bridge.geometry_from_volume_node(volumeNode)
        stamp = volumeNode.GetImageData().GetMTime()
        cached = self._volumes.get(volumeNode.GetID())
        if cached is None or cached[0] != stamp or not cached[1].geometry.same_grid(geometry):
            cached = (stamp, bridge.volume_from_node(volumeNode))
            self._volumes[volumeNode.GetID()] = cached
        return cached[1]

    def defaultTargetVolume(self):
        """The first volume the target selector lists and the engine can take (None if none): a label
        map is a scalar volume node too, but the selector does not list it."""
        collection = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return next(iter(split_segmentable(nodes)[0]), None)

    # -- prompts --------------------------------------------------------------------------------------
    def sliceNodeAtCursor(self):
        """The slice view under the mouse (the crosshair node tracks it): where a box is being drawn."""
        crosshair = self.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        return crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0]) if crosshair is not None else None

    def placePrompt(self, role: bridge.PromptRole, volumeNode):
        """Enter placement mode for a prompt on `volumeNode`: a fresh ROI per box (drawn in the plane of
        the slice view clicked in), one list per point sign."""
        nodes = bridge.prompt_nodes(self.scene, (role,), volumeNode)
        reusable = [n for n in nodes if not role.is_box or n.GetNumberOfDefinedControlPoints() == 0]
        node = reusable[0] if reusable else bridge.create_prompt_node(self.scene, role, volumeNode)
        if role.is_box:
            self.watchBox(node)
        selection = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        interaction = self.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0 if role.is_box else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        return node

    def watchBox(self, roi) -> None:
        if roi.GetID() not in self._placementObservers:
            self._placementObservers[roi.GetID()] = bridge.watch_box_placement(
                roi, self.sliceNodeAtCursor, lambda placed: self.onBoxPlaced(placed))

    def contextEntries(self) -> list[ContextEntry]:
        """Placed context prompts on every volume, labelled for the list in the GUI."""
        entries = []
        for node in bridge.prompt_nodes(self.scene, bridge.CONTEXT_ROLES):
            volume = bridge.prompt_volume(node)
            count = node.GetNumberOfDefinedControlPoints()
            if volume is None or count == 0:
                continue
            role = bridge.role_of(node)
            try:
                detail = self._boxDetail(node, volume) if role.is_box else f"{count} point{'s' if count > 1 else ''}"
            except InputError as error:  # listed anyway, with the reason Segment will refuse it
                detail = f"not usable: {error}"
            entries.append(ContextEntry(node.GetID(), f"{role.label.capitalize()} on {volume.GetName()}: {detail}"))
        return entries

    @staticmethod
    def _boxDetail(roi, volumeNode) -> str:
        box = bridge.box_from_roi(roi, bridge.geometry_from_volume_node(volumeNode))
        if isinstance(box, bridge.OrientedBox):
            return "oblique slice"
        thin = box.thin_axes() if box else []
        return f"slice {'IJK'[thin[0]]}={round(box.lo_ijk[thin[0]])}" if len(thin) == 1 else "3D box"

    def removePromptNodes(self, nodeIds: Sequence[str]) -> None:
        for nodeId in nodeIds:
            node = self.scene.GetNodeByID(nodeId)
            if node is not None:
                self.scene.RemoveNode(node)

    def targetPrompts(self, targetVolume, roles: tuple) -> PromptSet:
        """The prompts of the given roles drawn on the target, in its voxel coordinates."""
        geometry = self.engineVolume(targetVolume).geometry
        return bridge.prompts_from_nodes(bridge.prompt_nodes(self.scene, roles, targetVolume), geometry)

    def contextItems(self, bank: Sequence[BankEntry]) -> list:
        """(Volume, PromptSet or dense mask) for every volume with weak context, then the bank."""
        volumes = []
        for node in bridge.prompt_nodes(self.scene, bridge.CONTEXT_ROLES):
            volume = bridge.prompt_volume(node)
            if volume is not None and volume not in volumes:
                volumes.append(volume)
        items = []
        for volumeNode in volumes:
            volume = self.engineVolume(volumeNode)
            prompts = bridge.prompts_from_nodes(bridge.prompt_nodes(self.scene, bridge.CONTEXT_ROLES, volumeNode), volume.geometry)
            if not prompts.is_empty():
                items.append((volume, prompts))
        for volumeNode, segmentationNode, segmentId in bank:
            if volumeNode is None or segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
                raise InputError("a context bank entry was deleted from the scene: clear the bank and add the segments again")
            volume = self.engineVolume(volumeNode)
            items.append((volume, bridge.read_segment(segmentationNode, segmentId, volume.geometry)))
        if not items:
            raise InputError("no context yet: draw a box around the structure on 2-3 slices (Weak context), "
                             "or add an accepted segment to the context bank")
        return items

    # -- segment and correct --------------------------------------------------------------------------
    def createSegmentation(self, targetVolume):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{targetVolume.GetName()} segmentation"))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(targetVolume)
        return node

    def requireActiveSegment(self, targetVolume, message: str) -> ActiveSegment:
        """`activeSegment`, or an InputError saying `message` when there is none."""
        active = self.activeSegment(targetVolume)
        if active is None:
            raise InputError(message)
        return active

    def activeSegment(self, targetVolume=None) -> Optional[ActiveSegment]:
        """The segment that corrections on `targetVolume` refine (any target's latest when None), while
        its nodes and segment still exist."""
        candidates = list(self._active.values()) if targetVolume is None else [self._active.get(targetVolume.GetID())]
        for active in reversed(candidates):
            if active is None:
                continue
            segmentation = self.scene.GetNodeByID(active.segmentationId)
            if segmentation is None or self.scene.GetNodeByID(active.targetId) is None:
                continue
            if segmentation.GetSegmentation().GetSegment(active.segmentId) is not None:
                return active
        return None

    def prepareSegment(self, targetVolume, segmentationNode, name: str, bank: Sequence[BankEntry] = (),
                       device: str = "auto", alignContext: bool = True) -> Job:
        """Segment the whole target from the context into a new segment (named uniquely); the
        segmentation node is created only when the result is written (None: a new node).

        Context drawn on the target itself also guides it (propagation within the volume); without it,
        `alignContext` registers the context volumes onto the target as a starting prior."""
        if targetVolume is None:
            raise InputError("choose a target volume first")
        items = self.contextItems(bank)
        target = self.engineVolume(targetVolume)
        prompts = self.targetPrompts(targetVolume, bridge.CONTEXT_ROLES)
        segmenter = self.segmenter(device)
        start = time.perf_counter()

        def compute(progress: ProgressCallback):
            task = segmenter.encode_context(items, name, progress)
            return segmenter.segment(target, task, prompts, align_context=alignContext, progress=progress)

        def apply(prediction) -> SegmentResult:
            node = segmentationNode if segmentationNode is not None and self.scene.IsNodePresent(segmentationNode) else self.createSegmentation(targetVolume)
            segmentId = node.GetSegmentation().GenerateUniqueSegmentID(name)
            subject = ActiveSegment(node.GetID(), segmentId, targetVolume.GetID(), name)
            self._write(subject, name, prediction.masks[0], None, target, newSegment=True)
            self._applied[(subject.segmentationId, segmentId)] = PromptSet()
            return SegmentResult(segmentId, time.perf_counter() - start, segmenter.device_name, node, prediction.changed_kji)

        return self._sceneJob("Segmenting", compute, apply)

    def segment(self, targetVolume, segmentationNode, name: str, bank: Sequence[BankEntry] = (), device: str = "auto",
                progress: Optional[ProgressCallback] = None, alignContext: bool = True) -> SegmentResult:
        return self.run(self.prepareSegment(targetVolume, segmentationNode, name, bank, device, alignContext), progress)

    def prepareRefine(self, targetVolume=None, bank: Sequence[BankEntry] = (), device: str = "auto") -> Job:
        """Re-run the target's active segment around the corrections placed or removed since its last
        run (all of its prompts when none changed), from its current voxels: Segment Editor edits count
        and are kept. Only the recomputed region is written, inside the Segment Editor's editable area."""
        active = self.requireActiveSegment(targetVolume, "press Segment first: corrections refine the target's last segment")
        targetNode = self.scene.GetNodeByID(active.targetId)
        segmentationNode = self.scene.GetNodeByID(active.segmentationId)
        target = self.engineVolume(targetNode)
        prompts = self.targetPrompts(targetNode, tuple(bridge.PromptRole))
        corrections = self.targetPrompts(targetNode, bridge.CORRECTION_ROLES)
        key = (active.segmentationId, active.segmentId)
        changed = changed_prompts(self._applied.get(key, PromptSet()), corrections)
        previous = bridge.read_segment(segmentationNode, active.segmentId, target.geometry)
        items = self.contextItems(bank)
        segmenter = self.segmenter(device)
        name = segmentationNode.GetSegmentation().GetSegment(active.segmentId).GetName()
        start = time.perf_counter()

        def compute(progress: ProgressCallback):
            task = segmenter.encode_context(items, active.taskName, progress)
            return segmenter.segment(target, task, prompts, previous.astype(np.float32),
                                     new_prompts=None if changed.is_empty() else changed, progress=progress)

        def apply(prediction) -> SegmentResult:
            if self.scene.GetNodeByID(active.segmentationId) is None or self.scene.GetNodeByID(active.targetId) is None:
                raise InputError("the segmentation or its volume was deleted while it was being refined")
            self._write(active, name, prediction.masks[0], prediction.changed_kji, target, newSegment=False)
            self._applied[key] = corrections
            return SegmentResult(active.segmentId, time.perf_counter() - start, segmenter.device_name,
                                 segmentationNode, prediction.changed_kji)

        return self._sceneJob("Refining", compute, apply)

    def refine(self, targetVolume=None, bank: Sequence[BankEntry] = (), device: str = "auto",
               progress: Optional[ProgressCallback] = None) -> SegmentResult:
        return self.run(self.prepareRefine(targetVolume, bank, device), progress)

    def _correctionNodes(self, subject: ActiveSegment) -> list:
        return bridge.prompt_nodes(self.scene, bridge.CORRECTION_ROLES, self.scene.GetNodeByID(subject.targetId))

    def _capture(self, subject: ActiveSegment, name: str, expected: Optional[PackedMask]) -> Step:
        segmentationNode = self.scene.GetNodeByID(subject.segmentationId)
        geometry = bridge.geometry_from_volume_node(self.scene.GetNodeByID(subject.targetId))
        state = capture_segment_state(segmentationNode, subject.segmentId, name, geometry, self._correctionNodes(subject))
        return Step(state, subject, self._active.get(subject.targetId), expected)

    def _write(self, subject: ActiveSegment, name: str, prediction: np.ndarray, region: Optional[tuple], target,
               newSegment: bool) -> None:
        """Write a prediction as one undoable step, where the Segment Editor's settings let it, keeping
        hand edits made since the module last wrote this segment; only `region` (slices k, j, i of the
        target) changes (None: all), and the masking, hand-edit and writing work is done there only
        where the segmentation's lattice allows it. A new segment starts with no corrections."""
        before = self._capture(subject, name, None)
        if newSegment:
            self.clearCorrections(self.scene.GetNodeByID(subject.targetId))
        segmentationNode = self.scene.GetNodeByID(subject.segmentationId)
        key = (subject.segmentationId, subject.segmentId)
        geometry = target.geometry
        partial = region is not None and before.state.mask is not None
        region = region or (slice(None),) * 3
        mask = before.state.mask if before.state.mask is not None else PackedMask.empty(geometry.shape_kji)
        current = mask.unpack(region)
        allowed = masking.writable(segmentationNode, subject.segmentId, geometry, masking.edit_settings(self.scene, segmentationNode),
                                   target.array, subject.targetId, region)
        written = self._written.get(key)
        block = masking.compose(prediction[region], current, allowed,
                                written.unpack(region) if written is not None and not newSegment else None)
        # what is left is read back on the target's grid, so that a round trip through another lattice
        # never passes for a hand edit
        if partial and bridge.write_segment_block(segmentationNode, block, geometry, region, subject.segmentId):
            self._written[key] = mask.with_block(region, bridge.read_segment(segmentationNode, subject.segmentId, geometry, region))
        else:
            result = mask.unpack()
            result[region] = block
            bridge.write_segment(segmentationNode, result, geometry, name, subject.segmentId)
            self._written[key] = PackedMask.pack(bridge.read_segment(segmentationNode, subject.segmentId, geometry))
        self.history.record(before._replace(expected=self._written[key]))
        self._activate(subject.targetId, subject)

    def _activate(self, targetId: str, subject: Optional[ActiveSegment]) -> None:
        """Make `subject` the target's active segment and the latest one (None: the target has none)."""
        self._active.pop(targetId, None)
        if subject is not None:
            self._active[targetId] = subject

    def _checkUnchanged(self, step: Optional[Step], verb: str) -> None:
        """Refuse to restore over edits made since in the Segment Editor (its own undo covers those)."""
        if step is None:
            raise InputError(f"nothing to {verb}")
        subject = step.subject
        segmentationNode = self.scene.GetNodeByID(subject.segmentationId)
        if segmentationNode is None:
            self.history.clear()
            raise InputError("the segmentation of this step was deleted: the module's undo history was cleared")
        exists = segmentationNode.GetSegmentation().GetSegment(subject.segmentId) is not None
        current = PackedMask.pack(bridge.read_segment(segmentationNode, subject.segmentId, step.state.geometry)) if exists else None
        if not still_as_left(step, current):
            self.history.clear()
            raise InputError(f"'{step.state.name}' was edited outside this module since (Segment Editor?): {verb} there "
                             "with the Segment Editor's Undo; this module's undo history was cleared so that it "
                             "never restores over those edits")

    def _swap(self, step: Step) -> None:
        restore_segment_state(self.scene, step.state)
        key = (step.subject.segmentationId, step.subject.segmentId)
        if step.state.mask is None:
            self._written.pop(key, None)
        else:
            self._written[key] = step.state.mask
        self._activate(step.subject.targetId, step.active)
        self._applied[key] = self.targetPrompts(self.scene.GetNodeByID(step.subject.targetId), bridge.CORRECTION_ROLES)

    def _captureForSwap(self, step: Step) -> Step:
        return self._capture(step.subject, step.state.name, step.state.mask)

    def undo(self) -> None:
        self._checkUnchanged(self.history.next_undo(), "undo")
        self._swap(self.history.undo(self._captureForSwap))

    def redo(self) -> None:
        self._checkUnchanged(self.history.next_redo(), "redo")
        self._swap(self.history.redo(self._captureForSwap))

    def forgetEdits(self) -> None:
        """Drop the undo history and the cached volumes (the scene they refer to is going away), and
        the results of jobs still computing for it."""
        self._sceneGeneration += 1
        self.history.clear()
        self._volumes.clear()
        self._active.clear()
        self._applied.clear()
        self._written.clear()
        self._placementObservers.clear()

    def clearCorrections(self, targetVolume) -> None:
        """Empty the target's correction prompts; the nodes stay, to be reused and for undo."""
        for node in bridge.prompt_nodes(self.scene, bridge.CORRECTION_ROLES, targetVolume):
            node.RemoveAllControlPoints()

    # -- context bank ---------------------------------------------------------------------------------
    def bankEntryOfActiveSegment(self, targetVolume=None) -> BankEntry:
        """A snapshot of the target's active segment as dense context: a hidden segmentation node of its
        own, so refining or editing the segment later changes neither the bank nor its encoded task."""
        active = self.requireActiveSegment(targetVolume, "no segment yet: press Segment first")
        volumeNode = self.scene.GetNodeByID(active.targetId)
        source = self.scene.GetNodeByID(active.segmentationId)
        geometry = bridge.geometry_from_volume_node(volumeNode)
        name = source.GetSegmentation().GetSegment(active.segmentId).GetName()
        snapshot = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"WeakICL bank: {name}"))
        snapshot.SetHideFromEditors(True)
        snapshot.SetAttribute(BANK_ATTRIBUTE, "1")
        segmentId = bridge.write_segment(snapshot, bridge.read_segment(source, active.segmentId, geometry), geometry, name)
        snapshot.GetDisplayNode().SetVisibility(False)
        return (volumeNode, snapshot, segmentId)

    def removeBankSnapshots(self, bank: Sequence[BankEntry]) -> None:
        for _, snapshot, _ in bank:
            if snapshot is not None and snapshot.GetAttribute(BANK_ATTRIBUTE) and self.scene.IsNodePresent(snapshot):
                self.scene.RemoveNode(snapshot)

    @staticmethod
    def describeBankEntry(entry: BankEntry) -> str:
        volumeNode, segmentationNode, segmentId = entry
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        if volumeNode is None or segment is None:
            return "(deleted)"
        return f"{segment.GetName()} on {volumeNode.GetName()}"

    # -- batch ----------------------------------------------------------------------------------------
    def otherVolumes(self, targetVolume) -> tuple[list, list[str]]:
        """Every segmentable volume of the scene but the target, and a message for each one left out
        (label maps, vector/RGB, diffusion volumes)."""
        collection = self.scene.GetNodesByClass("vtkMRMLVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        nodes = [node for node in nodes if node is not targetVolume and not node.IsA("vtkMRMLLabelMapVolumeNode")]
        return split_segmentable(nodes)

    def _encodeOnce(self, segmenter, items, name: str, progress: ProgressCallback):
        return segmenter.encode_context(items, name, lambda fraction, message: progress(0.0, f"context: {message}"))

    def prepareBatchVolumes(self, volumeNodes: Sequence, name: str, bank: Sequence[BankEntry] = (), folder: Optional[Path] = None,
                            device: str = "auto", alignContext: bool = True) -> Job:
        """One new segmentation node per volume (each becomes that volume's active segment, so
        corrections drawn on it refine it); each also written to `folder`, else beside the volume's
        file when it has one."""
        from weakicl.volume import write_mask

        volumeNodes, skipped = split_segmentable(volumeNodes)
        if not volumeNodes:
            raise InputError("no volume to segment" + (f" ({'; '.join(skipped)})" if skipped else ""))
        items = self.contextItems(bank)
        volumes = [bridge.volume_from_node(node) for node in volumeNodes]
        destinations = [folder or self._fileFolder(node) for node in volumeNodes]
        names = [node.GetName() for node in volumeNodes]
        segmenter = self.segmenter(device)

        def compute(progress: ProgressCallback) -> list:
            task = self._encodeOnce(segmenter, items, name, progress)
            predictions = []
            for index, volume in enumerate(volumes):
                share = _share(progress, index, len(volumes))
                prediction = segmenter.segment(volume, task, align_context=alignContext, progress=share)
                if destinations[index] is not None:
                    write_mask(output_path(names[index], name, Path(destinations[index])), prediction.masks, volume.geometry, [name])
                predictions.append(prediction.masks[0])
            return predictions

        def apply(masks: list) -> BatchResult:
            nodes = []
            for volumeNode, volume, mask in zip(volumeNodes, volumes, masks):
                node = self.createSegmentation(volumeNode)
                segmentId = bridge.write_segment(node, mask, volume.geometry, name)
                self._activate(volumeNode.GetID(), ActiveSegment(node.GetID(), segmentId, volumeNode.GetID(), name))
                self._written[(node.GetID(), segmentId)] = PackedMask.pack(mask)
                self._applied[(node.GetID(), segmentId)] = PromptSet()
                nodes.append(node)
            return BatchResult(nodes, skipped)

        return self._sceneJob("Batch", compute, apply)

    def batchVolumes(self, volumeNodes: Sequence, name: str, bank: Sequence[BankEntry] = (), folder: Optional[Path] = None,
                     device: str = "auto", progress: Optional[ProgressCallback] = None, alignContext: bool = True) -> BatchResult:
        return self.run(self.prepareBatchVolumes(volumeNodes, name, bank, folder, device, alignContext), progress)

    @staticmethod
    def _fileFolder(volumeNode) -> Optional[Path]:
        storage = volumeNode.GetStorageNode()
        fileName = storage.GetFileName() if storage else None
        return Path(fileName).parent if fileName else None

    def prepareBatchFiles(self, paths: Sequence[Path], name: str, bank: Sequence[BankEntry] = (), folder: Optional[Path] = None,
                          device: str = "auto", alignContext: bool = True) -> Job:
        """Segment image files without loading them into the scene; results beside them or in `folder`."""
        from weakicl.volume import read_volume, write_mask

        if not paths:
            raise InputError("no images (.nii, .nii.gz, .nrrd, .mha) in the chosen folder")
        items = self.contextItems(bank)
        segmenter = self.segmenter(device)

        def compute(progress: ProgressCallback) -> list[Path]:
            task = self._encodeOnce(segmenter, items, name, progress)
            written = []
            for index, path in enumerate(paths):
                share = _share(progress, index, len(paths))
                share(0.0, "reading")
                volume = read_volume(path)
                prediction = segmenter.segment(volume, task, align_context=alignContext, progress=share)
                written.append(write_mask(output_path(Path(path).name, name, Path(folder or Path(path).parent)),
                                          prediction.masks, volume.geometry, [name]))
            return written

        return Job("Batch", compute, lambda written: written)

    def batchFiles(self, paths: Sequence[Path], name: str, bank: Sequence[BankEntry] = (), folder: Optional[Path] = None,
                   device: str = "auto", progress: Optional[ProgressCallback] = None, alignContext: bool = True) -> list[Path]:
        return self.run(self.prepareBatchFiles(paths, name, bank, folder, device, alignContext), progress)

    def loadDicomStudy(self, seriesUids: Sequence[str], loadSeries: Callable[[list[str]], list[str]],
                       progress: Optional[ProgressCallback] = None) -> tuple[list, list[str]]:
        """Load a study's series one at a time (`loadSeries([uid])` gives node IDs; on the main thread:
        it writes the scene); `progress` may raise to cancel between series. Returns the segmentable
        volumes loaded and a message for each node left out (label maps, vector volumes, ...)."""
        report = progress or silent
        loaded = []
        for index, uid in enumerate(seriesUids):
            report(index / max(len(seriesUids), 1), f"loading series {index + 1}/{len(seriesUids)}")
            loaded.extend(node for node in (self.scene.GetNodeByID(i) for i in loadSeries([uid])) if node is not None)
        volumes, skipped = split_segmentable([node for node in loaded if node.IsA("vtkMRMLVolumeNode")])
        if not volumes:
            raise InputError("the study has no scalar image series that Slicer can load as a volume"
                             + (f" ({'; '.join(skipped)})" if skipped else ""))
        return volumes, skipped


def dicom_studies(database) -> list[tuple[str, str]]:
    """(study UID, "patient - date - description") of every study in a DICOM database (Slicer's)."""
    if database is None or not database.isOpen:
        raise InputError("the DICOM database is not open: import the study in the DICOM module first")
    studies = []
    for patient in database.patients():
        patientName = database.fieldForPatient("PatientsName", patient)
        for study in database.studiesForPatient(patient):
            date, description = database.fieldForStudy("StudyDate", study), database.fieldForStudy("StudyDescription", study)
            studies.append((study, " - ".join(part for part in (patientName, date, description) if part)))
    return studies


@dataclass
class BatchResult:
    segmentationNodes: list
    skipped: list[str]


def _share(progress: ProgressCallback, index: int, count: int) -> ProgressCallback:
    def report(fraction: float, message: str) -> None:
        progress((index + fraction) / count, f"{index + 1}/{count}: {message}")

    return report
