"""In-context training episodes: a target, a reference set and the prompts a person would give.

Three modes, mixed at random:
- propagate: the reference is the target volume itself with weak prompts (slice boxes, a 3D box,
  points); the same prompts are the target prompts; the label is the full mask.
- cross: references are other subjects of the same task with weak prompts or dense masks; no target prompts.
- atlas: cross, plus the references' annotations moved onto the target as a soft prior in the mask
  channel, as registering the references to the target does at inference (`weakicl.registration`).
- correction: propagate or cross, plus a previous mask (corrupted truth, or the model's own prediction
  when the training loop supplies one) and 1-3 corrective clicks of the challenge protocol.

An episode may hold several classes of one target (Iris' class stacking): the classes are a random subset
of the structures present (random class dropping), sometimes a union of two (label merging).
Deterministic for a given `numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
from scipy import ndimage

from ..preprocess import normalize_intensity
from ..prompts import MASK_CHANNEL, POINT_RADIUS_MM, PROMPT_CHANNELS, Box, Point, PromptSet, foreground_prior, mask_channels, rasterize
from ..simulation import FULL_CONNECTIVITY, background_points, corrective_click, interior_points, slice_boxes, slice_fractions
from ..volume import Geometry
from .synthetic import SyntheticTasks

MODES = ("propagate", "cross", "atlas", "correction")
PROMPT_STYLES = ("slice_boxes", "box3d", "points", "boxes_points")
MIN_CLASS_VOXELS = 20
DRAW_ATTEMPTS = 5
POINT_CHANNELS = [PROMPT_CHANNELS.index("positive"), PROMPT_CHANNELS.index("negative")]
ATLAS_SHIFT_VOXELS = (0.5, 2.5)  # range of the registration error's spread at the structure, per axis
ATLAS_SCALE_JITTER = 0.1


@dataclass
class EpisodeConfig:
    """How episodes are drawn; every probability is a weight or a fraction in [0, 1]."""

    mode_weights: dict = field(default_factory=lambda: {"propagate": 0.4, "cross": 0.35, "correction": 0.25})
    prompt_weights: dict = field(default_factory=lambda: {"slice_boxes": 0.45, "box3d": 0.15, "points": 0.2, "boxes_points": 0.2})
    synthetic_fraction: float = 0.5
    synthetic_anatomies: int = 5000
    similar_contrast_fraction: float = 0.0  # synthetic subjects with look-alike neighbours (`synthetic.with_look_alikes`)
    max_classes: int = 3
    max_references: int = 4
    dense_reference_fraction: float = 0.4
    merge_fraction: float = 0.1
    max_clicks: int = 3
    box_jitter: float = 0.1
    point_radius_mm: float = POINT_RADIUS_MM
    fit_fraction: float = 0.5
    frame_fill: float | None = None  # real patches: the structure's longest side fills this fraction (inference framing)
    axis_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)
    atlas_shift_voxels: tuple[float, float] = ATLAS_SHIFT_VOXELS  # atlas episodes: the registration error's spread
    atlas_scale_jitter: float = ATLAS_SCALE_JITTER  # ... and the prior's size error

    def __post_init__(self) -> None:
        for name, weights, allowed in (("mode_weights", self.mode_weights, MODES), ("prompt_weights", self.prompt_weights, PROMPT_STYLES)):
            unknown = set(weights) - set(allowed)
            if unknown or sum(weights.values()) <= 0:
                raise ValueError(f"{name} needs positive weights over {allowed}, got {weights}")
        self.axis_weights = tuple(float(w) for w in self.axis_weights)
        self.atlas_shift_voxels = tuple(float(v) for v in self.atlas_shift_voxels)
        if min(self.max_classes, self.max_references, self.max_clicks) < 1:
            raise ValueError("max_classes, max_references and max_clicks must be at least 1")


@dataclass
class Subjects:
    """Patches of one task: index 0 is the target, the rest are reference subjects (same grid)."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    ids: list[str]
    spacing_ijk: tuple[float, float, float]  # of the target patch, for point radii in mm
    primary: int | None = None  # the label the task was drawn for; None: any label present


class SubjectSource(Protocol):
    def draw(self, rng: np.random.Generator, references: int) -> Subjects:
        """A target and `references` other subjects (0 for in-volume propagation)."""


