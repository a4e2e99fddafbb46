"""The evaluation protocols: what every method is given for one structure and how it is scored.

Prompts and context subjects are derived from the labels with a generator seeded by (seed, case,
label), so every method, and every rerun, sees exactly the same prompts.
"""

from __future__ import annotations

import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, WeakICLError
from ..preprocess import bounding_box
from ..prompts import Box, Point, PromptSet
from ..simulation import corrective_click, interior_points, slice_boxes, slice_fractions
from ..volume import Volume
from . import SLICE_AXES
from .manifest import Structure, load_case, structure_mask
from .metrics import Scores, click_curve_area, dice, score

CROSS = ("cross-weak", "cross-dense")
FAR_FROM_CLICK_MM = 20.0  # a correction should leave the segmentation this far from its click alone
PREVIEW_MARGIN = 8  # voxels around the structure kept for the qualitative figure


@dataclass(frozen=True)
class Settings:
    """One protocol variant; `k` matters for the cross protocols and for interactive from cross-weak."""

    protocol: str
    slices: int = 3
    prompt_kind: str = "boxes"
    k: int = 1
    start: str = "propagate"
    clicks: int = 5
    seed: int = 0
    jitter: float = 0.0  # each box side moves by up to this fraction of the box, clicks land off-centre, as hands draw them
    context_collection: str = "same"  # "other": context subjects from another collection (CT for MR and back)
    slice_axis: str = "k"  # the IJK axis annotated slices cut across (SLICE_AXES; k: axial in axially acquired scans)

    @property
    def uses_context_subjects(self) -> bool:
        return self.protocol in CROSS or (self.protocol == "interactive" and self.start == "cross-weak")

    @property
    def label(self) -> str:
        """Short human name, also the key of this variant in results.json."""
        prompts = (f"{self.slices} {'box' if self.prompt_kind == 'boxes' else 'point'} slice{'s' if self.slices > 1 else ''}"
                   if self.prompt_kind != "box3d" else "a 3D box")
        if self.slice_axis != "k" and self.prompt_kind != "box3d":
            prompts += f" across {self.slice_axis}"
        if self.jitter:
            prompts += f", jitter {self.jitter:g}"
        if self.protocol == "propagate":
            return f"propagate ({prompts})"
        if self.protocol in CROSS:
            source = ", other collection" if self.context_collection == "other" else ""
            return f"{self.protocol} (k={self.k}{source})"
        start = f"cross-weak k={self.k}" if self.start == "cross-weak" else f"propagate, {prompts}"
        return f"interactive ({start}, {self.clicks} click{'s' if self.clicks != 1 else ''})"


def structure_rng(settings: Settings, structure: Structure, stream: int = 0) -> np.random.Generator:
    """The structure's seeded generator; `stream` 1 draws its clicks apart from its prompts (0)."""
    return np.random.default_rng([settings.seed, zlib.crc32(structure.key.encode())] + ([stream] if stream else []))


def target_prompts(mask: np.ndarray, settings: Settings, rng: np.random.Generator) -> PromptSet:
    """Boxes on the protocol's slices across `settings.slice_axis` (k, array axis 0, by default), tight or
    loosened/tightened by `jitter`, or one interior point on each of them, or (box3d) one box around the
    whole structure, as an ROI is placed."""
    if settings.prompt_kind == "box3d":
        if settings.jitter:
            raise InputError("--jitter moves slice boxes and clicks; a 3D box is drawn tight (--prompt-kind box3d)")
        lo_kji, hi_kji = bounding_box(mask)
        return PromptSet(boxes=[Box(tuple(lo_kji[::-1].astype(float)), tuple(hi_kji[::-1].astype(float)))])
    axis_kji = SLICE_AXES.index(settings.slice_axis)
    boxes = slice_boxes(mask, slice_fractions(settings.slices), axis=axis_kji, jitter=settings.jitter, rng=rng)
    if settings.prompt_kind == "boxes":
        return boxes
    points = []
    for box in boxes.boxes:
        position = int(round(box.lo_ijk[2 - axis_kji]))
        section = np.expand_dims(np.take(mask, position, axis=axis_kji), axis_kji)
        (point,) = interior_points(section, 1, rng)  # in-plane distance, so the point is central on its slice
        ijk = list(point.ijk)
        ijk[2 - axis_kji] = float(position)
        points.append(Point(tuple(ijk), True))
    return PromptSet(points=points)


def context_subjects(structure: Structure, pool: list[Structure], settings: Settings) -> list[Structure]:
    """`k` other subjects with the same structure, of the same collection (or, with
    `context_collection="other"`, of another one: another modality), chosen by the seeded generator.

    The order is a seeded permutation, so the k=1 subject is the first of the k=3 subjects.
    """
    same = settings.context_collection == "same"
    candidates = sorted(
        (other for other in pool
         if other.case.id != structure.case.id and (other.case.collection == structure.case.collection) == same
         and other.name == structure.name and other.group == structure.group),
        key=lambda other: other.key)
    order = structure_rng(settings, structure).permutation(len(candidates))
    return [candidates[index] for index in order[: settings.k]]


@dataclass
class Trial:
    """Everything a method may use for one structure under one protocol (never the truth itself)."""

    structure: Structure
    volume: Volume
    prompts: PromptSet | None
    context: list[tuple[Volume, PromptSet | np.ndarray]]


class NotApplicable(Exception):
    """A method cannot run under these settings (e.g. a baseline without a target prompt)."""


