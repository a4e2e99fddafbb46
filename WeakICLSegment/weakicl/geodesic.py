"""Geodesic seed competition: each voxel goes to the seed it reaches by the path of least intensity
change, as Slicer's GrowCut does, and the margin of that decision is added to the network's logits.

Why: on anatomy it was never trained on, the network blurs borders that the image itself draws. From
the seeds the slice boxes and clicks give (a box's central half is structure where its intensity is
typical of the boxes, `adaptation.appearance_labels`; just outside it and far outside the box hull is not), the competition follows those borders, and it is cheap (a Dijkstra search
on the frame's 6-neighbour graph, 0.05-0.5 s). The margin is a ratio of the two distances, so it does
not shrink with contrast: where the image draws no border it splits the region by path length between
the seeds, and the network decides only near the middle (measured, it still helps the hippocampus in T1:
+0.02).
Weight and form were chosen on training tasks only, 25 CT, MR and brain structures and 20 hippocampi of
the training split (`scripts/ablations.py --tuning`, reports/tuning-geodesic), never on validation or
unseen structures. Known weakness: where every slice of a low-contrast structure carries a box (an MSD
hippocampus on 6 mm slices spans 2-4 slices), the competition is an in-plane GrowCut and loses recall
(reports/tuning-geodesic-thick6: hippocampi 0.781 -> 0.744, other structures 0.648 -> 0.713).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

log = logging.getLogger(__name__)

GEODESIC_WEIGHT = 12.0  # logits added at full margin (tuning structures, other / hippocampus: none 0.676 / 0.828,
# 8 -> 0.727 / 0.854, 12 -> 0.735 / 0.853, 16 -> 0.739 / 0.852)
MAX_SEARCH_VOXELS = 64**3  # 0.05-0.3 s on one CPU core (more for noisy images); larger searches run on a coarser grid
STEP_COST = 1e-3  # per voxel step, in units of the frame's 1st-99th percentile range: in flat regions path length decides
# background seeds start this far outside the box hull extended by one box gap: GrowCut's seeds in the
# evaluation too (chosen for that baseline on 30 structures of the hippocampus training split)
BACKGROUND_GAP_MM = 2.0
MAX_SWEEPS = 256  # rounds of `_swept_distances` at most (noise on a 64³ crop settles in about 70; beyond, the search)
SWEEP_TOLERANCE = 1e-9  # a round that shrinks no distance by more than this ends the sweeps
HULL_GAPS = 1.0  # the hull that bounds the competition goes on one box gap past the outermost boxes


def ellipsoid_element(radius_kji: Sequence[int]) -> np.ndarray:
    """A boolean ellipsoid with these voxel radii along K, J, I (at least one voxel each): a structuring
    element that grows a region by the same distance in mm on an anisotropic grid."""
    grids = np.ogrid[tuple(slice(-int(r), int(r) + 1) for r in radius_kji)]
    return sum((g / max(int(r), 1)) ** 2 for g, r in zip(grids, radius_kji)) <= 1.0


def seed_labels(sure: np.ndarray, undecided: np.ndarray) -> np.ndarray:
    """int8 seeds in frame voxels: 1 structure, 2 background, 0 to decide. `sure` is
    `adaptation.appearance_labels` (1 structure, 0 background, -1 unknown); everything outside
    `undecided` (the dilated box hull, positive clicks and a previous result) is background."""
    seeds = np.where(undecided, 0, 2).astype(np.int8)
    seeds[sure == 0] = 2
    seeds[sure == 1] = 1
    return seeds


def geodesic_margin(image: np.ndarray, seeds: np.ndarray, device: str = "cpu") -> np.ndarray | None:
    """(d_background - d_structure) / (d_background + d_structure) in [-1, 1] per voxel, the distances
    being the least summed absolute intensity change (plus STEP_COST per step) to a seed of each kind;
    None when either kind has no seed. Only the bounding box of the undecided voxels (plus one voxel)
    is searched, so paths leaving it are not counted, and a path may cross seeds of the other kind
    (GrowCut's labels block each other; here they do not). A box of more than MAX_SEARCH_VOXELS is
    searched on a grid coarsened by a whole factor (a liver on a 1 mm grid) and its margin interpolated back.
    On "cuda" the distances come from `_swept_distances` instead of a Dijkstra search on the CPU (the
    same distances to float rounding; 0.19 s of a 0.56 s correction on an H200 machine)."""
    if not (np.any(seeds == 1) and np.any(seeds == 2)):
        return None
    margin = np.where(seeds == 1, 1.0, -1.0).astype(np.float32)
    open_voxels = np.nonzero(seeds == 0)
    if open_voxels[0].size == 0:
        return margin
    region = tuple(slice(max(int(v.min()) - 1, 0), min(int(v.max()) + 2, n)) for v, n in zip(open_voxels, seeds.shape))
    crop, crop_seeds = image[region].astype(np.float32), seeds[region]
    low, high = np.percentile(crop, [1, 99])
    crop = (crop - low) / max(float(high - low), 1e-6)
    factor = int(np.ceil((crop.size / MAX_SEARCH_VOXELS) ** (1 / 3)))
    local = _searched_margin(crop, crop_seeds, device) if factor == 1 else _coarse_margin(crop, crop_seeds, factor, device)
    margin[region] = np.where(crop_seeds == 0, local, margin[region])
    return margin


def _coarse_margin(image: np.ndarray, seeds: np.ndarray, factor: int, device: str) -> np.ndarray:
    """The margin searched on blocks of factor³ voxels (mean intensity; a structure seed where a block
    holds one, a background seed where it holds nothing else), interpolated back to the voxels."""
    padding = [(0, -n % factor) for n in image.shape]
    blocks = tuple(n // factor for n in np.add(image.shape, [p for _, p in padding]))

    def pooled(array: np.ndarray, reduce) -> np.ndarray:
        padded = np.pad(array, padding, mode="edge")
        return reduce(padded.reshape(blocks[0], factor, blocks[1], factor, blocks[2], factor), axis=(1, 3, 5))

    coarse_seeds = np.where(pooled(seeds == 1, np.any), 1, np.where(pooled(seeds == 2, np.all), 2, 0)).astype(np.int8)
    coarse = _searched_margin(pooled(image, np.mean), coarse_seeds, device)
    fine = ndimage.zoom(coarse, factor, order=1, mode="nearest", grid_mode=True)
    return fine[tuple(slice(0, n) for n in image.shape)]


def _searched_margin(image: np.ndarray, seeds: np.ndarray, device: str) -> np.ndarray:
    """The margin in [-1, 1] of every voxel of a crop from its seeds: +1 (-1) where only structure
    (background) seeds reach, 0 where none does."""
    swept = _swept_distances(image, np.stack([seeds == 1, seeds == 2]), device) if device == "cuda" else None
    if swept is None:  # the CPU, or sweeps that did not settle: the search
        to_structure, to_background = (_distances_from(image, seeds == kind) for kind in (1, 2))
    else:
        to_structure, to_background = swept
    with np.errstate(invalid="ignore"):
        local = (to_background - to_structure) / (to_background + to_structure + 1e-6)
    local[np.isinf(to_background) & np.isfinite(to_structure)] = 1.0
    local[np.isinf(to_structure) & np.isfinite(to_background)] = -1.0
    return np.nan_to_num(local, nan=0.0).astype(np.float32)


def _distances_from(image: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Least summed |intensity change| + STEP_COST per step from any `sources` voxel (6-neighbours);
    infinite where none is reachable."""
    if not sources.any():
        return np.full(image.shape, np.inf)
    index = np.arange(image.size).reshape(image.shape)
    heads, tails, costs = [], [], []
    for axis in range(3):
        if image.shape[axis] < 2:
            continue
        head = tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))
        tail = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        heads.append(index[head].ravel())
        tails.append(index[tail].ravel())
        costs.append(np.abs(image[head] - image[tail]).ravel() + STEP_COST)
    graph = csr_matrix((np.concatenate(costs), (np.concatenate(heads), np.concatenate(tails))), shape=(image.size, image.size))
    return dijkstra(graph, directed=False, indices=np.flatnonzero(sources), min_only=True).reshape(image.shape)


