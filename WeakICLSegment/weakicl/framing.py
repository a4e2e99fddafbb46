"""Prompt-centred, scale-normalised frames: the network sees every prompted structure at about the
same size in voxels, on an isotropic grid, whatever its size in millimetres or the slice thickness.

Why: the network is trained on 32-voxel patches where a structure spans a few tens of voxels. A liver at
1 mm is ten times wider than anything it saw at once, a spinal cord at 3 mm a few voxels, and thick
slices squash structures along one axis. A `Frame` crops the prompted region with a margin and resamples
it isotropically so that the prompted extent is about `FrameSpec.extent_voxels` voxels; predictions are
pasted back on the original grid. Arrays are [k, j, i]; frame coordinates are continuous original
voxel indices (KJI) mapped by `origin_kji + step_kji * frame_index`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .preprocess import bounding_box, linear_resample
from .prompts import Box, Point, PromptSet, widened_slice_box


@dataclass(frozen=True)
class FrameSpec:
    """How large a structure should look to the network (the model card's `net.extra["framing"]`).

    `extent_voxels=None` keeps the scale of the working grid (no axis finer than `working_spacing_mm`),
    the framing of weights trained before scale normalisation (weakicl-0.1), with thick slices (more than
    `thick_slice_ratio` times the finest axis) interpolated down to `max_anisotropy` times the finest axis: the network saw near-isotropic grids
    only, and on 6 mm slices it saw squashed structures and fell below the boxes it was given
    (hippocampus 0.44 against box interpolation's 0.74; `max_anisotropy` 1 / 1.5 / 2 / 3 gives 0.78 / 0.76 /
    0.69 / 0.61, and 18 unseen structures 0.71 / 0.68 / 0.67 / 0.68 against 0.65 kept;
    `scripts/make_thick_slices.py`, reports/ablations-thick6).
    """

    extent_voxels: float | None = None  # the prompted region's longest side, in frame voxels
    working_spacing_mm: float = 1.0
    max_anisotropy: float = 1.0  # with extent_voxels None: thick slices brought down to this times the finest axis
    thick_slice_ratio: float = 2.0  # ... where thicker than this times the finest axis (2 mm slices on 1 mm pixels
    # are kept: interpolating them doubled the frame, 2.5 -> 6.7 s per propagation, for no gain on a phantom)
    min_thickness_voxels: float = 8.0  # its shortest side at least this (thin structures are upsampled)
    margin_fraction: float = 0.5  # structures reach beyond the slices people annotate
    margin_voxels: int = 12
    min_spacing_mm: float = 0.5
    max_shape: int = 128  # per axis; a larger frame is coarsened instead
    multiple: int = 8  # frame sides are multiples of the network's downsampling

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Frame:
    """A grid over part of an image: frame voxel f lies at original KJI `origin + step * f`."""

    origin_kji: np.ndarray
    step_kji: np.ndarray  # original voxels per frame voxel
    shape_kji: tuple[int, int, int]
    spacing_kji: np.ndarray  # mm per frame voxel

    def sample(self, array: np.ndarray, order: int = 1, fill: float | None = None) -> np.ndarray:
        """Resample [..., k, j, i] from the original grid into the frame (edge values outside, or `fill`);
        with linear interpolation a torch tensor is sampled on its device (`preprocess.linear_resample`).
        Up to linear interpolation only the voxels the frame reaches are read and converted to float (a
        correction samples a whole CT's mask into a small frame)."""
        if order == 1:
            return linear_resample(array, self.origin_kji, self.step_kji, self.shape_kji, fill)
        leading = array.shape[:-3]
        start = np.zeros(3, dtype=int)
        if order < 1:
            size = np.asarray(array.shape[-3:])
            reach = self.origin_kji + self.step_kji * (np.asarray(self.shape_kji) - 1)
            start = np.clip(np.floor(self.origin_kji).astype(int) - 1, 0, size - 1)
            stop = np.clip(np.ceil(reach).astype(int) + 2, start + 1, size)
            array = array[(Ellipsis,) + tuple(slice(int(a), int(b)) for a, b in zip(start, stop))]
        flat = array.reshape((-1,) + array.shape[-3:])
        mode, cval = ("nearest", 0.0) if fill is None else ("constant", fill)
        out = np.stack([
            ndimage.affine_transform(channel.astype(np.float32, copy=False), self.step_kji, offset=self.origin_kji - start,
                                     output_shape=self.shape_kji, order=order, mode=mode, cval=cval)
            for channel in flat
        ])
        return out.reshape(leading + self.shape_kji)

    def region(self, shape_kji) -> tuple[slice, slice, slice]:
        """The original voxels the frame covers (clipped to the image)."""
        lo = np.ceil(self.origin_kji - 1e-6).astype(int)
        hi = np.floor(self.origin_kji + self.step_kji * (np.asarray(self.shape_kji) - 1) + 1e-6).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, shape_kji)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def paste(self, frame_array: np.ndarray, region: tuple[slice, slice, slice]) -> np.ndarray:
        """Resample a frame array [..., k, j, i] back onto the original voxels of `region` (linear)."""
        start = np.array([s.start for s in region], dtype=float)
        shape = tuple(s.stop - s.start for s in region)
        return linear_resample(frame_array, (start - self.origin_kji) / self.step_kji, 1.0 / self.step_kji, shape)

    def resample_into(self, frame_array: np.ndarray, other: Frame, fill: float) -> np.ndarray:
        """A (k, j, i) array on this frame resampled onto `other`, a frame over the same image (linear,
        `fill` outside this frame)."""
        return linear_resample(frame_array, (other.origin_kji - self.origin_kji) / self.step_kji, other.step_kji / self.step_kji,
                               other.shape_kji, fill)

    def prompts_to_frame(self, prompts: PromptSet) -> PromptSet:
        """Prompts in original IJK -> frame IJK. A slice box stays a slice box of its axis: where the frame
        is coarser than the image in-plane, a box a few voxels across would turn thin along its other
        axes too (a line or a dot, rasterised as a 3D box), so it is widened there as `PromptSet.validate`
        widens one on the image."""
        step_ijk, origin_ijk = self.step_kji[::-1], self.origin_kji[::-1]

        def convert(ijk) -> tuple[float, float, float]:
            return tuple((np.asarray(ijk, dtype=float) - origin_ijk) / step_ijk)

        def box_in_frame(box: Box) -> Box:
            framed, thin = Box(convert(box.lo_ijk), convert(box.hi_ijk)), box.thin_axes()
            if len(thin) == 1 and len(framed.thin_axes()) > 1:
                framed = widened_slice_box(framed, thin[0])
            return framed

        boxes = [box_in_frame(b) for b in prompts.boxes]
        points = [Point(convert(p.ijk), p.positive) for p in prompts.points]
        oriented = [b.mapped(lambda ijk: (np.asarray(ijk, dtype=float) - origin_ijk) / step_ijk) for b in prompts.oriented_boxes]
        return PromptSet(boxes, points, oriented)


def prompt_extent_kji(prompts: PromptSet | None, mask: np.ndarray | None,
                      include_negative: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive lower and upper voxel coordinates (KJI) of what the prompts and mask mark as the
    structure (negative points too with `include_negative`)."""
    corners = []
    if prompts is not None:
        for box in prompts.boxes:
            corners += [np.asarray(box.lo_ijk)[::-1], np.asarray(box.hi_ijk)[::-1]]
        corners += [np.asarray(p.ijk)[::-1] for p in prompts.points if p.positive or include_negative]
        corners += [corner[::-1] for box in prompts.oriented_boxes for corner in box.corners_ijk()]
    bounds = None if mask is None else bounding_box(mask)
    if bounds is not None:
        corners += [bound.astype(float) for bound in bounds]
    if not corners:
        return None
    stacked = np.stack(corners)
    return stacked.min(axis=0), stacked.max(axis=0)


def frame_spacing(lo_kji: np.ndarray, hi_kji: np.ndarray, spacing_kji, spec: FrameSpec) -> np.ndarray:
    """Frame spacing (mm, KJI). Scale-normalised: isotropic, making the region's longest side
    `extent_voxels` long, finer when its shortest side would be thinner than `min_thickness_voxels`."""
    spacing_kji = np.asarray(spacing_kji, dtype=float)
    if spec.extent_voxels is None:
        coarsened = np.maximum(spacing_kji, spec.working_spacing_mm)
        thick = coarsened > spec.thick_slice_ratio * coarsened.min()
        return np.where(thick, np.minimum(coarsened, spec.max_anisotropy * coarsened.min()), coarsened)
    extent_mm = (np.asarray(hi_kji) - np.asarray(lo_kji) + 1.0) * spacing_kji
    spacing = extent_mm.max() / spec.extent_voxels
    spacing = min(spacing, extent_mm.min() / spec.min_thickness_voxels)
    return np.full(3, max(spacing, spec.min_spacing_mm))


def frame_around(lo_kji: np.ndarray, hi_kji: np.ndarray, spacing_kji, image_shape_kji, frame_spacing_kji: np.ndarray,
                 spec: FrameSpec, minimum_voxels: int = 32) -> Frame:
    """A frame at `frame_spacing_kji` (coarsened if it would exceed `max_shape`) over the region plus
    margins, at least `minimum_voxels` per axis and a multiple of `multiple`, inside the image (along an
    axis where the image is smaller, the frame is the image's extent)."""
    spacing_kji = np.asarray(spacing_kji, dtype=float)
    lo_kji, hi_kji = np.asarray(lo_kji, dtype=float), np.asarray(hi_kji, dtype=float)
    extent = hi_kji - lo_kji + 1.0
    margin = extent * spec.margin_fraction + spec.margin_voxels * frame_spacing_kji / spacing_kji
    lo, hi = lo_kji - margin, hi_kji + margin
    size_mm = (hi - lo) * spacing_kji
    frame_spacing_kji = frame_spacing_kji * max(1.0, float((size_mm / frame_spacing_kji).max()) / spec.max_shape)
    step = frame_spacing_kji / spacing_kji
    shape = np.maximum(np.ceil(size_mm / frame_spacing_kji), minimum_voxels)
    shape = (np.ceil(shape / spec.multiple) * spec.multiple).astype(int)
    shape = np.minimum(shape, max(spec.max_shape, minimum_voxels))
    centre = (lo + hi) / 2.0
    origin = centre - step * (shape - 1) / 2.0
    # stay inside the image: where the frame fits, shift it in; where it does not, it covers the image
    # exactly (the sliding window pads it evenly, as the network saw whole small images in training;
    # a frame reaching past one side costs Dice: 0.814 -> 0.752 on 24 validation hippocampi)
    limit = np.asarray(image_shape_kji, dtype=float) - 1.0
    span = step * (shape - 1)
    fits = span <= limit
    origin = np.where(fits, np.clip(origin, 0.0, np.maximum(limit - span, 0.0)), 0.0)
    shape = np.where(fits, shape, np.ceil(limit / step - 1e-6).astype(int) + 1)
    return Frame(origin, step, tuple(int(n) for n in shape), frame_spacing_kji)