@dataclass
class Episode:
    """One in-context problem on patches of identical shape.

    `images[0]` is the target; `references` index into `images` (propagation reuses the target, so its
    features are computed once). Prompt arrays follow PROMPT_CHANNELS.
    """

    images: np.ndarray  # (M, D, H, W) float32
    references: list[int]
    ref_prompts: np.ndarray  # (C, R, 5, D, H, W) float32
    target_prompts: np.ndarray  # (C, 5, D, H, W) float32
    masks: np.ndarray  # (C, D, H, W) bool
    mode: str
    ids: list[str]
    spacing_ijk: tuple[float, float, float]
    values: list[tuple[int, ...]]  # label values making up each class (a union when merged)
    base_prompts: np.ndarray | None = None  # target prompts before the correction inputs were added

    @property
    def classes(self) -> int:
        return self.masks.shape[0]


def _choose(rng: np.random.Generator, weights: dict) -> str:
    names = list(weights)
    values = np.array([weights[name] for name in names], dtype=float)
    return names[int(rng.choice(len(names), p=values / values.sum()))]


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float) -> Box:
    """The structure's 3D bounding box, each side moved by up to `jitter` of the extent (IJK corners)."""
    coordinates = np.argwhere(mask)
    lo, hi = coordinates.min(axis=0).astype(float), coordinates.max(axis=0).astype(float)
    size = hi - lo + 1
    lo = np.clip(lo - rng.uniform(-jitter, jitter, 3) * size, 0, np.array(mask.shape) - 1)
    hi = np.clip(hi + rng.uniform(-jitter, jitter, 3) * size, lo, np.array(mask.shape) - 1)
    return Box(tuple(lo[::-1]), tuple(hi[::-1]))


def random_slice_boxes(mask: np.ndarray, rng: np.random.Generator, axis_weights, jitter: float) -> PromptSet:
    """Boxes on 1-3 random slices of a random view, spread over the structure, jittered 0-`jitter` per side."""
    axis = int(rng.choice(3, p=np.asarray(axis_weights) / np.sum(axis_weights)))
    count = int(rng.integers(1, 4))
    edges = np.linspace(0.05, 0.95, count + 1)
    fractions = [rng.uniform(edges[n], edges[n + 1]) for n in range(count)]
    return slice_boxes(mask, fractions, axis=axis, jitter=rng.uniform(0, jitter), rng=rng)


def random_points(mask: np.ndarray, rng: np.random.Generator, positives: int, negatives: int) -> list[Point]:
    return interior_points(mask, positives, rng) + background_points(mask, negatives, rng, margin_vox=int(rng.integers(2, 7)))


def simulate_prompts(mask: np.ndarray, rng: np.random.Generator, config: EpisodeConfig) -> PromptSet:
    """Weak prompts of one structure drawn the way people draw them (style chosen by `prompt_weights`)."""
    style = _choose(rng, config.prompt_weights)
    if style == "slice_boxes":
        return random_slice_boxes(mask, rng, config.axis_weights, config.box_jitter)
    if style == "box3d":
        return PromptSet(boxes=[jittered_box(mask, rng, config.box_jitter)])
    if style == "points":
        return PromptSet(points=random_points(mask, rng, int(rng.integers(1, 6)), int(rng.integers(0, 4))))
    boxes = random_slice_boxes(mask, rng, config.axis_weights, config.box_jitter)
    return boxes + PromptSet(points=random_points(mask, rng, int(rng.integers(1, 3)), int(rng.integers(0, 3))))


