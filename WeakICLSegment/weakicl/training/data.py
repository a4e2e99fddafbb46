"""The real-data cache: manifest cases preprocessed once into arrays that train without SimpleITK.

`prepare_cache` reads every case of the training split (and of the validation split, kept apart),
normalises intensities, resamples to the working spacing, crops to the labelled region plus a margin and
writes `cases/<id>.npz` (float16 image, uint8/uint16 labels) and `index.json` (split, spacing, and the
bounding box of every structure). Structures in the manifest's `unseen_labels` are erased from the label
maps (their voxels become background) and never indexed, so they can never be a training task.
Patches are cut at sampling time (`CachedSubjects`), so one cache serves every patch size.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..evaluation.manifest import Case, read_manifest
from .episodes import MIN_CLASS_VOXELS, Subjects

CACHE_VERSION = 2
CROP_MARGIN_VOXELS = 24
ANCHORS_PER_STRUCTURE = 64  # voxels of each structure kept in the index, to centre patches on large ones
TRAIN, VALIDATION = "train", "validation"


def case_split(case_id: str, splits: dict) -> str | None:
    """"validation" for the validation split, "train" for the training split and for cases in no split."""
    if case_id in splits.get(VALIDATION, []):
        return VALIDATION
    if case_id in splits.get(TRAIN, []) or not any(case_id in ids for ids in splits.values()):
        return TRAIN
    return None


def structure_boxes(labels: np.ndarray, values: list[int], rng: np.random.Generator) -> dict[str, dict]:
    """Inclusive [k, j, i] bounds, voxel count and a few random voxels of each listed label value present."""
    counts = np.bincount(labels.ravel(), minlength=max(values, default=0) + 1)
    boxes = {}
    for value, region in enumerate(ndimage.find_objects(labels.astype(np.int32)), start=1):
        if region is None or value not in values:
            continue
        inside = np.argwhere(labels[region] == value)
        anchors = inside[rng.choice(len(inside), size=min(len(inside), ANCHORS_PER_STRUCTURE), replace=False)]
        boxes[str(value)] = {"lo": [s.start for s in region], "hi": [s.stop - 1 for s in region], "voxels": int(counts[value]),
                             "anchors": (anchors + [s.start for s in region]).tolist()}
    return boxes


def _prepare_case(case: Case, split: str, unseen: set[int], spacing_mm: float) -> tuple[dict, np.ndarray, np.ndarray]:
    from ..evaluation.manifest import load_case
    from ..preprocess import WorkingGrid, normalize_intensity, roi_around

    volume, labels = load_case(case)
    grid = WorkingGrid.for_volume(volume, spacing_mm)
    image = grid.to_working(normalize_intensity(volume.array, case.modality))
    labels = np.rint(grid.to_working(labels.astype(np.float32), order=0)).astype(np.int64)
    labels[np.isin(labels, list(unseen))] = 0
    roi = roi_around(labels > 0, 0.0, CROP_MARGIN_VOXELS, (1, 1, 1)) or tuple(slice(0, n) for n in labels.shape)
    image, labels = image[roi], labels[roi]
    labels = labels.astype(np.uint8 if labels.max() < 256 else np.uint16)
    names = {str(value): name for value, name in case.labels if value not in unseen}
    entry = {
        "id": case.id, "collection": case.collection, "modality": case.modality, "split": split,
        "file": f"cases/{case.id}.npz", "spacing_ijk": list(grid.working_spacing_ijk), "shape_kji": list(labels.shape),
        "labels": names, "structures": structure_boxes(labels, [int(v) for v in names], np.random.default_rng(0)),
    }
    return entry, image.astype(np.float16), labels


def prepare_cache(manifest: str | Path, out_dir: str | Path, spacing_mm: float = 1.0, log=print) -> Path:
    """Preprocess the training and validation cases of `manifest` into `out_dir`; returns the index path."""
    cases, document = read_manifest(manifest)
    splits = document.get("splits", {})
    unseen = {case_id: {int(v) for v in values} for case_id, values in document.get("unseen_labels", {}).get("cases", {}).items()}
    out_dir = Path(out_dir)
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    entries = []
    for number, case in enumerate(cases, 1):
        split = case_split(case.id, splits)
        if split is None:
            continue
        entry, image, labels = _prepare_case(case, split, unseen.get(case.id, set()), spacing_mm)
        np.savez_compressed(out_dir / entry["file"], image=image, labels=labels)
        entries.append(entry)
        log(f"[{number}/{len(cases)}] {case.id} ({split}): {labels.shape}, {len(entry['structures'])} structures")
    index = {
        "version": CACHE_VERSION, "manifest": str(Path(manifest).resolve()), "spacing_mm": spacing_mm,
        "unseen_labels": {k: sorted(v) for k, v in unseen.items()}, "cases": entries,
    }
    path = out_dir / "index.json"
    path.write_text(json.dumps(index, indent=1) + "\n")
    return path


def trim_cache(source: str | Path, destination: str | Path, max_bytes: int, seed: int = 0) -> dict[str, int]:
    """A copy of the cache at `source` in at most `max_bytes`, for a bundle with a size limit (the lent
    GPU's 64 MiB): training cases leave one at a time, at random, from whichever collection has the most
    left, so the smaller collections and every validation case stay. Files are hard links where the
    file system allows. Returns the training cases dropped per collection."""
    source, destination = Path(source), Path(destination)
    if destination.resolve() == source.resolve() or destination.resolve() in source.resolve().parents:
        raise InputError(f"the trimmed cache {destination} would replace its source {source}: give another folder")
    index = read_index(source)
    entries = list(index["cases"])
    sizes = {entry["id"]: (source / entry["file"]).stat().st_size for entry in entries}
    rng = np.random.default_rng(seed)
    dropped: dict[str, int] = {}

    def total() -> int:
        return sum(sizes[entry["id"]] for entry in entries) + len(json.dumps(index | {"cases": entries}))

    while total() > max_bytes:
        training: dict[str, list[dict]] = {}
        for entry in entries:
            if entry["split"] == TRAIN:
                training.setdefault(entry["collection"], []).append(entry)
        collection, members = max(training.items(), key=lambda item: len(item[1]), default=(None, []))
        if len(members) < 2:
            raise InputError(f"{source} does not fit in {max_bytes / 2**20:.1f} MiB with a training case of each collection")
        entries.remove(members[int(rng.integers(len(members)))])
        dropped[collection] = dropped.get(collection, 0) + 1
    if destination.exists():
        shutil.rmtree(destination)
    (destination / "cases").mkdir(parents=True)
    for entry in entries:
        try:
            os.link(source / entry["file"], destination / entry["file"])
        except OSError:
            shutil.copy2(source / entry["file"], destination / entry["file"])
    (destination / "index.json").write_text(json.dumps(index | {"cases": entries}))
    return dropped


FRAME_SCALE_JITTER = (0.8, 1.2)  # framed patches: the structure's size varies as prompted extents do


@dataclass
class CachedCase:
    id: str
    collection: str
    spacing_ijk: tuple[float, float, float]
    image: np.ndarray  # float32 [k, j, i]
    labels: np.ndarray  # integer [k, j, i]
    structures: dict[int, dict]  # value -> "lo", "hi" (inclusive [k, j, i] bounds), "anchors" (voxels inside)


def read_index(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise InputError(f"no training cache at {cache_dir}: run `weakicl train --prepare` first")
    index = json.loads(path.read_text())
    if index.get("version") != CACHE_VERSION:
        raise InputError(f"training cache {cache_dir} has version {index.get('version')}, expected {CACHE_VERSION}: prepare it again")
    return index


def load_cases(cache_dir: str | Path, split: str, limit: int | None = None) -> list[CachedCase]:
    """Cases of one split from the cache (numpy only), at most `limit`, in index order."""
    cache_dir = Path(cache_dir)
    cases = []
    for entry in read_index(cache_dir)["cases"]:
        if entry["split"] != split or (limit is not None and len(cases) >= limit):
            continue
        with np.load(cache_dir / entry["file"]) as arrays:
            image, labels = arrays["image"].astype(np.float32), arrays["labels"]
        structures = {int(v): {key: np.array(box[key]) for key in ("lo", "hi", "anchors")}
                      for v, box in entry["structures"].items() if box["voxels"] >= MIN_CLASS_VOXELS}
        cases.append(CachedCase(entry["id"], entry["collection"], tuple(entry["spacing_ijk"]), image, labels, structures))
    return cases


class CachedSubjects:
    """Draws real subjects for episodes: a collection, one of its structures, a target and references.

    Patches are centred near the structure with a random offset and scale; structures larger than the
    patch are sometimes zoomed out to fit whole. With `frame_fill`, every structure is scaled so that its
    longest side fills about that fraction of the patch, as the engine frames prompted structures
    (`weakicl.framing`). Flips are shared by all subjects of an episode;
    intensity changes are per subject. References come from other subjects of the same collection
    with the structure; a collection with one such subject uses other crops of the same volume.
    """

    def __init__(self, cases: list[CachedCase], patch_size: tuple[int, int, int], collection_weights: dict | None = None,
                 fit_fraction: float = 0.5, frame_fill: float | None = None) -> None:
        if not cases:
            raise InputError("the training cache holds no training cases")
        self.cases = cases
        self.patch = np.array(patch_size)
        self.fit_fraction = fit_fraction
        self.frame_fill = frame_fill
        self.tasks: dict[str, dict[int, list[int]]] = {}
        for number, case in enumerate(cases):
            for value in case.structures:
                self.tasks.setdefault(case.collection, {}).setdefault(value, []).append(number)
        weights = collection_weights or {}
        self.collections = sorted(self.tasks)
        self.collection_p = np.array([float(weights.get(name, 1.0)) for name in self.collections])
        self.collection_p /= self.collection_p.sum()

    def draw(self, rng: np.random.Generator, references: int) -> Subjects:
        collection = self.collections[int(rng.choice(len(self.collections), p=self.collection_p))]
        values = sorted(self.tasks[collection])
        value = values[int(rng.integers(len(values)))]
        holders = self.tasks[collection][value]
        target = holders[int(rng.integers(len(holders)))]
        others = [n for n in holders if n != target] or [target]
        chosen = [target] + [others[int(i)] for i in rng.choice(len(others), size=references, replace=references > len(others))]
        flips = [axis for axis in range(3) if rng.random() < 0.5]
        images, labels, scales = [], [], []
        for number in chosen:
            image, label, scale = self._patch(self.cases[number], value, rng)
            scales.append(scale)
            if flips:
                image, label = np.flip(image, flips), np.flip(label, flips)
            image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
            images.append(np.ascontiguousarray(image, dtype=np.float32))
            labels.append(np.ascontiguousarray(label))
        spacing = tuple(float(s) * scales[0] for s in self.cases[target].spacing_ijk)
        return Subjects(images, labels, [self.cases[n].id for n in chosen], spacing, primary=value)

    def _patch(self, case: CachedCase, value: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
        """Image, labels and scale (cache voxels per patch voxel) of a patch around structure `value`."""
        structure = case.structures[value]
        lo, hi, anchors = structure["lo"], structure["hi"], structure["anchors"]
        extent = hi - lo + 1
        if self.frame_fill is not None:
            scale = extent.max() / (self.frame_fill * self.patch.min()) * rng.uniform(*FRAME_SCALE_JITTER)
        elif extent.max() > 0.85 * self.patch.min() and rng.random() < self.fit_fraction:
            scale = extent.max() * 1.15 / self.patch.min()
        else:
            scale = rng.uniform(0.85, 1.15)
        slack = (self.patch * scale - extent) / 2
        if (slack > 0).all():  # the whole structure fits: shift it around inside the patch
            centre = (lo + hi) / 2 + rng.uniform(-0.8, 0.8, 3) * slack
        else:  # centre on a voxel of the structure, so the patch always holds part of it
            centre = anchors[int(rng.integers(len(anchors)))] + rng.uniform(-0.25, 0.25, 3) * self.patch * scale
        offset = centre - (self.patch - 1) / 2 * scale
        shape = tuple(int(p) for p in self.patch)
        image = ndimage.affine_transform(case.image, np.full(3, scale), offset, shape, order=1, mode="nearest")
        labels = ndimage.affine_transform(case.labels, np.full(3, scale), offset, shape, order=0, mode="nearest")
        return image, labels, scale
