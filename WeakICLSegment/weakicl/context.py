"""References ("context") from files, and the classes they define: one copy for the command line,
`weakicl batch` and the Slicer module.

A context item is (Volume, annotation): weak prompts (a PromptSet) or a dense label image (an integer
array). When every annotation is a label image, each non-zero label value is one class and keeps its
value in the output (values 5 and 29 come out as 5 and 29), named from the `.seg.nrrd` header where
there is one; otherwise the context defines one class, written as value 1.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import InputError
from .prompts import read_prompts
from .volume import MAX_LABEL_VALUE, read_label_map, read_volume

if TYPE_CHECKING:
    from .session import ContextItem

LABEL_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
DEFAULT_LABEL = "segment"


def is_label_image(path: str | os.PathLike) -> bool:
    """An annotation file read as a dense label image rather than as prompts."""
    name = str(path).lower()
    return name.endswith(LABEL_IMAGE_SUFFIXES) and not name.endswith(".mrk.json")


def load_context(pairs: Sequence[Sequence[str | os.PathLike]], modality: str = "auto") -> list[ContextItem]:
    """[(image, prompts-or-label-image)] -> [(Volume, PromptSet | label array)], each checked on its image's grid."""
    items = []
    for image_path, annotation_path in pairs:
        if os.path.abspath(image_path) == os.path.abspath(annotation_path):
            raise InputError(f"{os.path.basename(image_path)} is given as both the image and its annotation: "
                             "give its label image or prompts second")
        volume = read_volume(image_path, modality)
        if is_label_image(annotation_path):
            items.append((volume, read_label_map(annotation_path, volume.geometry)))
        else:
            items.append((volume, read_prompts(annotation_path, volume.geometry)))
    return items


def context_names(pairs: Sequence[Sequence[str | os.PathLike]]) -> dict[int, str]:
    """Segment names by label value from the context's `.seg.nrrd` label images (the first name wins)."""
    from .segfiles import read_segmentation

    names: dict[int, str] = {}
    for _, annotation_path in pairs:
        if str(annotation_path).lower().endswith(".seg.nrrd"):
            for value, name in read_segmentation(annotation_path).names_by_value().items():
                names.setdefault(value, name)
    return names


def label_values(items: Sequence[ContextItem]) -> list[int] | None:
    """The non-zero label values when every context is a label image, else None."""
    if not items or not all(isinstance(annotation, np.ndarray) for _, annotation in items):
        return None
    values = sorted(set(np.unique(np.concatenate([np.unique(a) for _, a in items])).tolist()) - {0})
    if values and (values[0] < 0 or values[-1] > MAX_LABEL_VALUE):
        raise InputError(f"label values must lie within 0-{MAX_LABEL_VALUE}, found {values[0] if values[0] < 0 else values[-1]}")
    return [int(v) for v in values]


def multi_label(items: Sequence[ContextItem]) -> bool:
    return len(label_values(items) or []) > 1


def select_label_value(items: Sequence[ContextItem], value: int) -> list[ContextItem]:
    """Keep one label value of a (multi-)label context, as asked with --label-value."""
    values = label_values(items)
    if values is None:
        raise InputError("--label-value picks a value of label images: give label images as --context annotations")
    if value not in values:
        raise InputError(f"label value {value} is not in the context label images (values: {', '.join(map(str, values)) or 'none'})")
    return [(volume, np.where(annotation == value, annotation, 0)) for volume, annotation in items]


def context_classes(items: Sequence[ContextItem], label: str | None = None,
                    names: dict[int, str] | None = None) -> list[tuple[str, int]]:
    """(name, output label value) of each class the context defines, in task order.

    Weak prompts: one class, `label`, value 1. Label images: one class per value, named from `names`
    (a `.seg.nrrd` header), else `label` for a single value and `label_value` for several."""
    values = label_values(items)
    if values is None:
        return [(label or DEFAULT_LABEL, 1)]
    if not values:
        raise InputError("the context label images are empty")
    names = names or {}
    if len(values) == 1:
        return [(label or names.get(values[0], DEFAULT_LABEL), values[0])]
    return [(names.get(value, f"{label or DEFAULT_LABEL}_{value}"), value) for value in values]


def build_task(segmenter, items: Sequence[ContextItem], label: str | None = None, progress=None,
               names: dict[int, str] | None = None):
    """The task embedding of `context_classes(items, label, names)`: one pass segments every class."""
    from .session import TaskEmbedding

    classes = context_classes(items, label, names)
    if label_values(items) is None:
        return segmenter.encode_context(list(items), classes[0][0], progress)
    tasks = []
    for name, value in classes:
        present = [(volume, annotation == value) for volume, annotation in items if np.any(annotation == value)]
        tasks.append(segmenter.encode_context(present, name, progress))
    return tasks[0] if len(tasks) == 1 else TaskEmbedding.stack(tasks)
