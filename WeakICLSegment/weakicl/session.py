"""Inference session in the spirit of segment-anything's predictor: encode the context once, segment
many targets, refine with prompts.

    segmenter = Segmenter()                                   # shipped weights, GPU when there is one
    task = segmenter.encode_context([(reference, prompts)])   # weak prompts or a dense mask; cached
    prediction = segmenter.segment(target, task)              # any other volume of the study (context aligned to it)
    prediction = segmenter.segment(target, task, target_prompts=boxes + clicks, previous=prediction.masks[0],
                                   new_prompts=clicks)                # a correction: only around the new clicks
Long calls take `progress=callback(fraction, message)`; raising from it (`errors.Cancelled`) stops the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from .adaptation import (APPEARANCE_LIMIT, APPEARANCE_WEIGHT, FEATURE_LEVELS, SUPPORT_LOGIT, SUPPORT_MARGIN_HU,
                         SUPPORT_MODALITIES, appearance_logits, appearance_labels, at_voxel, click_regions, face_neighbourhood,
                         nearest_voxel_kji, outside_support, support_range)
from .context_tuning import SEARCH_TUNING_MAX_SIDE, SearchReference, search_tokens
from .devices import device_name, resolve_device
from .errors import InputError
from .framing import Frame, FrameSpec, frame_around, frame_spacing, prompt_extent_kji
from .geodesic import BACKGROUND_GAP_MM, GEODESIC_WEIGHT, HULL_GAPS, ellipsoid_element, geodesic_margin, seed_labels
from .progress import ProgressCallback, silent
from .preprocess import (CT_UNITS_PER_NORMALIZED, WorkingGrid, bounding_box, detect_modality, linear_resample,
                         normalize_intensity, pad_to_multiple, roi_around, roi_from_bounds)
from .prompts import (MASK_CHANNEL, POINT_RADIUS_MM, PROMPT_CHANNELS, Box, Point, PromptSet, foreground_prior,
                      rasterize, widened_slice_box)
from .registration import AtlasItem, atlas_prior
from .simulation import FULL_CONNECTIVITY, largest_component, slice_boxes, slice_fractions
from .volume import Geometry, Volume, volume_digest

logger = logging.getLogger("weakicl")
ContextItem = tuple[Volume, "PromptSet | np.ndarray"]
ROI_MARGIN_FRACTION = 0.5
ROI_MARGIN_VOXELS = 12
MIN_WINDOW_OVERLAP_VOXELS = 16  # neighbouring windows share at least this many voxels, the fewest windows that do
# (a brain's cerebral structures: 12 windows at 16 or 24, Dice 0.4925; 27 at 48, 0.4882; reports/window-overlap-brain)
WINDOW_PATCHES = 3  # inference windows span up to this many training patches per axis
# a region of at most this many voxels is seen in one window, whatever its sides: every frame (at most
# FrameSpec.max_shape a side), as its context was encoded. Tiling a 48x128x120 frame into 4 windows of 96
# cost 2.4x its voxels (propagation 6.4 -> 3.9 s on the benchmark; tuning structures: 5 clicks 0.8129 ->
# 0.8122, propagation 0.7642 -> 0.7641, hippocampi identical; 0 tiles as before)
ONE_WINDOW_MAX_VOXELS = FrameSpec.max_shape**3
PREPARED_CACHE_SIZE = 4
DEVICE_IMAGE_CACHE_SIZE = 2  # the volume being corrected and the one before: a 512x512x300 CT is 0.3 GB there
TRANSFORM_CACHE_SIZE = 64
MAX_WINDOW_BATCH = 16
ALIGNMENT_SHARE = 0.2  # of a whole volume's progress bar: registering its context (the first class; later ones
# reuse it) or, without that, tuning the task to find each class alone
PRIOR_SEARCH_LEVEL = 0.05  # whole-volume windows cover where the aligned context's prior exceeds this
PRIOR_MARGIN_FRACTION = 0.25  # ... plus this fraction of its extent and ROI_MARGIN_VOXELS
CLICK_SEED_MM = 1.0  # a point prompt's ball that ends on its side (3 mm, GrowCut's seed radius, cost 0.017 on the hippocampus)
# a click on the previous result's border (its voxel or a face neighbour already of the other side) moves
# the border at the click only: the errors a click there points at are one voxel thick, and recomputing the
# neighbourhood changed 1.1-3.4 voxels wrongly for each right one (tuning: hippocampi after 5 clicks
# 0.858 -> 0.869, other 0.810 -> 0.813; its neighbours too (1 voxel): 0.864, 0.807). False: recompute.
BORDER_CLICKS_LOCAL = True
CORRECTION_REACH_VOXELS = 10  # frame voxels around a new prompt that a correction recomputes, before margins
# ... and the frame voxels of context the network sees beyond that (a 48³ frame for a lone click; tuning
# structures after 5 clicks, other / hippocampi: 12 0.8122 / 0.8691, 8 0.8110 / 0.8693 (40³), 5 0.8110 / 0.8674
# (32³); timed before the oneDNN convolutions, where 40³ was no faster than 48³ on 2 CPU cores and 32³ 0.17 s faster)
CORRECTION_MARGIN_VOXELS = 12
TASK_CACHE_SIZE = 32  # tasks keep their references (atlas items): bounded memory
# the box hull goes on this fraction of a box gap past the outermost slice boxes (the structure does):
# 18 unseen structures 0.680 -> 0.724 (a whole gap: 0.735, but the hippocampus lost 0.005; reports/ablations;
# since, hippocampi on 6 mm slices lose more, reports/ablations-0.6-thick6). Where the image ends within a
# gap, the hull goes on to its edge (`prompts.EDGE_REACH_GAPS`) and past it (`padded_prompts`)
HULL_EXTENSION_GAPS = 0.6
CONTINUING_CHANNELS = [PROMPT_CHANNELS.index(name) for name in ("box_hull", "mask")]  # see `padded_prompts`
# whole volumes: slice boxes drawn around what the first pass holds at least this sure, then propagated
# (cross-weak k=1, 20 tuning hippocampi: 0.739 -> 0.762 / 0.777 / 0.776 / 0.770 at 0.5 / 0.7 / 0.8 / 0.9,
# HD95 4.1 -> 4.4 / 4.0 / 3.7 / 3.6 mm); None: the first pass stands
OWN_BOX_LEVEL: float | None = 0.8
# ... and kept where its mask agrees with the first pass's at least this much (Dice). Chosen on training tasks
# (`python scripts/own_boxes.py`, reports/own-boxes): the tuning hippocampi agree at 0.82-0.90 and gain
# (0.739 -> 0.777); with the other modality as context (abdominal CT <-> MR) cross-weak 0.284 -> 0.301 and
# cross-dense 0.345 -> 0.346 at 0.75, 0.283 and 0.316 if kept everywhere; the brain MR's cerebral cortex,
# a sheet that boxes fit badly, agrees at 0.74 and loses 0.13-0.16 where kept (brain 0.503 -> 0.455 at 0.7)
OWN_BOX_AGREEMENT = 0.75
# the own-box pass runs again from the boxes of its result, and is kept where it agrees with that result at
# least OWN_BOX_REFINE_AGREEMENT: a refinement, not a new answer. Cross-weak k=1, 20 tuning hippocampi 0.779 ->
# 0.782 (kept at any agreement, a throwaway patch: 0.786, but the abdominal CT's liver from the MR's label lost 0.10);
# abdominal CT <-> MR cross-dense 0.335 -> 0.336, cross-weak unchanged
# (`python scripts/own_boxes.py`, reports/own-boxes-rounds)
OWN_BOX_ROUNDS = 2
OWN_BOX_REFINE_AGREEMENT = 0.9
# own slice boxes, evenly spaced over the extent (`simulation.slice_fractions`): more than a user draws (same
# trials, with 2 rounds; 3 as the evaluation's / 4 / 5): tuning hippocampi 0.782 / 0.790 / 0.787, abdominal
# CT <-> MR cross-weak 0.280 / 0.298 / 0.295 and cross-dense 0.336 / 0.346 / 0.342, but the brain MR's
# cerebral sheets 0.503 / 0.479 / 0.454 (`python scripts/own_boxes.py`, reports/own-boxes-rounds)
OWN_BOX_SLICES = 4
# points alone say where a structure is, not how far it reaches: prompted by points only, the network outlines
# little of it (one central point on each of 3 slices, tuning structures: other 0.338, hippocampi 0.690). So
# slice boxes are drawn around what that pass holds at each positive point, on the points' own slices, and
# propagated with the points (the boxes' probe and competition), this many times: other structures 0.338 ->
# 0.444 -> 0.464 (3 rounds 0.473), hippocampi 0.690 -> 0.788 -> 0.780 (0.781) for 1 and 2 rounds
# (`python scripts/point_boxes.py`, reports/point-boxes); 0: the first pass stands
POINT_BOX_ROUNDS = 2
# points alone have no background seeds, so their own pass had no seed competition and stayed a blob around the
# points (a CT liver: 1,519 of 38,634 voxels). There the frame's outer band of this many frame voxels is the
# background (the frame reaches half the points' extent and 12 voxels past them): tuning structures from one
# central point on each of 3 slices, other 0.464 -> 0.558, hippocampi 0.780 -> 0.784 (1: 0.520 / 0.777, 2: 0.525 /
# 0.778, 4: 0.532 / 0.780, 6: 0.545 / 0.796, 8: 0.498 / 0.789; `python scripts/with_constants.py
# POINT_BACKGROUND_BAND_VOXELS=None -- evaluate --tuning --protocol propagate --prompt-kind points ...`); None: no competition
POINT_BACKGROUND_BAND_VOXELS = 5
# ... and a correction of such a result (or of a 3D box's, below) is guided by the same boxes drawn around the
# previous mask (not of a whole volume's: its clicks are points alone too, and the boxes cost its corrections,
# cross-weak k=1 after 5 clicks on 20 validation hippocampi 0.792 -> 0.780, so the engine remembers which points
# it propagated from): after 5 protocol clicks from 3 points, tuning structures 0.553 -> 0.647, hippocampi 0.821 ->
# 0.840; from a 3D box 0.636 -> 0.734 and 0.821 -> 0.846 (`weakicl evaluate --tuning --protocol interactive
# --prompt-kind points|box3d`); False: the prompts and clicks alone, without the boxes' probe and competition
DRAWN_BOXES_IN_CORRECTIONS = True
# a 3D box alone (an ROI around the whole structure) says nothing sure about any slice, so the probe gets no
# seeds from it and, before BOX3D_CORE_FRACTION, neither did the competition (tuning structures: other 0.468, hippocampi 0.761, against 0.764 and
# 0.855 from 3 slice boxes); slice boxes are drawn around the pass's largest component (`own_slice_boxes`)
# and propagated with the 3D box kept, this many times: other 0.468 -> 0.603 -> 0.621 (3 rounds 0.628),
# hippocampi 0.761 -> 0.789 -> 0.797 (0.801) (`python scripts/point_boxes.py --prompt-kind box3d`,
# reports/box3d-boxes; without the 3D box kept, a throwaway: 0.586 and 0.797); 0: the first pass stands
BOX3D_ROUNDS = 2
# ... and in the 3D box's own pass the competition takes the central share of the box (this fraction of each
# side) as the structure and all beyond the box (one voxel of tolerance) as background: tuning structures
# after both rounds, other 0.621 -> 0.654, hippocampi 0.797 -> 0.819 (0.15: 0.625 / 0.828, 0.4: 0.648 / 0.795,
# 0.5: 0.633 / 0.773; `python scripts/with_constants.py BOX3D_CORE_FRACTION=None -- evaluate --tuning
# --protocol propagate --prompt-kind box3d ...`); None: no competition there
BOX3D_CORE_FRACTION = 0.25


@dataclass
class TaskEmbedding:
    """Task tokens [N classes, T, E] (on the CPU) and the class names; independent of any target.

    `atlases` keeps, per class, the references' images and annotation priors, so that a target without
    prompts gets the context aligned to it (the atlas prior); `references`, per class, what tuning the
    tokens to find the structure alone needs (`weakicl.context_tuning`), for whole volumes without the
    prior; both empty when built from tokens alone.
    """

    tokens: "torch.Tensor"  # noqa: F821
    names: list[str]
    atlases: list[list[AtlasItem]] = field(default_factory=list)
    references: list[list[SearchReference]] = field(default_factory=list)

    @classmethod
    def stack(cls, tasks: Sequence[TaskEmbedding]) -> TaskEmbedding:
        """One multi-class task: a single forward pass segments every class."""
        import torch

        if not tasks:
            raise InputError("no tasks to stack")
        atlases = [items for t in tasks for items in t.atlases] if all(t.atlases for t in tasks) else []
        references = [items for t in tasks for items in t.references] if all(t.references for t in tasks) else []
        return cls(torch.cat([t.tokens for t in tasks]), [name for t in tasks for name in t.names], atlases, references)


@dataclass
class Prediction:
    probabilities: np.ndarray  # [N, K, J, I] float32 on the target's grid
    names: list[str]
    changed_kji: tuple[slice, slice, slice]  # region recomputed; outside it `previous` (or 0) stands

    @property
    def masks(self) -> np.ndarray:
        return self.probabilities >= 0.5

    def label_map(self) -> np.ndarray:
        """[K, J, I] uint8: class n as n+1 where its probability is highest and at least 0.5."""
        best = np.argmax(self.probabilities, axis=0)
        return np.where(self.masks.any(axis=0), best + 1, 0).astype(np.uint8)


class Prepared(NamedTuple):
    """A volume ready for the network: its working grid, normalised image there, and content key."""

    grid: WorkingGrid
    image: np.ndarray
    working: Geometry
    key: str  # volume_digest of the original volume, computed once per call
    normalized: np.ndarray  # the normalised image on the original grid, which frames sample from
    modality: str  # "CT" or "MR", as normalised ("auto" resolved)


class BoundedCache(OrderedDict):
    """A dict that forgets its least recently used entries beyond `size` (reading an entry keeps it: a
    reference volume in use outlives the volumes of a batch that passed through once)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def scale_prompts(prompts: PromptSet, grid: WorkingGrid) -> PromptSet:
    """Prompts in original IJK -> working-grid IJK."""
    boxes = [Box(tuple(grid.ijk_to_working(b.lo_ijk)), tuple(grid.ijk_to_working(b.hi_ijk))) for b in prompts.boxes]
    points = [Point(tuple(grid.ijk_to_working(p.ijk)), p.positive) for p in prompts.points]
    oriented = [b.mapped(grid.ijk_to_working) for b in prompts.oriented_boxes]
    return PromptSet(boxes, points, oriented)