def corrupt_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible earlier segmentation: grown or shrunk, shifted, cut short, with a stray blob, or empty."""
    mask = np.asarray(mask, dtype=bool)
    if rng.random() < 0.1:
        return np.zeros_like(mask)
    previous = mask.copy()
    if rng.random() < 0.5:
        grow = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
        previous = grow(previous, iterations=int(rng.integers(1, 3)))
    if rng.random() < 0.4:
        previous = np.roll(previous, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    if rng.random() < 0.5:
        axis = int(rng.integers(3))
        extent = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        cut = int(rng.integers(extent[0], extent[-1] + 1))
        keep = np.arange(mask.shape[axis]) < cut if rng.random() < 0.5 else np.arange(mask.shape[axis]) >= cut
        previous &= keep.reshape([-1 if a == axis else 1 for a in range(3)])
    if rng.random() < 0.4:
        (point,) = background_points(mask, 1, rng, margin_vox=6) or [None]
        if point is not None:
            blob = np.zeros_like(mask)
            blob[tuple(int(c) for c in point.ijk[::-1])] = True
            previous |= ndimage.binary_dilation(blob, iterations=int(rng.integers(1, 4)))
    return previous


def corrective_clicks(previous: np.ndarray, truth: np.ndarray, count: int) -> list[Point]:
    """Up to `count` protocol clicks; after each, the error component it addressed counts as fixed."""
    previous, truth = np.asarray(previous, dtype=bool).copy(), np.asarray(truth, dtype=bool)
    clicks = []
    for _ in range(count):
        click = corrective_click(previous, truth)
        if click is None:
            break
        clicks.append(click)
        components, _ = ndimage.label(previous ^ truth, FULL_CONNECTIVITY)
        fixed = components == components[tuple(int(c) for c in click.ijk[::-1])]
        previous[fixed] = truth[fixed]
    return clicks


def simulated_atlas_prior(sources: list[np.ndarray], reference_masks: list[np.ndarray], target_mask: np.ndarray, rng: np.random.Generator,
                          shift_voxels: tuple[float, float] = ATLAS_SHIFT_VOXELS, scale_jitter: float = ATLAS_SCALE_JITTER) -> np.ndarray:
    """What registering the references onto the target gives: each reference annotation (`sources`, in
    [0, 1] on its own patch) moved so that its structure lands near the target's (centre within a spread
    drawn from `shift_voxels` per axis, size within `scale_jitter`), averaged over the references."""
    target_centre = np.argwhere(target_mask).mean(axis=0)
    target_size = np.cbrt(target_mask.sum())
    moved, spread = [], rng.uniform(*shift_voxels)
    for source, mask in zip(sources, reference_masks):
        scale = np.cbrt(mask.sum()) / target_size * rng.uniform(1 - scale_jitter, 1 + scale_jitter)
        landing = target_centre + rng.normal(0, spread, 3)
        offset = np.argwhere(mask).mean(axis=0) - scale * landing  # output voxel x samples the source at scale * x + offset
        moved.append(ndimage.affine_transform(source, np.full(3, scale), offset, order=1, mode="constant"))
    return np.clip(np.mean(moved, axis=0), 0.0, 1.0).astype(np.float32)


def with_corrections(episode: Episode, previous: np.ndarray, rng: np.random.Generator, config: EpisodeConfig) -> None:
    """Put previous masks (C,D,H,W) and 1..max_clicks corrective clicks into the target prompts, in place."""
    base = episode.base_prompts if episode.base_prompts is not None else episode.target_prompts.copy()
    episode.base_prompts = base
    counts = [int(rng.integers(1, config.max_clicks + 1)) for _ in range(episode.classes)]
    _with_clicks(episode, base.copy(), previous, counts, config)


def with_next_click(episode: Episode, previous: np.ndarray, config: EpisodeConfig) -> None:
    """A correction episode's next round, in place: `previous` (C,D,H,W), the network's result with the
    clicks so far, becomes the mask channel and gets one more protocol click, the earlier clicks kept, as
    the evaluation places each click on the latest result."""
    _with_clicks(episode, episode.target_prompts.copy(), previous, [1] * episode.classes, config)


def _with_clicks(episode: Episode, prompts: np.ndarray, previous: np.ndarray, counts: list[int], config: EpisodeConfig) -> None:
    """`prompts` (C,5,D,H,W) with `previous` in the mask channel and up to `counts` protocol clicks per class
    added to the point channels, as the episode's target prompts."""
    geometry = Geometry.identity(episode.masks.shape[1:], episode.spacing_ijk)
    for index, count in enumerate(counts):
        prompts[index, MASK_CHANNEL] = previous[index]
        clicks = corrective_clicks(previous[index], episode.masks[index], count)
        if clicks:
            drawn = rasterize(PromptSet(points=clicks), geometry, config.point_radius_mm)
            prompts[index, POINT_CHANNELS] = np.maximum(prompts[index, POINT_CHANNELS], drawn[POINT_CHANNELS])
    episode.target_prompts = prompts


