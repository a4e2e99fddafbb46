"""Undo/redo of segmentation edits, kept small: masks are stored bit-packed inside their bounding box."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import numpy as np

State = TypeVar("State")


@dataclass(frozen=True)
class PackedMask:
    """A (K, J, I) bool mask as its nonzero bounding box, one bit per voxel (a 512x512x300 liver: ~1 MB)."""

    shape: tuple[int, int, int]
    offset: tuple[int, int, int]
    box_shape: tuple[int, int, int]
    bits: np.ndarray

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        mask = np.asarray(mask, dtype=bool)
        occupied = np.argwhere(mask)
        if len(occupied) == 0:
            return cls(mask.shape, (0, 0, 0), (0, 0, 0), np.zeros(0, dtype=np.uint8))
        lo, hi = occupied.min(axis=0), occupied.max(axis=0) + 1
        box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        return cls(mask.shape, tuple(int(v) for v in lo), box.shape, np.packbits(box.ravel()))

    def unpack(self) -> np.ndarray:
        mask = np.zeros(self.shape, dtype=bool)
        count = int(np.prod(self.box_shape))
        if count:
            box = np.unpackbits(self.bits, count=count).astype(bool).reshape(self.box_shape)
            region = tuple(slice(start, start + size) for start, size in zip(self.offset, self.box_shape))
            mask[region] = box
        return mask


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
