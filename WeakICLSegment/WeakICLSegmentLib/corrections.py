"""Corrections arrive while a refine runs: they are queued and coalesced, and each refine recomputes
only around the prompts that changed since the last one. Plain Python, unit-tested."""

from __future__ import annotations

from weakicl.prompts import PromptSet


class RefineQueue:
    """At most one refine runs; requests made meanwhile become one pending refine, run after it (it
    picks up every prompt placed or removed in the meantime)."""

    def __init__(self) -> None:
        self.running = False
        self.pending = False

    def request(self) -> bool:
        """A correction changed: True when the caller should start a refine now."""
        if self.running:
            self.pending = True
            return False
        self.running = True
        return True

    def finished(self) -> bool:
        """A refine ended (done, failed or cancelled): True when the caller should start the next now."""
        if self.pending:
            self.pending = False
            return True
        self.running = False
        return False

    def clear(self) -> None:
        self.running = self.pending = False


def changed_prompts(applied: PromptSet, current: PromptSet) -> PromptSet:
    """Prompts placed since `applied` and prompts removed since (the region a removal affected must be
    recomputed as well); both mark where the engine recomputes."""
    added = PromptSet([b for b in current.boxes if b not in applied.boxes],
                      [p for p in current.points if p not in applied.points],
                      [b for b in current.oriented_boxes if b not in applied.oriented_boxes])
    removed = PromptSet([b for b in applied.boxes if b not in current.boxes],
                        [p for p in applied.points if p not in current.points],
                        [b for b in applied.oriented_boxes if b not in current.oriented_boxes])
    return added + removed