def _swept_distances(image: np.ndarray, sources: np.ndarray, device: str) -> np.ndarray | None:
    """What `_distances_from` gives for each of the source masks stacked in `sources` (N, k, j, i), found
    by sweeps on the device instead of a search: along a line of voxels with prefix sums P of the step
    costs, the best path from the left is P[v] + min over u <= v of (d[u] - P[u]), a running minimum;
    both directions of all three axes are swept until no distance shrinks by more than SWEEP_TOLERANCE
    (paths turn, so a few dozen rounds), summed in float64 as the search sums. None when MAX_SWEEPS rounds
    did not settle them (a path that turns at every voxel, as in a maze): the caller searches instead."""
    import torch

    values = torch.as_tensor(image, dtype=torch.float32, device=device)
    distances = torch.full(sources.shape, torch.inf, dtype=torch.float64, device=device)
    distances[torch.as_tensor(sources, device=device)] = 0.0
    prefixes = []
    for axis in range(3):
        if values.shape[axis] < 2:  # a single slice: no steps along it
            continue
        steps = (values.diff(dim=axis).abs() + STEP_COST).double()  # rounded as the search's float32 costs
        start = torch.zeros_like(steps.narrow(axis, 0, 1))
        prefixes.append((axis + 1, torch.cat([start, steps.cumsum(axis)], dim=axis)))
    for _ in range(MAX_SWEEPS):
        before = distances
        for axis, prefix in prefixes:
            distances = prefix + torch.cummin(distances - prefix, dim=axis).values
            distances = torch.cummin((distances + prefix).flip(axis), dim=axis).values.flip(axis) - prefix
        if not bool(((before - distances) > SWEEP_TOLERANCE).any()):  # inf - inf is nan: not a change
            return distances.cpu().numpy()
    log.debug("geodesic sweeps unsettled after %d rounds: searching instead", MAX_SWEEPS)
    return None
