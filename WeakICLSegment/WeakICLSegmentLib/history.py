"""Undo/redo snapshots of the module's segment edits, kept small: masks are stored bit-packed inside
their bounding box. A snapshot also records what the module left in the segment, so that Undo refuses to
restore over an edit made since in the Segment Editor (that edit is the Segment Editor's to undo)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, NamedTuple, Optional, TypeVar

import numpy as np
from weakicl.errors import InputError
from weakicl.preprocess import bounding_box
from weakicl.volume import Geometry

State = TypeVar("State")


@dataclass(frozen=True)
class PackedMask:
    """A (K, J, I) bool mask as its nonzero bounding box, one bit per voxel (a 512x512x300 liver: ~1 MB)."""

    shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    box_shape: tuple[int, int, int]
    bits: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> PackedMask:
        return cls(tuple(shape), (0, 0, 0), (0, 0, 0), np.zeros(0, dtype=np.uint8))

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        mask = np.asarray(mask, dtype=bool)
        bounds = _nonzero_bounds(mask)
        if bounds is None:
            return cls.empty(mask.shape)
        box = mask[_slices(*bounds)]
        return cls(mask.shape, tuple(int(v) for v in bounds[0]), box.shape, np.packbits(box.ravel()))

    def unpack(self, region: Optional[tuple] = None) -> np.ndarray:
        """The whole (K, J, I) mask, or with `region` (slices k, j, i) only that block of it, at the
        cost of the block and the bounding box, not of the volume."""
        starts, stops = _span(region, self.shape)
        mask = np.zeros(stops - starts, dtype=bool)
        offset = np.array(self.offset)
        lo, hi = np.maximum(offset, starts), np.minimum(offset + self.box_shape, stops)
        if np.prod(self.box_shape) and np.all(hi > lo):
            mask[_slices(lo - starts, hi - starts)] = self._box()[_slices(lo - offset, hi - offset)]
        return mask

    def with_block(self, region: tuple, block: np.ndarray) -> PackedMask:
        """This mask with `region` (slices k, j, i) set to `block`, as `pack` of the updated whole mask
        gives it (same box, same bits), working on the bounding box and the region only."""
        starts, stops = _span(region, self.shape)
        offset = np.array(self.offset)
        occupied = bool(np.prod(self.box_shape))
        lo = np.minimum(offset, starts) if occupied else starts
        hi = np.maximum(offset + self.box_shape, stops) if occupied else stops
        hull = np.zeros(hi - lo, dtype=bool)
        if occupied:
            hull[_slices(offset - lo, offset - lo + self.box_shape)] = self._box()
        hull[_slices(starts - lo, stops - lo)] = block
        bounds = _nonzero_bounds(hull)
        if bounds is None:
            return PackedMask.empty(self.shape)
        box = hull[_slices(*bounds)]
        return PackedMask(self.shape, tuple(int(v) for v in lo + bounds[0]), box.shape, np.packbits(box.ravel()))

    def _box(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=int(np.prod(self.box_shape))).astype(bool).reshape(self.box_shape)

    def same_as(self, other: Optional[PackedMask]) -> bool:
        return (other is not None and self.shape == other.shape and self.offset == other.offset
                and self.box_shape == other.box_shape and np.array_equal(self.bits, other.bits))


def _nonzero_bounds(mask: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(lo, hi) KJI of a (K, J, I) mask's nonzero bounding box (hi exclusive), None when it is empty:
    the engine's `bounding_box` (from projections, not a list of every voxel), as slice bounds."""
    bounds = bounding_box(mask)
    return None if bounds is None else (bounds[0], bounds[1] + 1)


