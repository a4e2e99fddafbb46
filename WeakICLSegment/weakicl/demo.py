"""`weakicl demo`: a synthetic phantom segmented from three slice boxes, so a new user sees the whole
path (prompts -> context encoding -> propagation -> files) work in one command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError, WriteError
from .evaluation.metrics import dice
from .simulation import slice_boxes
from .volume import Geometry, Volume

PHANTOM_SHAPE = (48, 80, 80)
PHANTOM_SPACING_IJK = (1.0, 1.0, 1.5)


def make_phantom(seed: int = 0) -> tuple[Volume, np.ndarray]:
    """An MR-like volume with a curved bright structure (the target) beside a distractor blob."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in PHANTOM_SHAPE], indexing="ij")
    bend = 6.0 * np.sin((k - 10) / 28.0 * np.pi)
    target = ((k - 24) / 16) ** 2 + ((j - 38 - bend) / 9) ** 2 + ((i - 34) / 12) ** 2 <= 1.0
    distractor = ((k - 22) / 10) ** 2 + ((j - 40) / 8) ** 2 + ((i - 58) / 7) ** 2 <= 1.0
    body = ((j - 40) / 36) ** 2 + ((i - 40) / 36) ** 2 <= 1.0
    image = 40.0 * body + 60.0 * target + 45.0 * distractor
    image += ndimage.gaussian_filter(rng.normal(0, 12, PHANTOM_SHAPE), 1.5) + rng.normal(0, 4, PHANTOM_SHAPE)
    image *= 1.0 + 0.2 * (i / PHANTOM_SHAPE[2])  # bias field
    geometry = Geometry(PHANTOM_SPACING_IJK, (-60.0, -60.0, -36.0), np.eye(3), PHANTOM_SHAPE)
    return Volume(image.astype(np.float32), geometry, "MR"), target


def save_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, slices: list[int], title: str) -> None:
    """Three axial slices: the image, the truth's outline (green) and the prediction (yellow fill)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4.4))
    for axis, index in zip(np.atleast_1d(axes), slices):
        axis.imshow(image[index], cmap="gray")
        axis.imshow(np.ma.masked_where(~prediction[index], prediction[index]), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        axis.contour(truth[index], levels=[0.5], colors="lime", linewidths=1.2)
        axis.set_title(f"slice k={index}")
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def run_demo(out: Path, device: str = "auto", weights=None) -> int:
    from .cli_common import progress_bar
    from .prompts import box_hull
    from .provenance import provenance
    from .session import Segmenter
    from .volume import write_mask, write_volume

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the demo's files")
    volume, truth = make_phantom()
    prompts = slice_boxes(truth, (0.25, 0.5, 0.75))
    started = time.perf_counter()
    segmenter = Segmenter(weights, device)
    progress = progress_bar("demo")
    task = segmenter.encode_context([(volume, prompts)], "phantom", progress)
    prediction = segmenter.segment(volume, task, target_prompts=prompts, progress=progress)
    seconds = time.perf_counter() - started
    mask = prediction.masks[0]
    try:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails earlier (bad weights) leaves no empty folder
    except OSError as error:
        raise WriteError(f"cannot create {out}: {error.strerror or error}") from None
    write_volume(out / "phantom_image.nii.gz", volume)
    record = provenance(segmenter.card, "phantom_image.nii.gz", prompts, "phantom_prompts.json", (), ["phantom"])
    write_mask(out / "phantom_segmentation.seg.nrrd", mask, volume.geometry, ["phantom"], provenance=record)
    (out / "phantom_prompts.json").write_text(json.dumps(prompts.to_voxel_json(), indent=1))
    prior = box_hull(prompts.boxes, volume.geometry.shape_kji) > 0
    slices = [int(round((b.lo_ijk[2] + b.hi_ijk[2]) / 2)) for b in prompts.boxes]
    model_dice, prior_dice = dice(mask, truth), dice(prior, truth)
    save_overlay(out / "phantom_overlay.png", volume.array, truth, mask, slices,
                 f"WeakICL from 3 slice boxes: Dice {model_dice:.3f} (box interpolation {prior_dice:.3f})")
    print(f"demo: Dice {model_dice:.3f} against the phantom's truth (box interpolation alone: {prior_dice:.3f}), "
          f"{seconds:.1f} s on {segmenter.device_name}")
    print(f"wrote {out}/phantom_image.nii.gz, phantom_segmentation.seg.nrrd, phantom_prompts.json, phantom_overlay.png")
    return 0

