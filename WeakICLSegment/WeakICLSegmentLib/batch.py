"""Where batch inputs come from and where their segmentations go: plain paths, no Slicer."""

from __future__ import annotations

from pathlib import Path

from weakicl.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
RESULT_SUFFIX = ".seg.nrrd"


def image_stem(name: str) -> str:
    """A file or node name without its image extension ("ct.nii.gz" -> "ct")."""
    lowered = name.lower()
    for suffix in (RESULT_SUFFIX,) + IMAGE_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


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
    base = f"{image_stem(name)} {segment_name}".strip()
    candidate, number = folder / f"{base}{RESULT_SUFFIX}", 1
    while candidate.exists():
        number += 1
        candidate = folder / f"{base} {number}{RESULT_SUFFIX}"
    return candidate