def _span(region: Optional[tuple], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) KJI of a block given as slices k, j, i (None: the whole shape)."""
    bounds = [block.indices(size)[:2] for block, size in zip(region or (slice(None),) * 3, shape)]
    return np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])


def _slices(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@dataclass
class EditHistory(Generic[State]):
    """Two stacks of states: `record` the state before each edit; `undo`/`redo` trade the current state
    for the one to restore (captured for the same subject), so redo works after undo and a new edit
    drops the redo branch."""

    limit: int = 20
    _undo: list[State] = field(default_factory=list)
    _redo: list[State] = field(default_factory=list)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def next_undo(self) -> Optional[State]:
        return self._undo[-1] if self._undo else None

    def next_redo(self) -> Optional[State]:
        return self._redo[-1] if self._redo else None

    def record(self, before: State) -> None:
        self._undo.append(before)
        del self._undo[: -self.limit]
        self._redo.clear()

    def undo(self, capture_current: Callable[[State], State]) -> State:
        """The state to restore; `capture_current(it)` records what it replaces, for redo."""
        return self._swap(self._undo, self._redo, capture_current, "undo")

    def redo(self, capture_current: Callable[[State], State]) -> State:
        return self._swap(self._redo, self._undo, capture_current, "redo")

    @staticmethod
    def _swap(source: list[State], target: list[State], capture_current: Callable[[State], State], verb: str) -> State:
        if not source:
            raise IndexError(f"nothing to {verb}")
        state = source.pop()
        target.append(capture_current(state))
        return state

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()


# --- snapshots of segments and their correction prompts --------------------------------------------


@dataclass(frozen=True)
class MarkupState:
    """A markups node's placed prompts, to put back on undo: control points, and an ROI's size and axes."""

    node_id: str
    positions: np.ndarray
    roi_size: Optional[tuple[float, float, float]] = None
    roi_object_to_node: Optional[np.ndarray] = None


def capture_markup(node) -> MarkupState:
    from . import mrml_bridge as bridge

    positions = np.array([node.GetNthControlPointPosition(i) for i in range(node.GetNumberOfControlPoints())]).reshape(-1, 3)
    if node.IsA("vtkMRMLMarkupsROINode") and len(positions):
        return MarkupState(node.GetID(), positions, tuple(node.GetSize()), bridge.numpy_matrix(node.GetObjectToNodeMatrix()))
    return MarkupState(node.GetID(), positions)


def restore_markup(scene, state: MarkupState) -> None:
    """Put a node back as captured (a node deleted since is left deleted)."""
    from . import mrml_bridge as bridge

    node = scene.GetNodeByID(state.node_id)
    if node is None:
        return
    was_modifying = node.StartModify()
    node.RemoveAllControlPoints()
    if state.roi_size is not None:
        bridge.place_roi(node, state.roi_object_to_node, state.roi_size)
    else:
        for position in state.positions:
            node.AddControlPoint(*position)
    node.EndModify(was_modifying)


@dataclass(frozen=True)
class SegmentState:
    """One segment (absent: mask None) and the correction prompts that produced it, for undo/redo."""

    segmentation_id: str
    segment_id: str
    name: str
    geometry: Geometry
    mask: Optional[PackedMask]
    markups: tuple[MarkupState, ...]


def capture_segment_state(segmentation_node, segment_id: str, name: str, geometry: Geometry, markup_nodes: list) -> SegmentState:
    from . import mrml_bridge as bridge

    exists = segmentation_node.GetSegmentation().GetSegment(segment_id) is not None
    mask = PackedMask.pack(bridge.read_segment(segmentation_node, segment_id, geometry)) if exists else None
    return SegmentState(segmentation_node.GetID(), segment_id, name, geometry, mask, tuple(capture_markup(n) for n in markup_nodes))


def restore_segment_state(scene, state: SegmentState) -> None:
    """Put a segment (or its absence) and its correction prompts back as captured."""
    from . import mrml_bridge as bridge

    segmentation_node = scene.GetNodeByID(state.segmentation_id)
    if segmentation_node is None:
        raise InputError("the segmentation of this step was deleted: nothing to restore")
    if state.mask is None:
        segmentation_node.GetSegmentation().RemoveSegment(state.segment_id)
    else:
        bridge.write_segment(segmentation_node, state.mask.unpack(), state.geometry, state.name, state.segment_id)
    for markup in state.markups:
        restore_markup(scene, markup)


class ActiveSegment(NamedTuple):
    """The segment corrections on a target apply to, by node and segment ID, and its task's name."""

    segmentationId: str
    segmentId: str
    targetId: str
    taskName: str


class Step(NamedTuple):
    """One undo entry: the segment's state to restore, the segment it is about, which segment was active
    for its target then, and what the module left in the segment (None: no segment), which must still
    be there for the step to be restored."""

    state: SegmentState
    subject: ActiveSegment
    active: Optional[ActiveSegment]
    expected: Optional[PackedMask]


def still_as_left(step: Step, current: Optional[PackedMask]) -> bool:
    """True when the segment is as the module left it (no Segment Editor edit since)."""
    if step.expected is None:
        return current is None or not current.unpack().any()
    return step.expected.same_as(current)
