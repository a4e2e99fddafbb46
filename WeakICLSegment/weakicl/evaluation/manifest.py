"""Which structures an evaluation covers: a manifest of cases, a split, and the unseen structures.

A manifest is a JSON file `{"cases": [{"id", "image", "label", "labels": {value: name}, "modality",
"collection"?}], "splits"?: {name: [case ids]}, "unseen_labels"?: {"cases": {case id: [values]}}}` with
paths relative to the manifest's folder, the format of the shared data folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError

MIN_VOXELS = 50  # smaller structures are skipped (and counted): too few voxels for a meaningful Dice
UNSEEN_GROUP = "unseen"
ALL_GROUP = "all"


@dataclass(frozen=True)
class Case:
    id: str
    collection: str
    modality: str
    image: Path
    label: Path
    labels: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Structure:
    """One labelled structure of one case, evaluated as a binary segmentation within `group`."""

    case: Case
    value: int
    name: str
    group: str

    @property
    def key(self) -> str:
        return f"{self.case.id}/{self.value}"


def read_manifest(path: str | Path) -> tuple[list[Case], dict]:
    """Cases of a manifest (paths made absolute) and the raw document, with one-line errors for bad input."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    try:
        document = json.loads(path.read_text())
        cases = [_case(entry, path.parent) for entry in document["cases"]]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path.name} is not valid JSON: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InputError(f"{path.name}: malformed manifest ({type(error).__name__}: {error})") from None
    if not cases:
        raise InputError(f"{path.name} lists no cases")
    return cases, document


def _case(entry: dict, root: Path) -> Case:
    labels = tuple(sorted((int(value), str(name)) for value, name in entry["labels"].items()))
    modality = str(entry.get("modality", "auto"))
    return Case(str(entry["id"]), str(entry.get("collection", "default")),
                modality if modality in ("CT", "MR") else "auto",
                root / entry["image"], root / entry["label"], labels)


# Training tasks of the CT, MR and brain cases (small to large) and every 21st training case (the
# hippocampi): where the engine's inference constants are tuned (`weakicl evaluate --tuning`).
TUNING_STRUCTURES = {"totalseg_ct_abdomen": (4, 5, 7, 8, 63, 30, 88, 79, 31), "brain_t1_aseg": (12, 13, 17, 18, 4, 28, 51, 52),
                     "totalseg_mr_abdomen": (5, 4, 7, 24, 19, 48), "totalseg_ct_spine": (28, 26)}
TUNING_HIPPOCAMPUS_STRIDE = 21
TUNING_GROUPS = ("tuning-hippocampus", "tuning-other")


def select_structures(cases: list[Case], document: dict, split: str | None, unseen: bool) -> list[Structure]:
    """The split's cases with all their labels and/or the manifest's unseen structures.

    Without either, every labelled structure of every case (any folder of cases can be evaluated);
    the unseen structures are left out of a split's cases, as they are never a training task.
    """
    by_id = {case.id: case for case in cases}
    unseen_values = _unseen_values(document)
    structures: list[Structure] = []
    if split is not None:
        splits = document.get("splits", {})
        if split not in splits:
            raise InputError(f"manifest has no split {split!r} (it has: {', '.join(splits) or 'none'})")
        for case_id in splits[split]:
            if case_id not in by_id:
                raise InputError(f"split {split!r} names case {case_id!r}, which the manifest does not list")
            structures += _structures(by_id[case_id], split, exclude=unseen_values.get(case_id, set()))
    if unseen:
        if not unseen_values:
            raise InputError("manifest lists no unseen_labels")
        for case_id, values in unseen_values.items():
            if case_id not in by_id:
                raise InputError(f"unseen_labels names case {case_id!r}, which the manifest does not list")
            structures += [s for s in _structures(by_id[case_id], UNSEEN_GROUP) if s.value in values]
    if split is None and not unseen:
        for case in cases:
            structures += _structures(case, ALL_GROUP)
    return structures


def tuning_structures(cases: list[Case], document: dict) -> list[Structure]:
    """TUNING_STRUCTURES and every TUNING_HIPPOCAMPUS_STRIDE-th case of the training split (all labels),
    in the groups "tuning-hippocampus" and "tuning-other": where inference constants are chosen, never
    on validation or unseen structures."""
    by_id = {case.id: case for case in cases}
    unseen = _unseen_values(document)
    structures: list[Structure] = []
    for case_id, values in TUNING_STRUCTURES.items():
        if case_id in by_id:
            names = dict(by_id[case_id].labels)
            structures += [Structure(by_id[case_id], value, names[value], TUNING_GROUPS[1])
                           for value in values if value in names and value not in unseen.get(case_id, ())]
    for case_id in document.get("splits", {}).get("train", [])[::TUNING_HIPPOCAMPUS_STRIDE]:
        if case_id in by_id:
            structures += _structures(by_id[case_id], TUNING_GROUPS[0])
    if not structures:
        raise InputError("the manifest holds none of the tuning structures")
    return structures


def _unseen_values(document: dict) -> dict[str, set[int]]:
    """The manifest's unseen label values per case id."""
    return {case_id: {int(v) for v in values} for case_id, values in document.get("unseen_labels", {}).get("cases", {}).items()}


def _structures(case: Case, group: str, exclude: set[int] = frozenset()) -> list[Structure]:
    return [Structure(case, value, name, group) for value, name in case.labels if value not in exclude]


@lru_cache(maxsize=None)
def load_case(case: Case):
    """(image Volume, integer label map) of a case; cached because cross-subject protocols reuse contexts."""
    from ..volume import read_label_map, read_volume

    image = read_volume(case.image, case.modality)
    return image, read_label_map(case.label, image.geometry)


def structure_mask(structure: Structure) -> np.ndarray:
    return load_case(structure.case)[1] == structure.value
