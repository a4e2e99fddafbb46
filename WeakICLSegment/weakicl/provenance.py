"""What produced an output: tool version, weights (version, sha256), target, prompts and context.

Every mask the tool writes carries this record, so a result found later can be traced to the model
and the input that made it: in the header of NRRD/MHA files (`.seg.nrrd` included), in a sidecar
JSON beside NIfTI files (which have no free-text header), and in DICOM SEG. Only file names are
recorded, never absolute paths: outputs travel, and the machine they were made on is nobody's business.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__

HEADER_KEY = "WeakICL_Provenance"  # key of the compact JSON record in NRRD/MHA headers
HEADER_SUFFIXES = (".nrrd", ".mha", ".mhd")  # formats whose header keeps free key-value fields
SIDECAR_SUFFIX = ".provenance.json"
SIDECAR_FORMATS = (".nii.gz", ".nii")  # formats without a free-text header: the record goes beside them


def provenance(card: Mapping[str, Any] | None = None, target: str | os.PathLike | None = None,
               prompts: Any = None, prompts_file: str | os.PathLike | None = None,
               context: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = (),
               segments: Sequence[str] = ()) -> dict:
    """The record for one output.

    `card` is the weights' model card (`Segmenter.card`); `prompts` a `PromptSet` drawn on the target
    (recorded in voxel coordinates, so it can be replayed); `context` the (image, annotation) files.
    """
    card = card or {}
    return {
        "tool": {"name": "weakicl", "version": __version__},
        "weights": {"name": card.get("name"), "version": card.get("version"), "file": card.get("file"),
                    "sha256": card.get("sha256")} if card else None,
        "target": _name(target),
        "prompts": None if prompts is None else {"file": _name(prompts_file), **prompts.to_voxel_json()},
        "context": [{"image": _name(image), "annotation": _name(annotation)} for image, annotation in context],
        "segments": list(segments),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _name(path: str | os.PathLike | None) -> str | None:
    return None if path is None else Path(path).name


def header_value(record: Mapping[str, Any]) -> str:
    """One line of JSON, as an NRRD/MHA header field must be."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def in_header(output: str | os.PathLike) -> bool:
    """True when the record goes into the output's own header, False when it needs a sidecar."""
    return Path(output).name.lower().endswith(HEADER_SUFFIXES)


def sidecar_path(output: str | os.PathLike) -> Path:
    """`liver.nii.gz` -> `liver.nii.gz.provenance.json`: named after the whole file name, so `liver.nii`
    and `liver.nii.gz` have one each, and with a distinct suffix, so it never replaces a prompt file."""
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def sidecar_of(output: str | os.PathLike) -> Path | None:
    """The sidecar that is part of `output` (written and checked with it), or None when its format keeps
    the record itself."""
    return sidecar_path(output) if Path(output).name.lower().endswith(SIDECAR_FORMATS) else None


def sidecar_json(record: Mapping[str, Any]) -> str:
    """The text of a sidecar; the output's writer publishes it together with the output (weakicl.atomic)."""
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def portable_path(path: str | os.PathLike, start: str | os.PathLike | None = None) -> str:
    """A path as shipped files may record it: relative to `start` (the working folder) when it is near,
    else its file name alone; never an absolute path of the machine that ran the command."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        relative = Path(os.path.relpath(path, start or os.getcwd()))
    except ValueError:  # another drive on Windows
        return path.name
    return relative.as_posix() if relative.parts[:2].count("..") < 2 else path.name


def portable_command(argv: Sequence[str]) -> str:
    """The command line as a user would type it: the program by name, absolute paths made portable."""
    words = [Path(argv[0]).name]
    for word in argv[1:]:
        option, equals, value = word.partition("=") if word.startswith("-") else ("", "", word)
        words.append(option + equals + (portable_path(value) if os.path.isabs(value) else value))
    return shlex.join(words)
