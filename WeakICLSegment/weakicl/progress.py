"""The progress callback that every long call takes: one copy of its type for the engine, the command line
and the Slicer module. `progress(fraction, message)` hears a fraction in [0, 1] of the whole call and what
is being done; an exception raised from it (a Cancel button) aborts the call."""

from __future__ import annotations

from typing import Callable

ProgressCallback = Callable[[float, str], None]


def silent(fraction: float, message: str) -> None:
    """The progress callback of calls that were given none."""
