"""Where batch inputs come from and where their segmentations go: plain paths, no Slicer.

The naming rule is the engine's (`weakicl.batch.output_name`, shared with `weakicl batch`); Slicer adds a
number instead of skipping when a result of that name exists, because a user who reruns a batch in the
application expects new results beside the old ones, not a resumed run.
"""

from __future__ import annotations

from pathlib import Path

from weakicl.batch import IMAGE_SUFFIXES, output_name
from weakicl.errors import InputError

RESULT_SUFFIX = ".seg.nrrd"


def image_files(folder: Path) -> list[Path]:
    """The 3D images of a folder (not recursive), our own results left out, in name order."""
    if not Path(folder).is_dir():
        raise InputError(f"image folder not found: {folder}")
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.lower().endswith(RESULT_SUFFIX)
    )


def output_path(name: str, segment_name: str, folder: Path) -> Path:
    """`<folder>/<image stem> <segment>.seg.nrrd`, numbered rather than overwriting an earlier result."""
    candidate, number = folder / output_name(name, segment_name, RESULT_SUFFIX), 1
    while candidate.exists():
        number += 1
        candidate = folder / output_name(name, f"{segment_name} {number}", RESULT_SUFFIX)
    return candidate