class Segmenter:
    """Holds the network on a device and caches prepared images and encoded contexts.

    Long calls take a per-call `progress(fraction, message)`; raising from it (e.g. `errors.Cancelled`)
    stops the computation and nothing is returned.
    """

    def __init__(self, weights=None, device: str = "auto", model=None) -> None:
        from .network import prefer_onednn_convolutions
        from .weights import load_weights

        self.device = resolve_device(device)
        if model is None:
            model, self.card = load_weights(weights, self.device)
        else:
            model, self.card = model.to(self.device).eval(), {}
        if self.device == "cpu":
            prefer_onednn_convolutions(model)  # a 48³ correction frame's network pass 0.68x the time
        self.model = model
        self.config = model.config
        self.device_name = device_name(self.device)
        import monai.inferers  # noqa: F401  here, with the weights: else the first Segment press pays ~0.7 s of imports
        logger.info("running on %s", self.device_name)
        self.window_batch = 0  # windows per forward pass; 0: as many as the device's free memory allows
        # a correction's frames are sampled by torch on the device (CUDA: the resampling was 0.16 s of a 0.36 s
        # 256³ correction on the CPU of an H200 machine); settable, to run that path on the CPU
        self.sample_on_device = self.device == "cuda"
        self._device_images = BoundedCache(DEVICE_IMAGE_CACHE_SIZE)  # normalised images on the device, by volume key
        self.framing = FrameSpec(**{"working_spacing_mm": self.config.working_spacing_mm, **self.config.extra.get("framing", {})})
        self._prepared = BoundedCache(PREPARED_CACHE_SIZE)
        self._tasks = BoundedCache(TASK_CACHE_SIZE)
        self._transforms = BoundedCache(TRANSFORM_CACHE_SIZE)
        # the points each volume was propagated from alone (by volume key): only their corrections are guided by
        # boxes drawn around the previous mask; clicks on a whole volume's result look the same, and lose by it
        self._point_starts = BoundedCache(PREPARED_CACHE_SIZE)

    # -- preparation -------------------------------------------------------------------------------
    def _prepare(self, volume: Volume) -> Prepared:
        """Normalised image on the working grid (cached: the same volume is prepared once)."""
        key = volume_digest(volume)
        if key not in self._prepared:
            grid = WorkingGrid.for_volume(volume, self.config.working_spacing_mm)
            modality = detect_modality(volume.array) if volume.modality == "auto" else volume.modality
            normalized = normalize_intensity(volume.array, modality)
            image = grid.to_working(normalized)
            working = Geometry(grid.working_spacing_ijk, volume.geometry.origin, volume.geometry.direction, grid.working_shape_kji)
            self._prepared[key] = Prepared(grid, image, working, key, normalized, modality)
        return self._prepared[key]

    # -- context -----------------------------------------------------------------------------------
    def encode_context(self, items: Sequence[ContextItem], name: str = "segment",
                       progress: ProgressCallback | None = None) -> TaskEmbedding:
        """Encode references (image + weak prompts or dense mask) into one task embedding, cached."""
        import torch

        progress = progress or silent
        if not items:
            raise InputError("empty context: give at least one reference image with prompts or a mask")
        key = self._context_key(items, name)
        if key in self._tasks:
            return self._tasks[key]
        tokens, atlas, references = [], [], []
        for number, (volume, annotation) in enumerate(items, 1):
            progress((number - 1) / len(items), f"encoding context {number}/{len(items)}")
            if isinstance(annotation, PromptSet):
                annotation = annotation.validate(volume.geometry)
                if not annotation.boxes and not annotation.oriented_boxes and not any(p.positive for p in annotation.points):
                    raise InputError(f"context {number}: only negative points; add a box or a positive point on the structure")
                prompts, mask = annotation, None
            else:
                if not np.any(np.asarray(annotation) > 0.5):
                    raise InputError(f"context {number}: the mask is empty")
                prompts, mask = None, annotation
            prepared = self._prepare(volume)
            roi, channels = self._context_channels(prepared, volume, prompts, mask)
            atlas.append(AtlasItem(prepared.image, prepared.working, foreground_prior(channels), prepared.key,
                                   tuple(s.start for s in roi)))
            # tokens come from the structure in its own frame, as targets are segmented (bounded size)
            binary = None if mask is None else np.asarray(mask) > 0.5
            frame = self._frame(volume, prompts, binary)
            framed_image, framed_channels = frame.sample(prepared.normalized), self._frame_channels(frame, prompts, binary)
            image_crop, _ = pad_to_multiple(framed_image, self.config.downsampling, self.config.patch_size)
            channel_crop, _ = pad_to_multiple(framed_channels, self.config.downsampling, self.config.patch_size, mode="constant")
            with torch.inference_mode():
                features = self.model.encode_image(self._tensor(image_crop[None, None]))
                tokens.append(self.model.encode_task(features, self._tensor(channel_crop[None])).float().cpu())
            references.append(self._search_reference(volume, prepared, prompts, binary, frame, framed_image,
                                                      framed_channels, tokens[-1]))
        progress(1.0, "context encoded")
        task = TaskEmbedding(torch.cat(tokens).mean(dim=0, keepdim=True), [name], [atlas], [references])
        self._tasks[key] = task
        return task

    def _search_reference(self, volume: Volume, prepared: Prepared, prompts: PromptSet | None, mask: np.ndarray | None,
                          frame: Frame, image: np.ndarray, channels: np.ndarray, tokens) -> SearchReference:
        """A reference's crop and what its annotation says for sure there, in a frame of at most
        SEARCH_TUNING_MAX_SIDE voxels a side (`weakicl.context_tuning`): the `frame` the tokens came from,
        its `image` and prompt `channels` where that small (a frame inside a small image is cut to it),
        else a coarser one."""
        if max(frame.shape_kji) > SEARCH_TUNING_MAX_SIDE:
            frame = self._frame(volume, prompts, mask, max_shape=SEARCH_TUNING_MAX_SIDE)
            image = frame.sample(prepared.normalized)
            channels = None if prompts is not None else self._frame_channels(frame, None, mask)
        if prompts is None:
            labels = (channels[MASK_CHANNEL] > 0.5).astype(np.int8)
        else:
            labels = appearance_labels(frame.prompts_to_frame(prompts), image)
        multiple, minimum = self.config.downsampling, self.config.patch_size
        padded_labels, _ = pad_to_multiple(labels.astype(np.int16) + 1, multiple, minimum, mode="constant")
        return SearchReference(pad_to_multiple(image, multiple, minimum)[0], (padded_labels - 1).astype(np.int8), tokens)

    def _search_task(self, task: TaskEmbedding, progress: ProgressCallback) -> TaskEmbedding:
        """The task with its tokens tuned to find each class alone, its references' tuned tokens
        averaged as encoding averages them (each reference is tuned once, `SearchReference.tuned`)."""
        import torch

        classes, count = [], sum(len(references) for references in task.references)
        done = 0
        for references in task.references:
            tuned = []
            for reference in references:
                tuned.append(search_tokens(self.model, reference, self.device, _within(progress, done / count, (done + 1) / count)))
                done += 1
            classes.append(torch.cat(tuned).mean(dim=0, keepdim=True))
        progress(1.0, "task tuned")
        return TaskEmbedding(torch.cat(classes), list(task.names))

    def _context_channels(self, prepared: Prepared, volume: Volume, prompts: PromptSet | None,
                          mask: np.ndarray | None) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """The crop of the working grid around a context annotation and its prompt channels there.

        Only the crop is rasterised (a few slice boxes on a 512x512x300 CT must not cost five
        full-volume channels); the crop is what a full-volume rasterisation would give around it."""
        shape = prepared.image.shape
        if prompts is None:
            mask = np.asarray(mask)
            if mask.shape != volume.geometry.shape_kji:
                raise InputError(f"mask shape {mask.shape} does not match its image {volume.geometry.shape_kji}")
            full = _resampled_mask(prepared.grid.to_working((mask > 0.5).astype(np.float32)))
            roi = self._roi(full)
            channels = np.zeros((len(PROMPT_CHANNELS),) + tuple(s.stop - s.start for s in roi), dtype=np.float32)
            channels[MASK_CHANNEL] = full[roi]
            return roi, channels
        scaled = scale_prompts(prompts, prepared.grid)
        lo, hi = prompt_extent_kji(scaled, None, include_negative=True)
        reach = np.ceil(POINT_RADIUS_MM / np.asarray(prepared.working.spacing)[::-1]) + 2  # point spheres, thick boxes
        bounds = roi_from_bounds(lo - reach, hi + reach, shape, 0.0, 0, 1)
        drawn = self._rasterize_crop(scaled, prepared.working, bounds).max(axis=0) > 0
        inner = self._roi_in(drawn, bounds, shape)
        return inner, self._rasterize_crop(scaled, prepared.working, inner)

    @staticmethod
    def _rasterize_crop(prompts: PromptSet, geometry: Geometry, crop: tuple[slice, slice, slice]) -> np.ndarray:
        """Prompt channels of `crop` of a grid, as the same slices of a full rasterisation."""
        shape = tuple(s.stop - s.start for s in crop)
        spacing_kji = np.asarray(geometry.spacing, dtype=float)[::-1]
        crop_frame = Frame(np.array([s.start for s in crop], dtype=float), np.ones(3), shape, spacing_kji)
        return rasterize(crop_frame.prompts_to_frame(prompts), Geometry(geometry.spacing, geometry.origin, geometry.direction, shape))

    def _roi_in(self, drawn: np.ndarray, crop: tuple[slice, slice, slice], shape) -> tuple[slice, slice, slice]:
        """`_roi` of a region known on a crop, in whole-grid slices."""
        bounds = bounding_box(drawn)
        start = np.array([s.start for s in crop])
        if bounds is None:
            return crop
        return roi_from_bounds(bounds[0] + start, bounds[1] + start, shape, ROI_MARGIN_FRACTION, ROI_MARGIN_VOXELS,
                               self.config.patch_size)

    @staticmethod
    def _context_key(items: Sequence[ContextItem], name: str) -> str:
        digest = hashlib.sha1(name.encode())
        for volume, annotation in items:
            digest.update(volume_digest(volume).encode())
            if isinstance(annotation, PromptSet):
                digest.update(repr(annotation.to_voxel_json()).encode())
            else:
                digest.update(np.packbits(np.asarray(annotation) > 0.5).tobytes())
        return digest.hexdigest()

    # -- targets -----------------------------------------------------------------------------------
    def segment(self, target: Volume, task: TaskEmbedding, target_prompts: PromptSet | None = None,
                previous: np.ndarray | None = None, new_prompts: PromptSet | None = None,
                align_context: bool = True, progress: ProgressCallback | None = None,
                network_only: bool = False) -> Prediction:
        """Segment every class of `task` in `target`.

        `target_prompts` are all prompts on the target (boxes stay as guidance for every later call);
        with a `previous` mask, `new_prompts` (a subset of them, e.g. the click just placed) marks a
        correction: only the neighbourhood of the new prompts is recomputed and the rest of `previous`
        stands. Otherwise, with target prompts or a previous mask, a region around all of them is
        recomputed (propagation); without either, the whole volume is covered by overlapping windows and,
        unless `align_context` is False, each class starts from its context registered to the target
        (without it, from tokens tuned on the references to find the class alone, `weakicl.context_tuning`);
        then each class is propagated again from slice boxes drawn around what that first pass is sure
        of, where the two agree, and again from the boxes of that result (`_propagate_own_boxes`), the
        first pass coarse where its search region exceeds one window. Positive points without a box are
        propagated again, POINT_BOX_ROUNDS times, from slice boxes drawn around what the pass before holds
        at the points, on their slices (`_propagate_drawn_boxes`), and their corrections are guided by
        the boxes drawn so around the previous mask; 3D boxes alone likewise, BOX3D_ROUNDS times, from
        boxes drawn around the pass's largest component. In propagation and whole volumes, of
        several components those that nowhere reach what the prompts or the registered context point to
        are dropped.
        A CLICK_SEED_MM ball around every point prompt ends on the point's side, as a user expects of a
        click, and two terms join the network's logits, in propagation and in corrections alike (else a
        click would undo them): a bounded share of a probe of the image's appearance fitted to what the
        slice boxes and clicks in the frame say for sure (`weakicl.adaptation`), and the margin of a
        geodesic competition between the seeds those prompts give (`weakicl.geodesic`, GrowCut's idea).
        A correction by clicks of one sign only removes (negative) or only adds (positive) to `previous`.
        `network_only` turns all of these off, the second pass of whole volumes too: the network's output
        alone (the evaluation's ablation `model-network-only`).
        """
        progress = progress or silent
        guided = (target_prompts is not None and not target_prompts.is_empty()) or previous is not None
        if guided and len(task.names) > 1:
            raise InputError("target prompts and corrections apply to one class: segment classes one at a time")
        if new_prompts is not None and previous is None:
            raise InputError("new prompts mark a correction: give the previous mask as well")
        prepared = self._prepare(target)
        all_prompts = target_prompts
        if new_prompts is not None and target_prompts is None:
            all_prompts = new_prompts
        if guided:
            points_only = not network_only and _points_only(all_prompts)
            rounds = POINT_BOX_ROUNDS if points_only else BOX3D_ROUNDS if not network_only and _boxes_3d_only(all_prompts) else 0
            if previous is None and rounds:
                if points_only:
                    self._point_starts[prepared.key] = (self._point_starts.get(prepared.key, []) + [_point_keys(all_prompts)])[-TASK_CACHE_SIZE:]
                return self._propagate_drawn_boxes(target, prepared, task, all_prompts, rounds, progress)
            started = not points_only or any(start <= _point_keys(all_prompts) for start in self._point_starts.get(prepared.key, []))
            if (previous is not None and rounds and started and DRAWN_BOXES_IN_CORRECTIONS
                    and np.shape(previous) == target.geometry.shape_kji):
                all_prompts = _with_drawn_boxes(all_prompts, np.asarray(previous) > 0.5, target.geometry.spacing)
            return self._segment_framed(target, prepared, task, all_prompts, previous, new_prompts, progress, network_only)
        grid, image, working, key = prepared.grid, prepared.image, prepared.working, prepared.key
        priors, roi = None, None
        start = 0.0
        if align_context and task.atlases:
            aligning, count = _within(progress, 0.0, ALIGNMENT_SHARE), len(task.atlases)
            priors = np.stack([atlas_prior(items, image, working, key, _named(_within(aligning, index / count, (index + 1) / count), name),
                                           self._transforms)
                               for index, (items, name) in enumerate(zip(task.atlases, task.names))])
            start = ALIGNMENT_SHARE
            # the aligned context says where to look in a volume larger than one window (a tighter crop
            # than one window costs Dice: 0.720 -> 0.704 on 50 validation hippocampi, cross-weak k=1)
            roi = roi_around(priors.max(axis=0) > PRIOR_SEARCH_LEVEL, PRIOR_MARGIN_FRACTION, ROI_MARGIN_VOXELS, self._window)
        searching = task
        if priors is None and task.references and not network_only:  # the tokens alone must find each class
            searching = self._search_task(task, _within(progress, 0.0, ALIGNMENT_SHARE))
            start = ALIGNMENT_SHARE
        roi = roi or tuple(slice(0, n) for n in image.shape)
        probabilities = np.zeros((len(task.names),) + image.shape, dtype=np.float32)
        everywhere = (slice(None),) + roi
        refine = OWN_BOX_LEVEL is not None and not network_only
        segmenting = _within(progress, start, 1.0)
        first_progress = _within(segmenting, 0.0, 0.5) if refine else segmenting
        spacing_kji = np.asarray(grid.working_spacing_ijk, dtype=float)[::-1]
        probabilities[everywhere] = self._first_pass(image[roi], spacing_kji, searching, first_progress,
                                                     None if priors is None else priors[everywhere],
                                                     coarse=refine or (priors is not None and not network_only))
        if priors is not None and not network_only:
            for values, prior in zip(probabilities, priors):
                _drop_components_off(values, prior, PRIOR_SEARCH_LEVEL)
        original = grid.to_original(probabilities)  # a new array (or `probabilities` itself): clipped in place
        np.clip(original, 0.0, 1.0, out=original)
        changed = tuple(slice(int(math.floor(s.start / f)), min(int(math.ceil(s.stop / f)), n))
                        for s, f, n in zip(roi, grid.scale_kji, target.geometry.shape_kji))
        original = original.astype(np.float32, copy=False)
        if refine:
            changed = self._propagate_own_boxes(target, prepared, task, original, changed, _within(segmenting, 0.5, 1.0))
        return Prediction(original, list(task.names), changed)

    @property
    def _window(self) -> tuple[int, int, int]:
        """The largest inference window, WINDOW_PATCHES training patches a side."""
        return tuple(WINDOW_PATCHES * p for p in self.config.patch_size)

    def _first_pass(self, image: np.ndarray, spacing_kji: np.ndarray, task: TaskEmbedding, progress: ProgressCallback,
                    priors: np.ndarray | None, coarse: bool) -> np.ndarray:
        """Class probabilities over a whole volume's search region (`spacing_kji` its voxel size in mm).
        `coarse`: a region larger than one window is seen whole at a coarser scale, as one window, and
        the result interpolated back, since the own-box propagation that follows fits the outline at the
        structure's own scale (coarse-to-fine; a large organ in 6 windows of 96³ took 8 s on 2 CPU cores).
        Its voxels are made as near isotropic as the working grid allows: an axis is never made finer,
        and a thick-slice axis that fits is not made coarser."""
        window = np.array(self._window, dtype=float)
        extent_mm = (np.array(image.shape) - 1) * spacing_kji
        voxel_mm = float(np.max(extent_mm / (window - 1)))
        steps = np.maximum(voxel_mm / spacing_kji, 1.0) if coarse else np.ones(3)
        if np.all(steps == 1.0):
            return self._sliding_window(image, None, task, progress, priors)
        shape = tuple(int(math.ceil((n - 1) / step - 1e-6)) + 1 for n, step in zip(image.shape, steps))
        steps = np.array([(n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(image.shape, shape)])  # both ends on voxels
        small = self._sliding_window(linear_resample(image, (0.0,) * 3, steps, shape), None, task, progress,
                                     None if priors is None else linear_resample(priors, (0.0,) * 3, steps, shape))
        return linear_resample(small, (0.0,) * 3, 1.0 / steps, image.shape)

    def _propagate_own_boxes(self, target: Volume, prepared: Prepared, task: TaskEmbedding, probabilities: np.ndarray,
                             changed: tuple[slice, slice, slice], progress: ProgressCallback) -> tuple[slice, slice, slice]:
        """A whole volume's second pass, in place: per class, slice boxes around the largest component of
        what the first pass holds at least OWN_BOX_LEVEL sure, propagated as if a user had drawn them
        (MedSAM's prompt automation). The first pass only has to find the structure; propagation fits
        its outline to this image (appearance probe and geodesic competition, which need boxes). Where
        the two masks agree at least OWN_BOX_AGREEMENT, the class becomes the mean of both passes inside
        the boxes' frame and nothing beyond it (look-alikes far from the structure); otherwise, or with
        nothing that sure, it keeps its first pass. Up to OWN_BOX_ROUNDS times: each later round draws its
        boxes around that mean and is kept only as a refinement (agreement at least
        OWN_BOX_REFINE_AGREEMENT). Returns the region that now holds results."""
        regions = [changed]
        for index, values in enumerate(probabilities):
            single = TaskEmbedding(task.tokens[index:index + 1], [task.names[index]])
            for round_ in range(OWN_BOX_ROUNDS):
                boxes = own_slice_boxes(values >= OWN_BOX_LEVEL, target.geometry.spacing)
                if boxes is None:
                    break
                step = f"fitting {task.names[index]} to its own slice boxes ({round_ + 1}/{OWN_BOX_ROUNDS}): "
                done, steps = index * OWN_BOX_ROUNDS + round_, len(probabilities) * OWN_BOX_ROUNDS
                share = _within(progress, done / steps, (done + 1) / steps)
                second = self._segment_framed(target, prepared, single, boxes, None, None,
                                              lambda fraction, message: share(fraction, step + message), False)
                required = OWN_BOX_AGREEMENT if round_ == 0 else OWN_BOX_REFINE_AGREEMENT
                if pass_agreement(values, second.probabilities[0]) < required:
                    break  # the pass before was no picture to draw boxes from (a failed registration), or no refinement
                mean_in_frame(values, second.probabilities[0], second.changed_kji)
                regions.append(second.changed_kji)
        progress(1.0, "fitted to the volume's own slice boxes")
        return tuple(slice(min(r[axis].start for r in regions), max(r[axis].stop for r in regions)) for axis in range(3))

    def _propagate_drawn_boxes(self, target: Volume, prepared: Prepared, task: TaskEmbedding, prompts: PromptSet,
                               rounds: int, progress: ProgressCallback) -> Prediction:
        """Propagation from prompts without a slice box (points alone, or 3D boxes): their own pass, then
        `rounds` passes from slice boxes drawn around what the pass before holds, at each positive point
        (`point_slice_boxes`) or around its largest component (`own_slice_boxes`), with the prompts
        kept. A round whose boxes cannot be drawn leaves the pass before it standing."""
        passes = rounds + 1
        prediction = self._segment_framed(target, prepared, task, prompts, None, None, _within(progress, 0.0, 1.0 / passes), False)
        for round_ in range(1, passes):
            drawn = _with_drawn_boxes(prompts, prediction.probabilities[0] >= 0.5, target.geometry.spacing)
            if drawn is prompts:
                break
            step = _within(progress, round_ / passes, (round_ + 1) / passes)
            prediction = self._segment_framed(target, prepared, task, drawn, None, None,
                                              lambda fraction, message: step(fraction, f"fitting to slice boxes of its own ({round_}/{rounds}): {message}"),
                                              False)
        progress(1.0, "fitted to slice boxes of its own")
        return prediction

    def _segment_framed(self, target: Volume, prepared: Prepared, task: TaskEmbedding, prompts: PromptSet | None,
                        previous: np.ndarray | None, new_prompts: PromptSet | None, progress: ProgressCallback,
                        network_only: bool) -> Prediction:
        """Propagation and correction in a prompt-centred frame where the structure has the size the
        network knows (`weakicl.framing`); a correction's frame is centred on the new prompts only."""
        if prompts is not None:
            prompts = prompts.validate(target.geometry, require_prompts=False)  # boxes past the edge clipped
        if new_prompts is not None:
            new_prompts = new_prompts.validate(target.geometry, require_prompts=False)
        previous_mask = None if previous is None else np.asarray(previous) > 0.5
        if previous_mask is not None and previous_mask.shape != target.geometry.shape_kji:
            raise InputError(f"previous mask shape {previous_mask.shape} does not match the target {target.geometry.shape_kji}")
        source, previous_source = prepared.normalized, previous_mask  # what frames sample from
        if self.sample_on_device:
            import torch

            source = self._device_image(prepared)
            previous_source = None if previous_mask is None else torch.from_numpy(previous_mask).to(self.device)
        adapt = not network_only and prompts is not None
        # the competition runs over the whole structure with every prompt, as GrowCut would, so a
        # correction's frame sees what propagation saw, changed only around the clicks and their regions
        structure = regions = reach = None
        if adapt and new_prompts is not None:
            structure = self._frame(target, prompts, previous_mask)
            structure_image = _host(structure.sample(source))
            if previous_mask is not None and prompts.points:
                regions = _structure_click_regions(structure, structure_image, prompts, previous_source)
                reach = _new_regions_extent(structure, regions, new_prompts)
                if BORDER_CLICKS_LOCAL and reach is None and _border_clicks_only(new_prompts, previous_mask):  # in no region
                    return _border_moved(previous_mask, prompts, new_prompts, target, task, progress)
        frame = self._frame(target, prompts, previous_mask, new_prompts, also_kji=reach)
        channels = self._frame_channels(frame, prompts, previous_source)
        image = _host(frame.sample(source))
        encoded: list | None = [] if adapt else None  # the padded frame and its encoder levels, for the probe
        framed = self._sliding_window(image, channels, task, progress, encoded=encoded)
        if adapt:
            if structure is None:
                structure, structure_image = frame, image
            margin = self._geodesic_margin(structure, structure_image, prompts, previous_source, self.device, regions)
            framed_regions = regions
            if structure is not frame:  # beyond it the network decides, as beyond the hull
                margin = None if margin is None else structure.resample_into(margin, frame, fill=0.0)
                framed_regions = None if regions is None else np.rint(
                    structure.resample_into(regions.astype(np.float32), frame, fill=0.0)).astype(np.int8)
            previous_frame = channels[MASK_CHANNEL] > 0.5 if previous_mask is not None else None
            framed = self._adapted_to_image(framed, image, frame.prompts_to_frame(prompts), encoded, margin, previous_frame,
                                            framed_regions, prepared.modality)
            if previous_mask is None:  # propagation: the boxes, their hull and positive points say where
                _drop_components_off(framed[0], foreground_prior(channels), 0.0)
        region = frame.region(target.geometry.shape_kji)
        probabilities = np.zeros((1,) + target.geometry.shape_kji, dtype=np.float32)
        if previous_mask is not None:
            probabilities[0] = previous_mask
        probabilities[(slice(None),) + region] = np.clip(frame.paste(framed, region), 0.0, 1.0)
        if not network_only and previous_mask is not None and new_prompts is not None:
            _one_way(probabilities[0][region], previous_mask[region], new_prompts)  # beyond the region it is `previous`
        if not network_only and prompts is not None:
            _honour_points(probabilities[0], prompts, target.geometry.spacing, region)
        return Prediction(probabilities, list(task.names), region)

    def _adapted_to_image(self, probabilities: np.ndarray, image: np.ndarray, frame_prompts: PromptSet,
                          encoded: list, margin: np.ndarray | None, previous: np.ndarray | None,
                          regions: np.ndarray | None, modality: str) -> np.ndarray:
        """The network's probabilities (1, ...) in a frame with two terms added to its logits:
        APPEARANCE_WEIGHT times a probe of the encoder's features fitted to what the slice boxes and
        clicks (and the clicks' `regions`) say for sure (`weakicl.adaptation`), bounded by APPEARANCE_LIMIT,
        and GEODESIC_WEIGHT times the geodesic `margin` in the frame (`weakicl.geodesic`; None: none).
        Then, on an image of a `modality` in SUPPORT_MODALITIES (CT), a logit of at most -SUPPORT_LOGIT where
        the frame's intensity is none of the sure structure voxels' (`adaptation.outside_support`; read on
        the image's own grid instead of the frame's, a throwaway check not kept: unseen structures 0.830 -> 0.821).
        `encoded` is the padded frame on the device and its encoder levels, as the sliding window left them."""
        labels = appearance_labels(frame_prompts, image, previous, regions)
        clipped = np.clip(probabilities, 1e-4, 1.0 - 1e-4)
        logits = np.log(clipped / (1.0 - clipped))
        if np.any(labels == 1) and np.any(labels == 0):
            shifted, recover = pad_to_multiple(labels + 1, self.config.downsampling, self.config.patch_size, mode="constant")
            padded_image, *levels = encoded
            probe = appearance_logits(levels, padded_image, shifted - 1)  # padding is unknown (-1)
            if probe is not None:
                logits += np.clip(APPEARANCE_WEIGHT * probe.cpu().numpy()[recover], -APPEARANCE_LIMIT, APPEARANCE_LIMIT)
        if margin is not None:
            logits += GEODESIC_WEIGHT * margin
        support = support_range(image, labels) if modality in SUPPORT_MODALITIES else None
        if support is not None:
            margin_units = SUPPORT_MARGIN_HU / CT_UNITS_PER_NORMALIZED if modality == "CT" else 0.0
            outside = outside_support(image, support, margin_units, logits[0] > 0)
            logits[0][outside] = np.minimum(logits[0][outside], -SUPPORT_LOGIT)
        return (0.5 * (1.0 + np.tanh(logits / 2.0))).astype(np.float32)  # the sigmoid, without overflow

    @staticmethod
    def _geodesic_margin(frame: Frame, image: np.ndarray, prompts: PromptSet, previous, device: str,
                         regions: np.ndarray | None = None) -> np.ndarray | None:
        """The geodesic seed competition's margin over a structure's frame (`weakicl.geodesic`): seeds
        from what the boxes and clicks say for sure; it decides the box hull one gap past the outer boxes,
        positive points and a previous result, grown by BACKGROUND_GAP_MM (GrowCut's unknown region).
        Beyond that region its background seeds steer the competition but add nothing to the logits
        (0), except where a box or negative click says so. Points alone (no box, no previous result)
        compete with the frame's outer band of POINT_BACKGROUND_BAND_VOXELS over the whole frame; otherwise
        None without a box: clicks on a whole volume's result do not say where the structure ends. 3D
        boxes alone (no previous result) give seeds of their own (`_box3d_seeds`). The clicks' `regions`
        (`adaptation.click_regions` on this frame) are seeds of their side."""
        frame_prompts = frame.prompts_to_frame(prompts)
        if previous is None and BOX3D_CORE_FRACTION is not None and _boxes_3d_only(prompts):
            inside, seeds = _box3d_seeds(frame_prompts, image)
            return geodesic_margin(image, seed_labels(seeds, inside), device)
        if not (prompts.boxes or prompts.oriented_boxes):
            if previous is not None or POINT_BACKGROUND_BAND_VOXELS is None or not any(p.positive for p in prompts.points):
                return None
            band = POINT_BACKGROUND_BAND_VOXELS
            undecided = np.zeros(image.shape, dtype=bool)
            undecided[tuple(slice(band, n - band) for n in image.shape)] = True  # empty where the frame is thinner than two bands
            return geodesic_margin(image, seed_labels(appearance_labels(frame_prompts, image), undecided), device)
        previous_frame = None
        if previous is not None:
            previous_frame = _host(frame.sample(previous, fill=0.0)) > 0.5  # sample converts only what the frame reaches
        undecided = _competition_zone(frame, frame_prompts, previous_frame)
        sure = appearance_labels(frame_prompts, image, previous_frame, regions)
        margin = geodesic_margin(image, seed_labels(sure, undecided), device)
        if margin is not None:  # beyond the hull the network decides: a lone or bunched box does not cap the structure
            margin[~undecided & (sure != 0)] = 0.0
        return margin

    def _frame(self, volume: Volume, prompts: PromptSet | None, mask: np.ndarray | None,
               new_prompts: PromptSet | None = None, max_shape: int | None = None,
               also_kji: tuple[np.ndarray, np.ndarray] | None = None) -> Frame:
        """The frame of a structure marked by prompts and/or a mask, at the scale the weights expect;
        with `new_prompts`, the part of it around them and the extent `also_kji` (inclusive original
        KJI corners: their clicks' regions), a correction; coarser where it would exceed `max_shape`
        voxels a side (None: the framing's own limit)."""
        extent = prompt_extent_kji(prompts, mask)
        if extent is None:
            raise InputError("nothing to segment from: the prompts hold no box or positive point and the mask is empty")
        spacing_kji = np.asarray(volume.geometry.spacing, dtype=float)[::-1]
        spacing = frame_spacing(*extent, spacing_kji, self.framing)
        focus, spec = extent, self.framing
        if new_prompts is not None and not new_prompts.is_empty():
            marked = np.array([np.asarray(p.ijk)[::-1] for p in new_prompts.points]
                              + [np.asarray(corner)[::-1] for b in new_prompts.boxes for corner in (b.lo_ijk, b.hi_ijk)]
                              + [corner[::-1] for b in new_prompts.oriented_boxes for corner in b.corners_ijk()])
            reach = CORRECTION_REACH_VOXELS * spacing / spacing_kji  # a click corrects its neighbourhood
            focus = (marked.min(axis=0) - reach, marked.max(axis=0) + reach)
            if also_kji is not None:
                focus = (np.minimum(focus[0], also_kji[0]), np.maximum(focus[1], also_kji[1]))
            spec = dataclasses.replace(spec, margin_fraction=0.0, margin_voxels=CORRECTION_MARGIN_VOXELS)
        if max_shape is not None:
            spec = dataclasses.replace(spec, max_shape=min(spec.max_shape, max_shape))
        return frame_around(*focus, spacing_kji, volume.geometry.shape_kji, spacing, spec,
                            minimum_voxels=max(self.config.patch_size))

    @staticmethod
    def _frame_channels(frame: Frame, prompts: PromptSet | None, mask) -> np.ndarray:
        """Prompt channels rasterised directly in the frame (points keep their size in mm); a mask
        (dense context or previous result; an array, or a tensor on the device) is resampled into the mask channel."""
        geometry = Geometry.identity(frame.shape_kji, tuple(frame.spacing_kji[::-1]))
        channels = np.zeros((len(PROMPT_CHANNELS),) + frame.shape_kji, dtype=np.float32)
        if prompts is not None:
            channels = rasterize(frame.prompts_to_frame(prompts), geometry, hull_extension_gaps=HULL_EXTENSION_GAPS,
                                 slices_per_voxel_ijk=frame.step_kji[::-1])
        if mask is not None:
            channels[MASK_CHANNEL] = _resampled_mask(_host(frame.sample(mask, fill=0.0)))
        return channels

    def _roi(self, region: np.ndarray) -> tuple[slice, slice, slice] | None:
        return roi_around(region, ROI_MARGIN_FRACTION, ROI_MARGIN_VOXELS, self.config.patch_size)

    def _sliding_window(self, image: np.ndarray, channels: np.ndarray | None, task: TaskEmbedding, progress: ProgressCallback,
                        priors: np.ndarray | None = None, encoded: list | None = None) -> np.ndarray:
        """Class probabilities over `image`; prompt `channels` (5, ...; None: no prompts) are shared by
        the classes, `priors` (N, ...) replace the mask channel of each class. With `encoded`, the padded
        image [1, 1, ...] on the device and its encoder levels are appended to it (the probe reads them, so
        nothing is padded, uploaded or encoded again): the window's own levels when one window covers the
        image, else the windows' levels blended like the logits."""
        import torch
        from monai.inferers import sliding_window_inference

        classes = len(task.names)
        padded_image, recover = pad_to_multiple(image, self.config.downsampling, self.config.patch_size)
        blocks = [padded_image[None]]
        if channels is not None:  # empty prompt channels are made per window, not per volume
            blocks.append(padded_prompts(channels, self.config.downsampling, self.config.patch_size))
        if priors is not None:
            blocks.append(pad_to_multiple(priors, self.config.downsampling, self.config.patch_size, mode="constant")[0])
        inputs = self._tensor(np.concatenate(blocks)[None])
        if encoded is not None:
            encoded.append(inputs[:, :1])
        prompted = channels is not None
        tokens = task.tokens.to(self.device)
        # One window sees the whole region when it fits: cut structures and prompts lose context.
        patch = tuple(min(n, w) for n, w in zip(padded_image.shape, self._window))
        if math.prod(padded_image.shape) <= ONE_WINDOW_MAX_VOXELS:
            patch = padded_image.shape
        tiling = [_window_tiling(n, p) for n, p in zip(padded_image.shape, patch)]
        windows = math.prod(count for count, _ in tiling)
        batch = self.window_batch if self.window_batch else self._fitting_window_batch(patch, classes)
        blend_features = encoded is not None and windows > 1
        done = [0]

        def predict(window: torch.Tensor) -> torch.Tensor:
            """[W, 1+5(+N), ...] windows -> [W, N, ...] logits: every class of every window in one pass."""
            count = window.shape[0]
            window_features = self.model.encode_image(window[:, :1])
            if windows == 1 and encoded is not None:
                encoded.extend(window_features)
            features = [f.repeat_interleave(classes, dim=0) for f in window_features]
            prompts = None  # no prompts and no priors: the decoder skips the empty prompt channels
            if prompted:
                prompts = window[:, 1:1 + len(PROMPT_CHANNELS)].repeat_interleave(classes, dim=0)
            elif priors is not None:
                prompts = window.new_zeros((count * classes, len(PROMPT_CHANNELS)) + window.shape[2:])
            if priors is not None:
                prompts = prompts.clone() if prompted else prompts
                prompts[:, MASK_CHANNEL] = window[:, -classes:].flatten(0, 1)
            logits = self.model.decode(features, tokens.repeat(count, 1, 1), prompts)
            done[0] += count
            progress(min(done[0] / windows, 1.0), f"segmenting window {done[0]}/{windows}")
            logits = logits.reshape(count, classes, *logits.shape[2:])
            return (logits, *window_features[:FEATURE_LEVELS]) if blend_features else logits

        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device == "cuda"):
            logits = sliding_window_inference(inputs, patch, batch, predict, overlap=[overlap for _, overlap in tiling],
                                             mode="gaussian")
        if blend_features:  # each level at its own scale (monai zooms the windows' positions)
            logits, levels = logits[0], logits[1:]
            encoded.extend(levels)
        probabilities = torch.sigmoid(logits.float())[0].cpu().numpy()
        return probabilities[(slice(None),) + recover]

    def _fitting_window_batch(self, window: tuple[int, int, int], classes: int) -> int:
        """Windows per forward pass: 1 on the CPU (no gain there), on a GPU as many as half its free
        memory holds (activations estimated from the widths of the network), at most MAX_WINDOW_BATCH."""
        if self.device != "cuda":
            return 1
        import torch

        free, _ = torch.cuda.mem_get_info()
        voxels = math.prod(window)
        # bf16 activations of encoder and decoder at every level, about four live tensors per level
        per_window = sum(voxels / 8**level * width * 2 * 4 * (1 + classes) for level, width in enumerate(self.config.channels))
        return int(max(1, min(MAX_WINDOW_BATCH, free // 2 // max(per_window, 1))))

    def _device_image(self, prepared: Prepared):
        """The normalised image of a prepared volume as a tensor on the device (uploaded once per volume)."""
        if prepared.key not in self._device_images:
            self._device_images[prepared.key] = self._tensor(prepared.normalized)
        return self._device_images[prepared.key]

    def _tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)


def padded_prompts(channels: np.ndarray, multiple: int, minimum_size) -> np.ndarray:
    """Prompt channels (5, ...) padded as `pad_to_multiple` pads the image: the hull and the mask go on
    past the edge of the image as they reach it (a structure cut by the field of view, a spinal cord or
    an aorta, goes on; with zeros there the network ended it one box gap early: MR spinal cord 0.78, aorta
    0.76), boxes and points do not."""
    return np.stack([pad_to_multiple(channel, multiple, minimum_size, "edge" if index in CONTINUING_CHANNELS else "constant")[0]
                     for index, channel in enumerate(channels)])


def _host(sampled) -> np.ndarray:
    """A sampled frame as a numpy array, wherever it was sampled."""
    return sampled if isinstance(sampled, np.ndarray) else sampled.cpu().numpy()


def own_slice_boxes(sure: np.ndarray, spacing_ijk) -> PromptSet | None:
    """OWN_BOX_SLICES slice boxes, drawn as the evaluation's protocol draws a user's (on more slices),
    around the largest component of `sure` [K, J, I], on slices across its coarsest axis (a thick-slice
    scan's own slices; a single-slice image's only axis of one voxel), each at least THIN_BOX_VOXELS wide
    in its slice, so that it is a slice box; None when `sure` is empty or the image has fewer than two
    axes to draw in."""
    sizes_kji = np.array(sure.shape)
    if np.count_nonzero(sizes_kji > 1) < 2:
        return None
    bounds = bounding_box(sure)
    if bounds is None:
        return None
    crop = tuple(slice(lo, hi + 1) for lo, hi in zip(*bounds))  # labelled there only: not the whole volume
    largest = np.zeros(sure.shape, dtype=bool)
    largest[crop] = largest_component(sure[crop])
    axis_kji = _box_axis_kji(sizes_kji, spacing_ijk)
    boxes = slice_boxes(largest, slice_fractions(OWN_BOX_SLICES), axis=axis_kji).boxes
    return PromptSet(boxes=[widened_slice_box(box, 2 - axis_kji, np.asarray(sizes_kji)[::-1]) for box in boxes])


def point_slice_boxes(mask: np.ndarray, points: Sequence[Point], spacing_ijk) -> list[Box]:
    """A slice box on each slice that holds a positive point inside `mask` [K, J, I], around the in-plane
    components of `mask` at those points and reaching every positive point on the slice: what a user who
    placed the points would have drawn, if the mask is right there. Slices run across the longest side
    (mm) of what `mask` holds at the points, so that the boxes cut across an elongated structure (tuning
    structures, 2 rounds: hippocampi 0.780, other 0.464; across the coarsest axis 0.746 and 0.455; across
    the axis the points spread along 0.762 and 0.450: points carry no view, and clicks spread anywhere),
    except on a thick-slice scan, whose own slices they are, as in `own_slice_boxes`. A box is at least
    THIN_BOX_VOXELS wide in its slice, so that it is a slice box."""
    positives = np.array([np.asarray(point.ijk, dtype=float)[::-1] for point in points if point.positive])
    sizes_kji = np.array(mask.shape)
    if positives.size == 0 or np.count_nonzero(sizes_kji > 1) < 2:
        return []
    voxels = np.clip(np.rint(positives).astype(int), 0, sizes_kji - 1)
    occupied = bounding_box(mask)
    if occupied is None:
        return []
    origin = occupied[0]
    crop = mask[tuple(slice(lo, hi + 1) for lo, hi in zip(*occupied))]  # labelled there only: not the whole volume
    local = voxels - origin
    inside = np.all((local >= 0) & (local < crop.shape), axis=1)
    components, _ = ndimage.label(crop, FULL_CONNECTIVITY)
    bounds = bounding_box(np.isin(components, [label for label in components[tuple(local[inside].T)] if label]))
    if bounds is None:
        return []
    spacing_kji = np.asarray(spacing_ijk, dtype=float)[::-1]
    thick = spacing_kji.max() > FrameSpec.thick_slice_ratio * spacing_kji.min()
    axis_kji = (_box_axis_kji(sizes_kji, spacing_ijk) if thick or np.any(sizes_kji == 1)
                else int(np.argmax((bounds[1] - bounds[0] + 1) * spacing_kji)))
    plane = [axis for axis in range(3) if axis != axis_kji]
    boxes = []
    for position in np.unique(voxels[inside][:, axis_kji]):
        index = [slice(None)] * 3
        index[axis_kji] = position - origin[axis_kji]
        sheet, _ = ndimage.label(crop[tuple(index)])
        on_slice = voxels[voxels[:, axis_kji] == position][:, plane]
        at = on_slice - origin[plane]
        within = np.all((at >= 0) & (at < sheet.shape), axis=1)
        held = np.isin(sheet, [label for label in sheet[tuple(at[within].T)] if label])
        if not held.any():
            continue
        lo, hi = bounding_box(held)  # reaching every positive point on the slice, where the structure must be too
        lo, hi = np.minimum(lo + origin[plane], on_slice.min(axis=0)), np.maximum(hi + origin[plane], on_slice.max(axis=0))
        lo_kji, hi_kji = (np.insert(bound.astype(float), axis_kji, float(position)) for bound in (lo, hi))
        boxes.append(widened_slice_box(Box(tuple(lo_kji[::-1]), tuple(hi_kji[::-1])), 2 - axis_kji, np.asarray(sizes_kji)[::-1]))
    return boxes


def _box_axis_kji(sizes_kji: np.ndarray, spacing_ijk) -> int:
    """The axis slice boxes are drawn across when nothing else says: a single-slice image's only axis of
    one voxel, else the coarsest (a thick-slice scan's own slices)."""
    single = np.flatnonzero(np.asarray(sizes_kji) == 1)
    return int(single[0]) if single.size else int(np.argmax(np.asarray(spacing_ijk, dtype=float)[::-1]))


def _with_drawn_boxes(prompts: PromptSet, mask: np.ndarray, spacing_ijk) -> PromptSet:
    """`prompts` (without a slice box) with slice boxes drawn around `mask`: at each positive point
    (`point_slice_boxes`) for points alone, around its largest component (`own_slice_boxes`) beside 3D
    boxes; `prompts` itself where none can be drawn."""
    if prompts.boxes:
        own = own_slice_boxes(mask, spacing_ijk)
        drawn = own.boxes if own is not None else []
    else:
        drawn = point_slice_boxes(mask, prompts.points, spacing_ijk)
    return PromptSet(boxes=drawn + list(prompts.boxes), points=list(prompts.points)) if drawn else prompts


def _boxes_3d_only(prompts: PromptSet | None) -> bool:
    """Whether `prompts` hold boxes, all of them 3D (no slice drawn on), and no oblique box."""
    return (prompts is not None and bool(prompts.boxes) and not prompts.oriented_boxes
            and all(not box.thin_axes() for box in prompts.boxes))


def _box3d_seeds(frame_prompts: PromptSet, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What 3D boxes (in frame IJK) say for the seed competition: the boxes grown by a voxel (people draw
    loose boxes), and labels (1 structure: the central BOX3D_CORE_FRACTION of each side of each box, and
    positive points; 0 background: beyond the boxes, and negative points; -1 open)."""
    shape = np.array(image.shape)
    inside = np.zeros(image.shape, dtype=bool)
    seeds = appearance_labels(frame_prompts, image)  # the points' own labels; 3D boxes add nothing there
    cores = []
    for box in frame_prompts.boxes:
        lo, hi = np.asarray(box.lo_ijk, dtype=float)[::-1], np.asarray(box.hi_ijk, dtype=float)[::-1]
        low, high = np.clip(np.floor(lo).astype(int) - 1, 0, shape), np.clip(np.ceil(hi).astype(int) + 2, 0, shape)
        inside[tuple(slice(a, b) for a, b in zip(low, high))] = True
        centre, half = (lo + hi) / 2.0, (hi - lo) * BOX3D_CORE_FRACTION / 2.0
        cores.append(tuple(slice(int(np.clip(np.ceil(c - h), 0, n)), int(np.clip(np.floor(c + h) + 1, 0, n)))
                           for c, h, n in zip(centre, half, shape)))
    seeds[~inside & (seeds != 1)] = 0
    for core in cores:
        seeds[core] = np.where(seeds[core] == 0, 0, 1)  # a negative point stays background
    return inside, seeds


def _point_keys(prompts: PromptSet) -> frozenset:
    """The points of `prompts` as comparable keys (IJK, sign)."""
    return frozenset((point.ijk, point.positive) for point in prompts.points)


def _points_only(prompts: PromptSet | None) -> bool:
    """Whether `prompts` hold positive points and no box of any kind."""
    return (prompts is not None and not prompts.boxes and not prompts.oriented_boxes
            and any(point.positive for point in prompts.points))


def pass_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Dice of two passes' masks (probabilities >= 0.5): whether the second pass confirms the first."""
    first_mask, second_mask = first >= 0.5, second >= 0.5
    return 2.0 * np.count_nonzero(first_mask & second_mask) / max(np.count_nonzero(first_mask) + np.count_nonzero(second_mask), 1)


def mean_in_frame(values: np.ndarray, second: np.ndarray, region: tuple[slice, slice, slice]) -> None:
    """In place: `values` becomes the mean of both passes inside the second pass's `region`, 0 beyond it."""
    averaged = 0.5 * (values[region] + second[region])
    values[...] = 0.0
    values[region] = averaged


def _resampled_mask(resampled: np.ndarray) -> np.ndarray:
    """A binary mask resampled to another grid (linear), thresholded at 0.5; a structure thinner than a
    voxel of that grid must not vanish, so then any overlap counts."""
    return resampled >= 0.5 if np.any(resampled >= 0.5) else resampled > 0


def _competition_zone(frame: Frame, frame_prompts: PromptSet, previous: np.ndarray | None) -> np.ndarray:
    """Where the geodesic competition decides, in a frame: the box hull one gap past the outer boxes,
    positive points and the `previous` result (in the frame), grown by BACKGROUND_GAP_MM (GrowCut's unknown region)."""
    geometry = Geometry.identity(frame.shape_kji, tuple(frame.spacing_kji[::-1]))
    undecided = foreground_prior(rasterize(frame_prompts, geometry, hull_extension_gaps=HULL_GAPS,
                                           slices_per_voxel_ijk=frame.step_kji[::-1])) > 0.5
    if previous is not None:
        undecided |= previous
    radius = np.maximum(np.round(BACKGROUND_GAP_MM / frame.spacing_kji).astype(int), 1)
    return ndimage.binary_dilation(undecided, ellipsoid_element(radius))


def _structure_click_regions(structure: Frame, image: np.ndarray, prompts: PromptSet, previous) -> np.ndarray | None:
    """`adaptation.click_regions` of every click in the structure's frame (`image` sampled there), within
    the competition's undecided region, against the box-centre seeds there."""
    previous_frame = _host(structure.sample(previous, fill=0.0)) > 0.5
    frame_prompts = structure.prompts_to_frame(prompts)
    seeds = appearance_labels(frame_prompts, image) == 1  # what the boxes say before any click contradicts them
    return click_regions(image, _competition_zone(structure, frame_prompts, previous_frame), frame_prompts.points,
                         previous_frame, seeds)


def _new_regions_extent(frame: Frame, regions: np.ndarray | None, new_prompts: PromptSet) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive original KJI corners of the regions (in `frame`) that the new points' voxels fall in, or None:
    a correction recomputes the compartment a new click means, not only the click's neighbourhood."""
    if regions is None:
        return None
    meant = np.zeros(regions.shape, dtype=bool)
    for voxel in (nearest_voxel_kji(point) for point in frame.prompts_to_frame(new_prompts).points):
        if at_voxel(regions, voxel):
            components, _ = ndimage.label(regions == regions[tuple(voxel)])  # not the other side's regions beside it
            meant |= components == components[tuple(voxel)]
    if not meant.any():
        return None
    lo, hi = bounding_box(meant)
    return frame.origin_kji + frame.step_kji * lo, frame.origin_kji + frame.step_kji * hi


def _honour_points(probabilities: np.ndarray, prompts: PromptSet, spacing_ijk, region: tuple[slice, slice, slice]) -> None:
    """Set a ball of CLICK_SEED_MM around each point prompt inside `region` to the point's side (positive
    1, negative 0), in place: a click is a seed, as in GrowCut, whatever the network makes of it."""
    spacing_kji = np.asarray(spacing_ijk, dtype=float)[::-1]
    reach = np.ceil(CLICK_SEED_MM / spacing_kji).astype(int)
    for point in prompts.points:
        centre = np.asarray(point.ijk, dtype=float)[::-1]
        lo = np.maximum(np.floor(centre).astype(int) - reach, [s.start for s in region])
        hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, [s.stop for s in region])
        if np.any(hi <= lo):
            continue
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        inside = sum(((g - c) * d) ** 2 for g, c, d in zip(grids, centre, spacing_kji)) <= CLICK_SEED_MM**2
        probabilities[tuple(slice(a, b) for a, b in zip(lo, hi))][inside] = 1.0 if point.positive else 0.0


def _border_clicks_only(new_prompts: PromptSet, previous: np.ndarray) -> bool:
    """Whether the new prompts are clicks alone, each on the `previous` result's border: its voxel or a
    face neighbour already on the click's side. (A click in a compartment is meant whole, wherever it
    sits: the caller asks only where no new click has a region.)"""
    if new_prompts.boxes or new_prompts.oriented_boxes or not new_prompts.points:
        return False
    for point in new_prompts.points:
        if not np.any(previous[face_neighbourhood(nearest_voxel_kji(point), previous.shape)] == point.positive):
            return False
    return True


def _border_moved(previous: np.ndarray, prompts: PromptSet, new_prompts: PromptSet, target: Volume, task: TaskEmbedding,
                  progress: ProgressCallback) -> Prediction:
    """The `previous` result with the border moved at the new clicks (their CLICK_SEED_MM balls), no network pass."""
    marked = np.array([nearest_voxel_kji(point) for point in new_prompts.points])
    reach = np.ceil(CLICK_SEED_MM / np.asarray(target.geometry.spacing, dtype=float)[::-1]).astype(int)
    lo, hi = np.maximum(marked.min(axis=0) - reach, 0), np.minimum(marked.max(axis=0) + reach + 1, previous.shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    probabilities = previous[None].astype(np.float32)
    _honour_points(probabilities[0], prompts, target.geometry.spacing, region)
    progress(1.0, "border moved at the clicks")
    return Prediction(probabilities, list(task.names), region)


def _one_way(probabilities: np.ndarray, previous: np.ndarray, new_prompts: PromptSet) -> None:
    """A correction by clicks of one sign changes the previous result in that direction only, in place:
    negative clicks only remove, positive ones only add. A click says what is wrong where it sits;
    recomputing its neighbourhood otherwise also adds or drops voxels nobody pointed at (tuning
    structures, 5 clicks: other 0.772 -> 0.779, hippocampus 0.860 -> 0.861, Dice far from the click
    -0.003 -> +0.001 a click). New boxes, or clicks of both signs, may change either way."""
    if new_prompts.boxes or new_prompts.oriented_boxes or not new_prompts.points:
        return
    signs = {point.positive for point in new_prompts.points}
    if signs == {False}:
        probabilities[~previous] = 0.0
    elif signs == {True}:
        probabilities[previous] = 1.0


def _drop_components_off(values: np.ndarray, support: np.ndarray, level: float) -> None:
    """Zero, in place, the connected components of `values` (26-connected, p > 0.5) that nowhere reach
    `support` above `level`, when there are several: what the prompts or the registered context point to
    is where the structure is, so a component wholly away from it is a look-alike elsewhere. A single
    component stands (a registration can be off; an empty mask helps no one)."""
    components, count = ndimage.label(values > 0.5, FULL_CONNECTIVITY)
    if count < 2:
        return
    kept = np.zeros(count + 1, dtype=bool)  # by component label; 0, the background, stays as it is
    kept[0] = True
    kept[np.unique(components[support > level])] = True  # only the supported voxels are looked at, not sorted all
    if not kept.all():
        values[~kept[components]] = 0.0


def _named(progress: ProgressCallback, name: str) -> ProgressCallback:
    """`progress` with each message said of the class `name` (a whole volume aligns its classes one by one)."""
    return lambda fraction, message: progress(fraction, f"{name}: {message}")


def _within(progress: ProgressCallback, start: float, stop: float) -> ProgressCallback:
    """`progress` for one step of a call: its fractions mapped onto [start, stop] of the whole."""
    return lambda fraction, message: progress(start + (stop - start) * fraction, message)


def _window_tiling(size: int, window: int) -> tuple[int, float]:
    """The fewest windows along an axis of `size` voxels that overlap by at least
    MIN_WINDOW_OVERLAP_VOXELS, and the overlap fraction that makes monai space them evenly (its step is
    int(window * (1 - overlap))). Why: a fixed fraction spends windows on overlap, 64 windows of 96³ for
    a 256³ volume where 27 overlap by 16 voxels."""
    if size <= window:
        return 1, 0.0
    least = min(MIN_WINDOW_OVERLAP_VOXELS, window - 1)
    count = math.ceil((size - least) / (window - least))
    step = math.ceil((size - window) / (count - 1))
    return math.ceil((size - window) / step) + 1, 1.0 - (step + 0.5) / window