class Method(ABC):
    """A segmentation method under evaluation; `segment` must not depend on earlier calls' state
    except through `previous` (so methods are comparable click by click)."""

    name: str

    def check(self, settings: Settings) -> None:
        """Raise NotApplicable with the reason when this method has no meaningful answer here."""

    @abstractmethod
    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        """Binary [k, j, i] mask of the structure on the trial's volume."""

    def describe(self) -> dict:
        """What results.json should record about this method's configuration."""
        return {}


@dataclass
class Record:
    """The outcome of one method on one structure under one protocol variant."""

    structure: Structure
    method: str
    setting: str
    status: str  # "ok", "n/a" or "failed"
    reason: str = ""
    scores: Scores | None = None
    seconds: float | None = None
    click_dice: list[float] = field(default_factory=list)
    clicks_honoured: list[bool] = field(default_factory=list)  # each click's voxel ends on the click's side
    far_dice_change: list[float] = field(default_factory=list)  # Dice change beyond FAR_FROM_CLICK_MM of each click
    preview: dict | None = None  # one axial slice of image, truth and prediction, for figures only

    @property
    def auc(self) -> float | None:
        return click_curve_area(self.click_dice) if self.click_dice else None

    def as_dict(self) -> dict:
        entry = {"case": self.structure.case.id, "collection": self.structure.case.collection,
                 "group": self.structure.group, "label": self.structure.value, "structure": self.structure.name,
                 "method": self.method, "setting": self.setting, "status": self.status}
        if self.reason:
            entry["reason"] = self.reason
        if self.scores is not None:
            entry.update(dice=self.scores.dice, hd95_mm=self.scores.hd95, nsd=self.scores.nsd, seconds=self.seconds)
        if self.click_dice:
            entry.update(dice_after_click=self.click_dice, click_auc=self.auc)
        if self.clicks_honoured:
            entry.update(clicks_honoured=self.clicks_honoured, far_dice_change=self.far_dice_change)
        return entry


def build_trial(structure: Structure, settings: Settings, pool: list[Structure]) -> Trial:
    """Target prompts (propagate, interactive from propagate) or context subjects (cross protocols)."""
    volume, _ = load_case(structure.case)
    if not settings.uses_context_subjects:
        prompts = target_prompts(structure_mask(structure), settings, structure_rng(settings, structure))
        return Trial(structure, volume, prompts, [(volume, prompts)])
    subjects = context_subjects(structure, pool, settings)
    if len(subjects) < settings.k:
        raise NotApplicable(f"fewer than {settings.k} other subject(s) of the {settings.context_collection} collection have this structure")
    dense = settings.protocol == "cross-dense"
    context = []
    for subject in subjects:
        mask = structure_mask(subject)
        context.append((load_case(subject.case)[0],
                        mask if dense else target_prompts(mask, settings, structure_rng(settings, subject))))
    return Trial(structure, volume, None, context)


def evaluate(method: Method, structure: Structure, settings: Settings, pool: list[Structure]) -> Record:
    """Run one method on one structure: one prediction, then (interactive) up to `clicks` corrections.

    `seconds` counts the method's own calls only, not the click simulation or the metrics.
    """
    record = Record(structure, method.name, settings.label, "ok", seconds=0.0)
    truth = structure_mask(structure)

    def timed(trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        started = time.perf_counter()
        mask = np.asarray(method.segment(trial, clicks, previous), dtype=bool)
        record.seconds += time.perf_counter() - started
        return mask

    try:
        method.check(settings)
        trial = build_trial(structure, settings, pool)
        prediction = timed(trial, [], None)
        if settings.protocol == "interactive":
            record.click_dice = [dice(prediction, truth)]
            clicks: list[Point] = []
            click_rng = structure_rng(settings, structure, stream=1)
            while len(record.click_dice) <= settings.clicks:
                click = corrective_click(prediction, truth, settings.jitter, click_rng)
                if click is not None:  # once nothing is left to correct the curve stays flat
                    clicks.append(click)
                    before = prediction
                    prediction = timed(trial, list(clicks), prediction)
                    record.clicks_honoured.append(bool(prediction[_voxel(click)]) == click.positive)
                    far = _far_from(click, trial.volume.geometry)
                    record.far_dice_change.append(dice(prediction & far, truth & far) - dice(before & far, truth & far))
                record.click_dice.append(dice(prediction, truth))
    except NotApplicable as reason:
        return Record(structure, method.name, settings.label, "n/a", str(reason))
    except WeakICLError as error:
        return Record(structure, method.name, settings.label, "failed", str(error))
    record.scores = score(prediction, truth, trial.volume.geometry.spacing[::-1])
    record.preview = _preview(trial.volume.array, truth, prediction)
    return record


def _voxel(point: Point) -> tuple[int, int, int]:
    return tuple(int(round(c)) for c in point.ijk[::-1])


def _far_from(point: Point, geometry) -> np.ndarray:
    """Voxels farther than FAR_FROM_CLICK_MM from a click: where a correction should change nothing."""
    axes = np.ogrid[tuple(slice(0, n) for n in geometry.shape_kji)]
    squared = sum(((axis - centre) * spacing) ** 2
                  for axis, centre, spacing in zip(axes, point.ijk[::-1], geometry.spacing[::-1]))
    return squared > FAR_FROM_CLICK_MM**2


def _preview(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> dict:
    """The axial slice through the structure's centre, cropped around it, for the qualitative figure."""
    corners = np.argwhere(truth)
    k = int(round(corners[:, 0].mean()))
    lo = np.maximum(corners.min(axis=0)[1:] - PREVIEW_MARGIN, 0)
    hi = corners.max(axis=0)[1:] + PREVIEW_MARGIN + 1
    region = (k, slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    return {"image": image[region].astype(np.float32), "truth": truth[region], "prediction": prediction[region]}
