"""Test-time appearance adaptation: a linear probe on the image encoder's features, fitted per call to
what the target's slice boxes say for sure, added to the network's logits.

Why: on anatomy it was never trained on, the network fills its boxes (precision 0.68 on the annotated
slices of 18 unseen structures, where the structures fill 62 % of their boxes). The boxes themselves
say which voxels look like the structure (their central half, GrowCut's foreground seeds, less what
has the look of their surroundings) and which do not (just outside them); a probe fitted to those voxels on features of the image alone (no prompt
channel, so it cannot learn "inside the box") decides the rest of each box by appearance.
Measured with the shipped weights (`scripts/ablations.py`): unseen structures +0.02, hippocampus +0.003.
On CT the sure voxels also bound the structure's densities (`support_range`, `outside_support`): fat and
bone in a box are not the structure, whatever the network says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

from .preprocess import bounding_box
from .prompts import Point, PromptSet

if TYPE_CHECKING:
    import torch

APPEARANCE_WEIGHT = 0.5  # of the probe's logit added to the network's (1.0 broke a vertebra: 0.66 -> 0.45)
APPEARANCE_LIMIT = 1.5  # the most the probe moves a logit: where the network is sure, it stands (unbounded,
# far look-alikes became stray components: unseen HD95 18.4 mm against 11.3 mm, Dice 0.725 against 0.724)
CORE_FRACTION = 0.5  # central part of a slice box taken as the structure, as GrowCut's seeds
CORE_TYPICALITY: float | None = 0.6  # an intensity's share p_inside / (p_inside + p_around) of the slice boxes
# below which a central voxel is left unknown (None: the whole central half is structure); chosen among 0.4-0.7
# on training tasks (reports/tuning-typicality)
MIN_CORE_KEPT = 0.1  # each box keeps at least this share of its central voxels, its most typical
TYPICALITY_BINS = 32
CONTRADICTION_DEPTH: float | None = 2.0  # frame voxels inside the previous result a negative click must lie
CONTRADICTION_SPREAD = 0.5  # ... to drop the box-centre seeds within this share of their IQR of its intensity
# A click's region (`click_regions`): the connected voxels of its tissue, within this many noise SDs of the
# click's intensity (None: no regions, each click says only what its own voxels are) ...
CLICK_REGION_TOLERANCE: float | None = 3.0
CLICK_REGION_STABILITY = 1.3  # ... growing at most this much when the tolerance widens by half (a compartment, not a leak)
CLICK_REGION_NEGATIVE_SHARE = 0.6  # ... at most this share of the previous result for a negative click
CLICK_REGION_POSITIVE_SHARE = 1.0  # ... and this share of it for a positive one
CLICK_REGION_HOLE_SHARE = 0.02  # holes in a region this small against it are noise and filled; larger ones are a cavity (a ring's pool)
# Intensity support (`outside_support`): voxels whose intensity lies outside the central share of the sure
# structure voxels' by more than a margin are not the structure; on these modalities only (Hounsfield units
# mean one tissue throughout a CT; an MR's intensities drift across it: on MR the rule cost the tuning
# brain structures and hippocampi, reports/tuning-support)
SUPPORT_MODALITIES = ("CT",)
SUPPORT_QUANTILE: float | None = 0.005  # each tail left out (None: no rule; 0.002 / 0.01: 0.772 / 0.774 against 0.773)
SUPPORT_MARGIN_HU = 0.0  # on CT, beyond those quantiles (25: tuning structures other than hippocampi 0.773 -> 0.771)
SUPPORT_MIN_REGION_VOXELS = 4  # smaller face-connected runs of such voxels are noise in the structure, no tissue
SUPPORT_SPARES_ENCLOSED = True  # runs the structure as it stands encloses are its cavities (a stomach's gas)
SUPPORT_MIN_SEEDS = 100  # fewer sure voxels (points alone) say too little of a structure's intensities
SUPPORT_LOGIT = 6.0  # what lies outside has a logit of at most minus this (a probability of 0.0025)
OUTSIDE_BAND = 0.5  # background samples within this fraction of the box size around it
FEATURE_LEVELS = 3  # encoder levels whose features the probe reads (finest first)
L2_PENALTY = 1e-2
PROBE_ITERATIONS = 100


def appearance_labels(frame_prompts: PromptSet, image: np.ndarray, previous: np.ndarray | None = None,
                      regions: np.ndarray | None = None) -> np.ndarray:
    """int8 labels in frame voxels (KJI) of `image`: 1 the central part of each slice box, 0 just
    outside it (one voxel of tolerance for loose boxes, up to OUTSIDE_BAND of its size away), the 3x3x3
    voxels of each point prompt its side, -1 unknown. Central voxels whose intensity is more typical of
    the boxes' surroundings than of their inside stay unknown (`_inside_share`): a box's centre is
    not always the structure (a crescent, a ring, fat between organs). With `previous` (a correction's
    previous result in the frame), a negative click deep inside it also makes the box-centre seeds of its
    tissue unknown (`_drop_contradicted_seeds`). `regions` (`click_regions` on this frame) label the
    clicks' regions their side, before each click's own voxels. `frame_prompts` are in frame IJK
    (`Frame.prompts_to_frame`); 3D and oblique boxes say nothing sure about a slice."""
    shape_kji = image.shape
    labels = np.full(shape_kji, -1, dtype=np.int8)
    cores, insides, bands = [], [], []
    for box in frame_prompts.boxes:
        lo, hi = np.asarray(box.lo_ijk, dtype=float)[::-1], np.asarray(box.hi_ijk, dtype=float)[::-1]
        thin = [axis for axis in range(3) if hi[axis] - lo[axis] < 1.0]
        if len(thin) != 1:
            continue
        flat = thin[0]
        position = int(np.floor((lo[flat] + hi[flat]) / 2 + 0.5))
        if not 0 <= position < shape_kji[flat]:
            continue
        plane = [axis for axis in range(3) if axis != flat]
        index = [slice(None)] * 3
        index[flat] = position
        sheet = labels[tuple(index)]
        low, high = lo[plane], hi[plane]
        size = high - low + 1.0
        inside = _rectangle(sheet.shape, low - 1.0, high + 1.0)
        band = _rectangle(sheet.shape, low - OUTSIDE_BAND * size, high + OUTSIDE_BAND * size) & ~inside
        sheet[band & (sheet != 1)] = 0
        centre, half = (low + high) / 2, (high - low) * CORE_FRACTION / 2
        core = _rectangle(sheet.shape, centre - half, centre + half)
        sheet[core] = 1
        values = image[tuple(index)]
        cores.append((tuple(index), core, values[core]))
        insides.append(values[_rectangle(sheet.shape, low, high)])
        bands.append(values[band])
    if cores and CORE_TYPICALITY is not None:
        share = _inside_share(insides, bands)
        for index, core, values in cores:
            if values.size:
                score = share(values)
                typical = score >= min(CORE_TYPICALITY, float(np.quantile(score, 1.0 - MIN_CORE_KEPT)))
                labels[index][core] = np.where(typical, 1, -1)
    if previous is not None and CONTRADICTION_DEPTH is not None:
        _drop_contradicted_seeds(labels, frame_prompts, image, previous, regions)
    if regions is not None:
        labels[regions < 0] = 0
        labels[regions > 0] = 1
    for point in frame_prompts.points:  # a click says for sure what its voxel and its neighbours are
        centre = nearest_voxel_kji(point)
        lo, hi = np.maximum(centre - 1, 0), np.minimum(centre + 2, shape_kji)
        if np.all(hi > lo):
            labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1 if point.positive else 0
    return labels


def support_range(image: np.ndarray, labels: np.ndarray) -> tuple[float, float] | None:
    """The intensities the structure's sure voxels (`labels` == 1, as from `appearance_labels` on the same
    grid) show, less SUPPORT_QUANTILE of each tail; None without a rule or with fewer than
    SUPPORT_MIN_SEEDS such voxels. Why: a box holding several organs of one density is filled by the
    network, fat and bone between them included (the README's liver: 12.5 k of its 28 k wrong voxels
    lie outside its box centres' range). Meant for CT, whose units mean one tissue throughout a volume."""
    seeds = image[labels == 1]
    if SUPPORT_QUANTILE is None or seeds.size < SUPPORT_MIN_SEEDS:
        return None
    low, high = np.quantile(seeds, [SUPPORT_QUANTILE, 1.0 - SUPPORT_QUANTILE])
    return float(low), float(high)


def outside_support(image: np.ndarray, support: tuple[float, float], margin: float,
                    structure: np.ndarray | None = None) -> np.ndarray:
    """Where `image` lies outside the `support` range (`support_range`) by more than `margin` (in the
    image's units), in face-connected runs of at least SUPPORT_MIN_REGION_VOXELS that reach beyond
    `structure` (a mask on the same grid, when given; runs within it are its cavities)."""
    low, high = support
    outside = (image < low - margin) | (image > high + margin)
    regions, count = ndimage.label(outside)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    keep = sizes >= SUPPORT_MIN_REGION_VOXELS
    if structure is not None and SUPPORT_SPARES_ENCLOSED:
        reaching = np.zeros(count + 1, bool)
        reaching[regions[ndimage.binary_dilation(~structure) & outside]] = True
        keep &= reaching
    keep[0] = False  # not outside
    return keep[regions]


def click_regions(image: np.ndarray, zone: np.ndarray, points: Sequence[Point], previous: np.ndarray,
                  seeds: np.ndarray) -> np.ndarray | None:
    """int8 over a frame (KJI): -1 where a negative click's region lies, +1 a positive click's, 0 elsewhere
    (a later click's region over an earlier one's), or None when no click has one. Why: a click says
    "this tissue is wrong here", and where that tissue is a compartment of its own (a ring's blood pool,
    the wall around it) the whole compartment is what the user means, not the few voxels clicked; the
    box-centre seeds of a ring's pool would otherwise pull the pool back on every later correction.
    A region is the connected voxels of `zone` (the competition's undecided region) within
    CLICK_REGION_TOLERANCE noise SDs (`_noise_sd`) of the median of the click's voxel and its 6 face
    neighbours (a wall two voxels thick holds most of them), its small holes filled. It counts only where it
    is a compartment holding no click of the other side (that tissue is then both, and says nothing):
    growing it with a tolerance half as wide again adds at most CLICK_REGION_STABILITY - 1 of it (one tissue continuing into the structure leaks), and it is at most CLICK_REGION_NEGATIVE_SHARE
    (negative) or CLICK_REGION_POSITIVE_SHARE (positive) of the `previous` result (a click in the tissue
    the structure itself is made of would take the whole structure). Negative regions stand only beside a
    positive region or where they hold at most half of the structure `seeds` (what the prompts say for
    sure, `appearance_labels` == 1): with the structure's seeds taken, nothing would say what the
    structure is, and it would vanish. Points are in frame IJK."""
    if CLICK_REGION_TOLERANCE is None or not zone.any():
        return None
    regions = np.zeros(image.shape, dtype=np.int8)
    size = max(int(np.count_nonzero(previous)), 1)
    lo, hi = bounding_box(zone)  # the work is done within the zone's box
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
    seeds_beyond = np.count_nonzero(seeds) - np.count_nonzero(seeds[box])
    image, zone, seeds, inside = image[box], zone[box], seeds[box], regions[box]  # `inside` is a view
    tolerance = CLICK_REGION_TOLERANCE * max(_noise_sd(image, zone), 1e-3)
    voxels = [nearest_voxel_kji(point) - lo for point in points]
    for point, voxel in zip(points, voxels):
        if not at_voxel(zone, voxel):
            continue
        centre = float(np.median(image[face_neighbourhood(voxel, image.shape)]))
        region = _connected_within(image, zone, voxel, centre, tolerance)
        limit = (CLICK_REGION_POSITIVE_SHARE if point.positive else CLICK_REGION_NEGATIVE_SHARE) * size
        count = int(np.count_nonzero(region))
        wider = np.count_nonzero(_connected_within(image, zone, voxel, centre, 1.5 * tolerance))
        contradicted = any(other.positive != point.positive and at_voxel(region, v) for other, v in zip(points, voxels))
        if count > limit or wider > CLICK_REGION_STABILITY * count or contradicted:
            continue
        inside[region] = 1 if point.positive else -1
    if not np.any(inside > 0) and np.count_nonzero(seeds & (inside < 0)) > np.count_nonzero(seeds & (inside == 0)) + seeds_beyond:
        inside[inside < 0] = 0
    return regions if inside.any() else None


_FACE_STEPS = np.vstack([np.zeros((1, 3), dtype=int), np.eye(3, dtype=int), -np.eye(3, dtype=int)])  # a voxel and its 6 face neighbours


def face_neighbourhood(voxel_kji: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Index arrays of a KJI voxel and its 6 face neighbours, clipped to an array of `shape` (at an edge a
    neighbour repeats the voxel's own row): what a click's immediate tissue is read from."""
    return tuple(np.clip(np.asarray(voxel_kji) + _FACE_STEPS, 0, np.array(shape) - 1).T)


def _noise_sd(image: np.ndarray, zone: np.ndarray) -> float:
    """The image noise's SD within `zone`, robustly: the median absolute difference of neighbours (along
    every axis, both in the zone) over 0.6745 * sqrt(2). Edges between tissues are few among all
    neighbour pairs, so unlike a spread around the click it does not grow where the click's tissue is thin."""
    differences = [np.abs(np.diff(image, axis=axis))[(zone[(slice(None),) * axis + (slice(1, None),)]
                                                        & zone[(slice(None),) * axis + (slice(None, -1),)])]
                   for axis in range(image.ndim)]
    values = np.concatenate(differences)
    return float(np.median(values)) / (0.6745 * np.sqrt(2.0)) if values.size else 0.0


def _connected_within(image: np.ndarray, zone: np.ndarray, voxel: np.ndarray, centre: float, tolerance: float) -> np.ndarray:
    """The voxels of `zone` within `tolerance` of `centre` face-connected to `voxel` (none where it is not one),
    with the holes that noise leaves in it filled: those of at most CLICK_REGION_HOLE_SHARE of it. A larger
    enclosed hole is a cavity of another tissue (a closed shell's pool), not part of the click's tissue."""
    components, _ = ndimage.label(zone & (np.abs(image - centre) <= tolerance))
    label = components[tuple(voxel)]
    region = np.zeros(image.shape, dtype=bool)
    if label:
        found = components == label
        lo, hi = bounding_box(found)
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
        holes, _ = ndimage.label(ndimage.binary_fill_holes(found[box]) & ~found[box])
        sizes = np.bincount(holes.ravel())
        small = sizes <= CLICK_REGION_HOLE_SHARE * np.count_nonzero(found)
        small[0] = False
        region[box] = (found[box] | small[holes]) & zone[box]
    return region


def _drop_contradicted_seeds(labels: np.ndarray, frame_prompts: PromptSet, image: np.ndarray, previous: np.ndarray,
                             regions: np.ndarray | None = None) -> None:
    """In place: box-centre seeds (label 1) of a negative click's intensity, within CONTRADICTION_SPREAD
    of their interquartile range, become unknown when the click lies at least CONTRADICTION_DEPTH frame
    voxels inside the `previous` result: the user says a tissue the boxes' centres hold is not the
    structure (the centre of a crescent, a ring or loops of bowel), so those seeds must not pull it
    back. A click on the border of the previous result (a shell of one voxel) says where the border
    is, not which tissue is wrong, and leaves the seeds as they are; so does a click with a region of its
    own in `regions` (`click_regions`): the region says which tissue is wrong, and only there."""
    negatives = [point for point in frame_prompts.points if not point.positive
                 and not (regions is not None and at_voxel(regions, nearest_voxel_kji(point)) < 0)]
    seeds = labels == 1
    if not negatives or not seeds.any():
        return
    low, high = np.percentile(image[seeds], [25, 75])
    spread = CONTRADICTION_SPREAD * max(float(high - low), 1e-6)
    for point in negatives:
        voxel = tuple(nearest_voxel_kji(point))
        if all(0 <= v < n for v, n in zip(voxel, image.shape)) and _inside_by(previous, voxel, CONTRADICTION_DEPTH):
            labels[seeds & (np.abs(image - image[voxel]) <= spread)] = -1


def at_voxel(array: np.ndarray, voxel_kji: np.ndarray):
    """`array` at a KJI voxel, 0 (False) where the voxel lies outside it."""
    return array[tuple(voxel_kji)] if np.all(voxel_kji >= 0) and np.all(voxel_kji < array.shape) else 0


def nearest_voxel_kji(point) -> np.ndarray:
    """The voxel (KJI) nearest a point prompt given in IJK."""
    return np.floor(np.asarray(point.ijk, dtype=float)[::-1] + 0.5).astype(int)


def _inside_by(mask: np.ndarray, voxel: tuple[int, int, int], depth: float) -> bool:
    """Whether no voxel outside `mask` (beyond the array counts as outside) lies nearer `voxel` than
    `depth` voxels: a distance transform's value there at least `depth`, read from the few voxels around
    it instead of transforming a whole frame on every correction."""
    reach = int(np.ceil(depth))
    window = np.zeros((2 * reach + 1,) * 3, dtype=bool)
    lo = np.asarray(voxel) - reach
    source = tuple(slice(max(a, 0), min(a + 2 * reach + 1, n)) for a, n in zip(lo, mask.shape))
    window[tuple(slice(s.start - a, s.stop - a) for s, a in zip(source, lo))] = mask[source]
    offsets = np.indices(window.shape) - reach
    return not np.any(~window & (np.sqrt((offsets**2).sum(axis=0)) < depth))


def _inside_share(insides: list[np.ndarray], bands: list[np.ndarray]):
    """A function from intensities to how much more frequent each is inside the slice boxes than
    around them, p_inside / (p_inside + p_around) in [0, 1] (histograms pooled over all slice boxes of the
    structure, so one box's contents do not decide alone); 1 everywhere when nothing tells them apart."""
    inside, band = np.concatenate(insides), np.concatenate(bands)
    values = np.concatenate([inside, band])
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 0.0)
    if inside.size == 0 or band.size == 0 or high <= low:
        return lambda intensities: np.ones(np.shape(intensities))
    edges = np.linspace(low, high, TYPICALITY_BINS + 1)

    def density(samples: np.ndarray) -> np.ndarray:
        counts = np.histogram(np.clip(samples, low, high), edges)[0].astype(float)
        smoothed = np.convolve(counts, [0.25, 0.5, 0.25], mode="same")
        return smoothed / max(smoothed.sum(), 1e-12)

    share_inside = density(inside)
    share = share_inside / (share_inside + density(band) + 1e-12)
    return lambda intensities: share[np.clip(np.searchsorted(edges, intensities, side="right") - 1, 0, TYPICALITY_BINS - 1)]


def _rectangle(shape: tuple[int, int], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Pixels whose centres lie within [low, high] (inclusive, pixel coordinates), at least one pixel."""
    inside = np.zeros(shape, dtype=bool)
    start = np.clip(np.ceil(low - 1e-6).astype(int), 0, shape)
    stop = np.clip(np.floor(high + 1e-6).astype(int) + 1, 0, shape)
    stop = np.maximum(stop, np.minimum(start + 1, shape))
    inside[start[0]:stop[0], start[1]:stop[1]] = True
    return inside


def features_at(levels: list, voxels_kji: tuple[np.ndarray, np.ndarray, np.ndarray], size) -> torch.Tensor:
    """[N, channels of all levels] at N voxels (index arrays K, J, I) of the full grid `size`, each level
    [1, C, ...] read where a trilinear upsampling to `size` (align_corners False) would put the voxel,
    borders clamped alike: the same values, without upsampling any level whole."""
    import torch
    import torch.nn.functional as F

    centres = np.stack([(2.0 * index + 1.0) / n - 1.0 for index, n in zip(voxels_kji[::-1], tuple(size)[::-1])], axis=1)
    grid = torch.from_numpy(centres).float().to(levels[0].device).view(1, -1, 1, 1, 3)
    return torch.cat([F.grid_sample(level, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0, 0].T
                      for level in levels], dim=1)


def fit_logistic(samples: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights and bias of a class-balanced, L2-penalised logistic regression of `target` (0/1) on
    `samples` [N, C], by L-BFGS (scipy: a small convex problem, fitted on the CPU whatever the device,
    so a call neither pulls in torch.optim's compiler stack nor launches hundreds of tiny GPU kernels)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    share = float(np.clip(target.mean(), 0.05, 0.95))
    balance = np.where(target > 0, 0.5 / share, 0.5 / (1 - share)) / target.size  # as many structure as background

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = theta[:-1], theta[-1]
        logits = samples @ weights + bias
        loss = float(balance @ (np.logaddexp(0.0, logits) - target * logits)) + L2_PENALTY * float(weights @ weights)
        residual = balance * (expit(logits) - target)
        return loss, np.concatenate([samples.T @ residual + 2 * L2_PENALTY * weights, [residual.sum()]])

    theta = minimize(loss_and_gradient, np.zeros(samples.shape[1] + 1), jac=True, method="L-BFGS-B",
                     options={"maxiter": PROBE_ITERATIONS}).x
    return theta[:-1], float(theta[-1])


def appearance_logits(features: list, image, labels: np.ndarray):
    """The probe's logits [D, H, W] (a torch tensor on the features' device) over the padded frame, or
    None when the labels hold no structure or no background voxel.

    `features` are the image encoder's levels for `image` [1, 1, D, H, W]; `labels` (D, H, W) as from
    `appearance_labels` on the same padded grid. The probe reads each level at the known voxels as a
    trilinear upsampling would; it is linear, so its map is the sum of per-level maps upsampled, never
    all features at full resolution at once.
    """
    import torch
    import torch.nn.functional as F

    known = np.nonzero(labels >= 0)
    target = (labels[known] == 1).astype(np.float64)
    if target.size == 0 or target.min() == target.max():
        return None
    levels = [image.float()] + [f.float() for f in features[:FEATURE_LEVELS]]
    size = image.shape[2:]

    def full(level: torch.Tensor) -> torch.Tensor:
        return level if level.shape[2:] == size else F.interpolate(level, size=size, mode="trilinear", align_corners=False)

    with torch.no_grad():
        samples = features_at(levels, known, size).cpu().double().numpy()
    mean, scale = samples.mean(axis=0), samples.std(axis=0, ddof=1) + 1e-4
    weights, bias = fit_logistic((samples - mean) / scale, target)
    with torch.no_grad():
        logits = torch.full(size, float(bias - (weights * mean / scale).sum()), device=image.device)
        per_channel = torch.from_numpy(weights / scale).float().to(image.device)
        start = 0
        for level in levels:
            width = level.shape[1]
            logits += full((level * per_channel[start:start + width].view(1, width, 1, 1, 1)).sum(dim=1, keepdim=True))[0, 0]
            start += width
    return logits