class EpisodeSampler:
    """Draws episodes from synthetic anatomies and (optionally) a source of real subjects."""

    def __init__(self, config: EpisodeConfig, patch_size: tuple[int, int, int], spacing_mm: float, seed: int, real: SubjectSource | None = None) -> None:
        self.config = config
        self.patch_size = tuple(int(p) for p in patch_size)
        self.spacing_ijk = (float(spacing_mm),) * 3
        self.synthetic = SyntheticTasks(self.patch_size, seed, config.synthetic_anatomies,
                                        similar_fraction=config.similar_contrast_fraction)
        self.real = real

    def draw_subjects(self, rng: np.random.Generator, references: int) -> Subjects:
        if self.real is None or rng.random() < self.config.synthetic_fraction:
            images, labels = self.synthetic.subjects(rng, references + 1)
            images = [normalize_intensity(image, "MR") for image in images]
            return Subjects(images, labels, [f"synthetic-{n}" for n in range(references + 1)], self.spacing_ijk)
        return self.real.draw(rng, references)

    def sample(self, rng: np.random.Generator) -> Episode:
        """One episode; correction episodes come with a corrupted-truth previous mask already applied."""
        mode = _choose(rng, self.config.mode_weights)
        if mode == "correction":  # drawn only here, so other modes keep the random stream they had
            base = "propagate" if rng.random() < 0.5 else "cross"
        else:
            base = "cross" if mode == "atlas" else mode
        references = 0 if base == "propagate" else int(rng.integers(1, self.config.max_references + 1))
        for _ in range(DRAW_ATTEMPTS):
            subjects = self.draw_subjects(rng, references)
            classes = self._classes(subjects, rng)
            if not classes and references:  # the structure is missing from a reference: propagate instead
                base = "propagate"
                subjects = replace(subjects, images=subjects.images[:1], labels=subjects.labels[:1], ids=subjects.ids[:1])
                classes = self._classes(subjects, rng)
            if classes:
                break
        else:
            raise RuntimeError(f"no structure of {MIN_CLASS_VOXELS}+ voxels in {DRAW_ATTEMPTS} patches (last: {subjects.ids[0]})")
        episode = self._build(subjects, classes, base, rng)
        if mode == "atlas" and base == "cross":
            episode.mode = mode
            for index, group in enumerate(classes):
                sources = [foreground_prior(episode.ref_prompts[index, slot]) for slot in range(len(episode.references))]
                reference_masks = [np.isin(subjects.labels[subject], group) for subject in episode.references]
                episode.target_prompts[index, MASK_CHANNEL] = simulated_atlas_prior(sources, reference_masks, episode.masks[index], rng,
                                                                                     self.config.atlas_shift_voxels, self.config.atlas_scale_jitter)
        if mode == "correction":
            episode.mode = mode
            with_corrections(episode, np.stack([corrupt_mask(m, rng) for m in episode.masks]), rng, self.config)
        return episode

    def _classes(self, subjects: Subjects, rng: np.random.Generator) -> list[tuple[int, ...]]:
        """Label groups present in every subject: a random subset (class dropping), sometimes a merged pair."""
        present = None
        for labels in subjects.labels:
            counts = np.bincount(labels.ravel())
            here = {int(v) for v in np.flatnonzero(counts >= MIN_CLASS_VOXELS) if v > 0}
            present = here if present is None else present & here
        candidates = sorted(present)
        if not candidates:
            return []
        rng.shuffle(candidates)
        if subjects.primary in candidates:
            candidates.remove(subjects.primary)
            candidates.insert(0, subjects.primary)
        chosen = candidates[: int(rng.integers(1, self.config.max_classes + 1))]
        groups = [(value,) for value in chosen]
        if len(candidates) > len(chosen) and rng.random() < self.config.merge_fraction:
            groups[0] = (chosen[0], candidates[len(chosen)])
        return groups

    def _build(self, subjects: Subjects, classes: list[tuple[int, ...]], base: str, rng: np.random.Generator) -> Episode:
        masks = [np.stack([np.isin(labels, group) for group in classes]) for labels in subjects.labels]
        geometry = Geometry.identity(self.patch_size, subjects.spacing_ijk)

        def weak(mask: np.ndarray) -> np.ndarray:
            return rasterize(simulate_prompts(mask, rng, self.config), geometry, self.config.point_radius_mm)

        if base == "propagate":
            prompts = np.stack([weak(mask) for mask in masks[0]])
            return Episode(subjects.images[0][None], [0], prompts[:, None], prompts.copy(), masks[0], base, subjects.ids[:1], subjects.spacing_ijk, classes)
        references = list(range(1, len(subjects.images)))
        channels = (len(classes), len(references), len(PROMPT_CHANNELS)) + self.patch_size
        ref_prompts = np.zeros(channels, dtype=np.float32)
        for slot, subject in enumerate(references):
            dense = rng.random() < self.config.dense_reference_fraction
            for index, mask in enumerate(masks[subject]):
                ref_prompts[index, slot] = mask_channels(mask) if dense else weak(mask)
        target_prompts = np.zeros((len(classes), len(PROMPT_CHANNELS)) + self.patch_size, dtype=np.float32)
        return Episode(np.stack(subjects.images), references, ref_prompts, target_prompts, masks[0], base, subjects.ids, subjects.spacing_ijk, classes)


def propagation_episode(image: np.ndarray, labels: np.ndarray, value: int, spacing_ijk: tuple[float, float, float], case_id: str, slices: int = 3) -> Episode:
    """The evaluation's propagate protocol for structure `value`: axial boxes at evenly spaced fractions of its extent."""
    mask = labels == value
    prompts = rasterize(slice_boxes(mask, slice_fractions(slices), axis=0), Geometry.identity(mask.shape, spacing_ijk))[None]
    return Episode(image[None].astype(np.float32), [0], prompts[:, None], prompts.copy(), mask[None], "propagate", [case_id], spacing_ijk, [(value,)])
