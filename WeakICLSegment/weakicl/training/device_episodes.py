"""Synthetic in-context episodes drawn with torch on the training device, a whole step's worth at once.

Why: drawn in numpy by DataLoader workers (`synthetic` + `episodes`), synthetic episodes bound a GPU
run by its CPU cores. This module draws the same kind of tasks on the device the network trains on and
returns them as network inputs (`flat_batch.FlatBatch`): random label layouts (the `synthetic` shape kinds),
subjects that are smooth deformations of their layout and share its contrast, rendered with blur, bias
field, thick slices, noise and gamma; weak prompts rasterised in PROMPT_CHANNELS; the modes of
`episodes` (propagate, cross, atlas, correction).

Approximations of the numpy sampler: every episode has a fresh layout (no finite family of anatomies);
distances are chessboard depths (iterated 3x3x3 pooling), not Euclidean; a corrective click goes to
the deepest voxel of the larger error (missed or extra voxels), and it fixes the part of that error
within FLOOD_STEPS voxels of it; sampled points may repeat. Choices per episode come from
`numpy.random.default_rng([seed, step, DEVICE_STREAM])`, voxel noise from a torch generator seeded
from it, so the episodes of step s are a pure function of (seed, s) on a given device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import MR_PERCENTILES
from ..prompts import FOREGROUND_CHANNELS, MASK_CHANNEL, PROMPT_CHANNELS
from .episodes import MIN_CLASS_VOXELS, EpisodeConfig, _choose
from .flat_batch import FlatBatch
from .synthetic import MIN_STRUCTURE_VOXELS, SHAPE_KINDS, SHAPE_WEIGHTS, random_rotation, with_look_alikes

DEVICE_STREAM = 2  # the step's seed is [seed, s, 2]; the CPU sampler uses [seed, s], its self-prediction [seed, s, 1]
BOX, HULL, POSITIVE, NEGATIVE = (PROMPT_CHANNELS.index(name) for name in ("box", "box_hull", "positive", "negative"))
DEPTH_STEPS = 8  # chessboard depth counted up to this many voxels (click placement, interior points)
FLOOD_STEPS = 12  # a click fixes the error voxels this close to it (along the error)
MAX_POSITIVES, MAX_NEGATIVES, MAX_MARGIN = 5, 3, 6


@dataclass
class DeviceBatch:
    """One step's device episodes: network inputs, each episode's mode, and what corrections started from."""

    inputs: FlatBatch
    modes: list[str]
    correction_rows: torch.Tensor  # class rows of correction episodes
    base_prompts: torch.Tensor  # their target prompts before the previous mask and the clicks
    max_clicks: int
    radius_vox: float


@dataclass
class _Slot:
    """One structure of a layout, painted in order (later ones overwrite earlier ones)."""

    kind: str  # "ellipsoid", "tube" or "shell"
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray | None = None
    rough: np.ndarray | None = None  # weights of the layout's three roughness fields
    curve: np.ndarray | None = None  # tube: points along a quadratic Bezier curve
    parent: int = 0
    thickness: float = 0.0


def _plan_layout(rng: np.random.Generator, max_structures: int) -> list[_Slot]:
    """The structures of `synthetic.random_layout`, as parameters (host side)."""
    slots: list[_Slot] = []

    def ellipsoid(centre, radii, roughness) -> _Slot:
        return _Slot("ellipsoid", centre, radii, random_rotation(rng), rng.normal(0, roughness, 3))

    if rng.random() < 0.6:
        slots.append(ellipsoid(np.zeros(3), rng.uniform(0.7, 1.0, 3), 0.1))
    for kind in rng.choice(SHAPE_KINDS, size=rng.integers(2, max_structures + 1), p=SHAPE_WEIGHTS):
        kind = "ellipsoid" if kind in ("nested", "touching", "shell") and not slots else str(kind)
        parent = int(rng.integers(len(slots))) if slots else 0
        if kind in ("ellipsoid", "blob"):
            slots.append(ellipsoid(rng.uniform(-0.6, 0.6, 3), rng.uniform(0.12, 0.45, 3), 0.08 if kind == "ellipsoid" else 0.35))
        elif kind == "tube":
            ends = rng.uniform(-0.9, 0.9, (3, 3))
            t = np.linspace(0, 1, 13)[:, None]
            curve = (1 - t) ** 2 * ends[0] + 2 * t * (1 - t) * ends[1] + t**2 * ends[2]
            radius = rng.uniform(0.04, 0.1)
            slots.append(_Slot("tube", np.zeros(3), np.full(3, radius), rough=rng.normal(0, 0.15, 3), curve=curve))
        elif kind == "nested":
            radii = slots[parent].radii * rng.uniform(0.3, 0.6, 3)
            slots.append(ellipsoid(slots[parent].centre + rng.uniform(-0.3, 0.3, 3) * slots[parent].radii, radii, 0.1))
        elif kind == "touching":
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            radii = rng.uniform(0.1, 0.3, 3)
            slots.append(ellipsoid(slots[parent].centre + direction * (slots[parent].radii.mean() + 0.6 * radii.mean()), radii, 0.1))
        else:
            thickness = rng.uniform(0.1, 0.3)
            slots.append(_Slot("shell", slots[parent].centre, slots[parent].radii * (1 + thickness), parent=parent, thickness=thickness))
    return slots


def _tensor(values, device, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)


def _smooth_noise(count: int, shape: tuple[int, int, int], control: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance values on a `control`^3 grid, trilinear in between: [count, D, H, W]."""
    coarse = torch.randn((count, 1) + (control,) * 3, generator=generator, device=generator.device)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[:, 0]


def _index_grid(shape: tuple[int, int, int], device) -> torch.Tensor:
    """Voxel indices [3, D, H, W] (k, j, i), float."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in shape], indexing="ij"))


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(x[:, None], 3, 1, padding=1)[:, 0]


def _erode(x: torch.Tensor) -> torch.Tensor:
    """Minimum over 3x3x3; outside the patch counts as background, as in a padded distance transform."""
    return -F.max_pool3d(-F.pad(x[:, None], (1,) * 6), 3, 1)[:, 0]


def _depth(x: torch.Tensor) -> torch.Tensor:
    """Chessboard distance to the outside of a {0,1} map, counted up to DEPTH_STEPS."""
    depth, inside = torch.zeros_like(x), x
    for _ in range(DEPTH_STEPS):
        depth = depth + inside
        inside = _erode(inside)
    return depth


def _extent(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last True index along the last axis."""
    index = torch.arange(profile.shape[-1], device=profile.device)
    return (torch.where(profile, index, profile.shape[-1]).amin(-1).float(),
            torch.where(profile, index, -1).amax(-1).float())


def _interval(lo: torch.Tensor, hi: torch.Tensor, size: int, thicken: bool) -> torch.Tensor:
    """Voxels between rounded bounds [..., size], at least 3 thick when `thicken` (as prompts._box_slices)."""
    lo, hi = torch.floor(lo + 0.5), torch.floor(hi + 0.5)
    if thicken:
        centre, thin = torch.div(lo + hi, 2, rounding_mode="floor"), hi - lo < 2
        lo, hi = torch.where(thin, centre - 1, lo), torch.where(thin, centre + 1, hi)
    index = torch.arange(size, device=lo.device)
    return (index >= lo[..., None]) & (index <= hi[..., None])


def _spheres(centres: torch.Tensor, valid: torch.Tensor, shape: tuple[int, int, int], radius_vox: float) -> torch.Tensor:
    """Soft spheres (1 at the centre, 0 at `radius_vox`) merged by maximum: centres [Q,K,3] -> [Q,D,H,W]."""
    grid = _index_grid(shape, centres.device)
    out = torch.zeros((centres.shape[0],) + shape, device=centres.device)
    for k in range(centres.shape[1]):
        distance = ((grid[None] - centres[:, k, :, None, None, None]) ** 2).sum(1).sqrt()
        out = torch.maximum(out, (1 - distance / radius_vox).clamp(0, 1) * valid[:, k, None, None, None])
    return out


def _voxels(flat_index: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Flat indices [...] -> (k, j, i) float [..., 3]."""
    d, h, w = shape
    return torch.stack([flat_index // (h * w), flat_index // w % h, flat_index % w], -1).float()


def random_layouts(count: int, shape: tuple[int, int, int], rng: np.random.Generator, generator: torch.Generator,
                   max_structures: int = 8) -> torch.Tensor:
    """`count` random label maps [count, D, H, W] (long; structures 1..n, those under MIN_STRUCTURE_VOXELS
    merged into the background), painted with implicit fields (negative inside) on the unit grid."""
    device = generator.device
    unit = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n, device=device) for n in shape], indexing="ij"))
    rough = _smooth_noise(3 * count, shape, 6, generator).view(count, 3, *shape)
    plans = [_plan_layout(rng, max_structures) for _ in range(count)]
    labels = torch.zeros((count,) + shape, dtype=torch.long, device=device)
    fields: list[torch.Tensor] = []
    for k in range(max(len(plan) for plan in plans)):
        field = torch.ones((count,) + shape, device=device)
        slots = {kind: [(n, plan[k]) for n, plan in enumerate(plans) if len(plan) > k and plan[k].kind == kind]
                 for kind in ("ellipsoid", "tube", "shell")}
        if slots["ellipsoid"]:
            rows, specs = zip(*slots["ellipsoid"])
            axes = _tensor([s.rotation / s.radii[:, None] for s in specs], device)
            offset = unit[None] - _tensor([s.centre for s in specs], device)[:, :, None, None, None]
            scaled = torch.einsum("nij,nj...->ni...", axes, offset)
            bumps = torch.einsum("nr,nr...->n...", _tensor([s.rough for s in specs], device), rough[list(rows)])
            field[list(rows)] = scaled.norm(dim=1) - 1 + bumps
        if slots["tube"]:
            rows, specs = zip(*slots["tube"])
            curve = _tensor([s.curve for s in specs], device)[..., None, None, None]
            distance = torch.full((len(rows),) + shape, float("inf"), device=device)
            for a, b in zip(curve.unbind(1)[:-1], curve.unbind(1)[1:]):
                along = ((unit[None] - a) * (b - a)).sum(1, keepdim=True) / ((b - a) ** 2).sum(1, keepdim=True)
                distance = torch.minimum(distance, (unit[None] - a - along.clamp(0, 1) * (b - a)).norm(dim=1))
            bumps = torch.einsum("nr,nr...->n...", _tensor([s.rough for s in specs], device), rough[list(rows)])
            field[list(rows)] = distance / _tensor([s.radii[0] for s in specs], device)[:, None, None, None] - 1 + bumps
        if slots["shell"]:
            rows, specs = zip(*slots["shell"])
            around = torch.stack(fields, 1)[list(rows), [s.parent for s in specs]]
            thickness = _tensor([s.thickness for s in specs], device)[:, None, None, None]
            field[list(rows)] = torch.where(around > 0, around - thickness, torch.ones_like(around))
        labels = torch.where(field <= 0, k + 1, labels)
        fields.append(field)
    counts = torch.zeros((count, len(fields) + 1), device=device).scatter_add_(1, labels.flatten(1), torch.ones_like(labels.flatten(1), dtype=torch.float32))
    keep = counts >= MIN_STRUCTURE_VOXELS
    keep[:, 0] = False
    lookup = keep.long().cumsum(1) * keep
    return lookup.gather(1, labels.flatten(1)).view_as(labels)


def deform(labels: torch.Tensor, rng: np.random.Generator, generator: torch.Generator, displacement_vox: float = 3.0,
           max_degrees: float = 12.0) -> torch.Tensor:
    """Other subjects of the same anatomies: a small affine plus a smooth displacement, nearest-neighbour."""
    count, shape = labels.shape[0], tuple(labels.shape[1:])
    device = labels.device
    size = _tensor(shape, device)
    centre = (size - 1) / 2
    matrices = _tensor([random_rotation(rng, max_degrees) * rng.uniform(0.88, 1.12, 3) for _ in range(count)], device)
    shift = _tensor(rng.uniform(-0.05, 0.05, (count, 3)), device) * size
    amplitude = _tensor(rng.uniform(0, displacement_vox, count), device)
    grid = _index_grid(shape, device) - centre[:, None, None, None]
    coords = torch.einsum("nij,j...->ni...", matrices, grid) + (centre + shift)[:, :, None, None, None]
    coords = coords + amplitude[:, None, None, None, None] * _smooth_noise(3 * count, shape, 4, generator).view(count, 3, *shape)
    normalised = (2 * coords / (size - 1)[:, None, None, None] - 1).permute(0, 2, 3, 4, 1).flip(-1)
    moved = F.grid_sample(labels[:, None].float(), normalised, mode="nearest", padding_mode="border", align_corners=True)
    return moved[:, 0].round().long()


def _blur(image: torch.Tensor, sigma: np.ndarray, axis: int) -> torch.Tensor:
    """Gaussian blur along one axis with a sigma per image (replicated border)."""
    count = image.shape[0]
    radius = max(int(np.ceil(3 * sigma.max())), 1)
    taps = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
    kernel = torch.exp(-taps[None] ** 2 / (2 * _tensor(np.maximum(sigma, 1e-3), image.device)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(count, 1, 1, 1, -1).movedim(-1, 2 + axis)
    padding = [0] * 6
    padding[4 - 2 * axis: 6 - 2 * axis] = [radius, radius]
    return F.conv3d(F.pad(image[None], padding, mode="replicate"), kernel, groups=count)[0]


def _thick_slices(image: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Blur and keep every `factor`-th slice along `axis`, then interpolate linearly back."""
    thick = _blur(image, np.full(image.shape[0], factor / 2.0), axis)
    size, device = image.shape[1 + axis], image.device
    kept = torch.arange(0, size, factor, device=device)
    position = torch.arange(size, device=device, dtype=torch.float32) / factor
    below = position.floor().long().clamp(max=len(kept) - 1)
    above = (below + 1).clamp(max=len(kept) - 1)
    weight = (position - below).view([-1 if a == axis else 1 for a in range(3)])
    return (1 - weight) * thick.index_select(1 + axis, kept[below]) + weight * thick.index_select(1 + axis, kept[above])


def _percentiles(image: torch.Tensor, percents: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = image.flatten(1).sort(dim=1).values
    last = ordered.shape[1] - 1
    low, high = (ordered[:, int(round(p / 100 * last))] for p in percents)
    return low.view(-1, 1, 1, 1), high.view(-1, 1, 1, 1)


def render(labels: torch.Tensor, means: torch.Tensor, spreads: torch.Tensor, rng: np.random.Generator,
           generator: torch.Generator) -> torch.Tensor:
    """Images of label maps (per-image label intensities `means`/`spreads` [S, L]): texture, blur, bias
    field, thick slices, noise, gamma, then `normalize_intensity(..., "MR")` as for synthetic subjects."""
    count, shape = labels.shape[0], tuple(labels.shape[1:])
    flat = labels.flatten(1)
    noise = torch.randn(labels.shape, generator=generator, device=labels.device)
    image = (means.gather(1, flat) + spreads.gather(1, flat) * noise.flatten(1)).view(labels.shape)
    sigmas = rng.uniform(0.2, 1.2, (count, 3))
    for axis in range(3):
        image = _blur(image, sigmas[:, axis], axis)
    bias = _tensor(rng.uniform(0, 0.35, count), labels.device)[:, None, None, None]
    image = image * torch.exp(bias * _smooth_noise(count, shape, 3, generator))
    thick, axes, factors = rng.random(count) < 0.35, rng.integers(0, 3, count), rng.integers(2, 5, count)
    for axis, factor in sorted({(int(a), int(f)) for a, f, t in zip(axes, factors, thick) if t}):
        rows = np.flatnonzero(thick & (axes == axis) & (factors == factor)).tolist()
        image[rows] = _thick_slices(image[rows], axis, factor)
    amount = _tensor(rng.uniform(0, 0.05, count), labels.device)[:, None, None, None]
    image = image + amount * torch.randn(labels.shape, generator=generator, device=labels.device)
    low, high = _percentiles(image, (0.5, 99.5))
    image = ((image - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    image = image ** _tensor(np.exp(rng.normal(0, 0.3, count)), labels.device)[:, None, None, None]
    low, high = _percentiles(image, MR_PERCENTILES)
    image = torch.minimum(torch.maximum(image, low), high)
    mean, spread = image.mean((1, 2, 3), keepdim=True), image.std((1, 2, 3), keepdim=True)
    return (image - mean) / spread.clamp_min(1e-6)


def _slice_box_channels(masks: torch.Tensor, rng: np.random.Generator, config: EpisodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes on 1-3 slices of axis 0 spread over each structure, jittered, and their interpolated hull.

    masks [Q, T, U, V] (the chosen axis first) -> box, hull channels of that shape (as `random_slice_boxes`).
    """
    count, size_t, size_u, size_v = masks.shape
    device = masks.device
    slices = rng.integers(1, 4, count)
    fractions = np.stack([[rng.uniform(e[n], e[n + 1]) for e in [np.linspace(0.05, 0.95, s + 1)] for n in range(s)]
                          + [np.nan] * (3 - s) for s in slices])
    fractions = np.where(np.isnan(fractions), np.nanmax(fractions, axis=1, keepdims=True), fractions)  # unused: repeat the last
    jitter = rng.uniform(0, config.box_jitter, count)[:, None, None] * rng.uniform(-1, 1, (count, 3, 4))
    profile = masks.any(3).any(2)
    lo, hi = _extent(profile)
    target = lo[:, None] + _tensor(fractions, device) * (hi - lo)[:, None]
    index = torch.arange(size_t, device=device)
    distance = (index[None, None] - target[..., None]).abs().masked_fill(~profile[:, None], float("inf"))
    position = distance.argmin(-1)  # [Q, 3]: the occupied slice nearest each fraction
    sections = masks[torch.arange(count, device=device)[:, None], position]
    (u_lo, u_hi), (v_lo, v_hi) = _extent(sections.any(3)), _extent(sections.any(2))
    bounds = torch.stack([u_lo, u_hi, v_lo, v_hi], -1)
    extent = (torch.stack([u_hi - u_lo, u_hi - u_lo, v_hi - v_lo, v_hi - v_lo], -1) + 1) * _tensor([-1, 1, -1, 1], device)
    bounds = bounds + _tensor(jitter, device) * extent
    limit = _tensor([size_u - 1, size_u - 1, size_v - 1, size_v - 1], device)
    bounds = torch.minimum(bounds.clamp_min(0), limit)
    bounds[..., 1] = torch.maximum(bounds[..., 1], bounds[..., 0])
    bounds[..., 3] = torch.maximum(bounds[..., 3], bounds[..., 2])
    position = position.float()
    box_t = _interval(position, position, size_t, thicken=True)
    box_u, box_v = _interval(bounds[..., 0], bounds[..., 1], size_u, True), _interval(bounds[..., 2], bounds[..., 3], size_v, True)
    box = (box_t[..., :, None, None] & box_u[..., None, :, None] & box_v[..., None, None, :]).any(1)
    start, stop = position[:, :-1, None], position[:, 1:, None]  # consecutive slices: hull in between
    t = index.float()
    inside = (t >= start) & (t <= stop)
    weight = ((t - start) / (stop - start).clamp_min(1e-6)).clamp(0, 1)[..., None]
    between = (1 - weight) * bounds[:, :-1, None] + weight * bounds[:, 1:, None]  # [Q, 2, T, 4]
    hull_u = _interval(between[..., 0], between[..., 1], size_u, False) & inside[..., None]
    hull_v = _interval(between[..., 2], between[..., 3], size_v, False)
    hull = (hull_u[..., None] & hull_v[..., None, :]).any(1)
    return box.float(), hull.float()


def _box3d_channels(masks: torch.Tensor, rng: np.random.Generator, config: EpisodeConfig) -> torch.Tensor:
    """The 3D bounding box, each side moved by up to `box_jitter` of the extent (as `jittered_box`): [Q, D, H, W]."""
    count, shape = masks.shape[0], tuple(masks.shape[1:])
    jitter = _tensor(rng.uniform(-config.box_jitter, config.box_jitter, (count, 3, 2)), masks.device)
    box = torch.ones_like(masks)
    for axis, size in enumerate(shape):
        profile = masks.any(dim=[1 + a for a in range(3) if a != axis])
        lo, hi = _extent(profile)
        extent = hi - lo + 1
        lo = (lo - jitter[:, axis, 0] * extent).clamp(0, size - 1)
        hi = torch.minimum(torch.maximum(hi + jitter[:, axis, 1] * extent, lo), torch.full_like(lo, size - 1))
        box = box & _interval(lo, hi, size, True).view([count] + [-1 if a == axis else 1 for a in range(3)])
    return box.float()


def _sample(weights: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` voxels per row drawn with probability ~ weights [Q, D, H, W]; (voxels [Q, count, 3], row has any)."""
    flat = weights.flatten(1)
    present = flat.sum(1) > 0
    flat = torch.where(present[:, None], flat, torch.ones_like(flat))
    return _voxels(torch.multinomial(flat, count, replacement=True, generator=generator), tuple(weights.shape[1:])), present


def _point_channels(masks: torch.Tensor, positives: np.ndarray, negatives: np.ndarray, margins: np.ndarray,
                    generator: torch.Generator, radius_vox: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive points weighted by the squared depth inside, negative points in a band of `margins`
    voxels around the structure (as `random_points`); soft spheres [Q, D, H, W] each."""
    shape, device = tuple(masks.shape[1:]), masks.device
    inside = masks.float()
    centres, _ = _sample(_depth(inside) ** 2, MAX_POSITIVES, generator)
    bands, grown = [], inside
    for _ in range(MAX_MARGIN):
        grown = _dilate(grown)
        bands.append(grown)
    band = torch.stack(bands)[_tensor(margins - 1, device, torch.long), torch.arange(len(margins), device=device)] * (1 - inside)
    outside, present = _sample(band, MAX_NEGATIVES, generator)
    wanted_pos = torch.arange(MAX_POSITIVES, device=device) < _tensor(positives, device)[:, None]
    wanted_neg = (torch.arange(MAX_NEGATIVES, device=device) < _tensor(negatives, device)[:, None]) & present[:, None]
    return _spheres(centres, wanted_pos, shape, radius_vox), _spheres(outside, wanted_neg, shape, radius_vox)


def weak_prompts(masks: torch.Tensor, rng: np.random.Generator, generator: torch.Generator, config: EpisodeConfig,
                 radius_vox: float) -> torch.Tensor:
    """Prompt channels [Q, 5, D, H, W] of weak prompts on each (non-empty) mask [Q, D, H, W], in the
    styles of `prompt_weights` (slice boxes on one axis of `axis_weights`, a 3D box, points, both)."""
    count = masks.shape[0]
    prompts = torch.zeros((count, len(PROMPT_CHANNELS)) + tuple(masks.shape[1:]), device=masks.device)
    styles = np.array([_choose(rng, config.prompt_weights) for _ in range(count)])
    axes = rng.choice(3, size=count, p=np.asarray(config.axis_weights) / np.sum(config.axis_weights))
    sliced = np.isin(styles, ("slice_boxes", "boxes_points"))
    for axis in range(3):
        rows = np.flatnonzero(sliced & (axes == axis)).tolist()
        if rows:
            box, hull = _slice_box_channels(masks[rows].movedim(1 + axis, 1), rng, config)
            prompts[rows, BOX], prompts[rows, HULL] = box.movedim(1, 1 + axis), hull.movedim(1, 1 + axis)
    rows = np.flatnonzero(styles == "box3d").tolist()
    if rows:
        prompts[rows, BOX] = prompts[rows, HULL] = _box3d_channels(masks[rows], rng, config)
    rows = np.flatnonzero(np.isin(styles, ("points", "boxes_points")))
    if len(rows):
        only = styles[rows] == "points"
        positives = np.where(only, rng.integers(1, 6, len(rows)), rng.integers(1, 3, len(rows)))
        negatives = np.where(only, rng.integers(0, 4, len(rows)), rng.integers(0, 3, len(rows)))
        margins = rng.integers(2, MAX_MARGIN + 1, len(rows))
        prompts[rows.tolist(), POSITIVE], prompts[rows.tolist(), NEGATIVE] = _point_channels(
            masks[rows.tolist()], positives, negatives, margins, generator, radius_vox)
    return prompts


def corrupt_masks(masks: torch.Tensor, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
    """Plausible earlier segmentations of masks [C, D, H, W]: grown or shrunk, shifted, cut short, with a
    stray blob, or empty (as `episodes.corrupt_mask`)."""
    count, shape, device = masks.shape[0], tuple(masks.shape[1:]), masks.device

    def rows(p: float) -> torch.Tensor:
        return _tensor(rng.random(count) < p, device, torch.bool)[:, None, None, None]

    truth = masks.float()
    grown, shrunk = _dilate(truth), _erode(truth)
    twice = _tensor(rng.integers(1, 3, count) == 2, device, torch.bool)[:, None, None, None]
    grown, shrunk = torch.where(twice, _dilate(grown), grown), torch.where(twice, _erode(shrunk), shrunk)
    previous = torch.where(rows(0.5), torch.where(rows(0.5), grown, shrunk), truth)
    shift = _tensor(rng.integers(-2, 3, (count, 3)), device) * rows(0.4)[:, :, 0, 0]
    size = _tensor(shape, device)
    grid = _index_grid(shape, device)[None] - shift[:, :, None, None, None]
    grid = (2 * grid / (size - 1)[:, None, None, None] - 1).permute(0, 2, 3, 4, 1).flip(-1)
    previous = F.grid_sample(previous[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[:, 0]
    axis = _tensor(rng.integers(0, 3, count), device, torch.long)
    coordinate = _index_grid(shape, device)[axis]
    extents = [_extent(masks.any(dim=[1 + b for b in range(3) if b != a])) for a in range(3)]
    lo, hi = (torch.stack(ends, 1).gather(1, axis[:, None])[:, 0] for ends in zip(*extents))
    cut = (lo + torch.floor(_tensor(rng.random(count), device) * (hi - lo + 1)))[:, None, None, None]
    keep = torch.where(rows(0.5), coordinate < cut, coordinate >= cut)
    previous = torch.where(rows(0.5), previous * keep, previous)
    grown = truth
    for _ in range(MAX_MARGIN):
        grown = _dilate(grown)
    centre, present = _sample(grown * (1 - truth), 1, generator)
    reach = _tensor(rng.integers(1, 4, count), device)[:, None, None, None]
    blob = ((_index_grid(shape, device)[None] - centre[:, 0, :, None, None, None]).abs().amax(1) <= reach)
    previous = torch.where(rows(0.4) & present[:, None, None, None], torch.maximum(previous, blob.float()), previous)
    return torch.where(rows(0.1), torch.zeros_like(previous), previous) > 0.5


def with_corrective_clicks(prompts: torch.Tensor, previous: torch.Tensor, truth: torch.Tensor, clicks: np.ndarray,
                           radius_vox: float) -> torch.Tensor:
    """Prompts [C, 5, ...] with the previous masks in the mask channel and up to `clicks` corrective
    clicks each (approximating `episodes.corrective_clicks`): at the deepest voxel of the larger error,
    positive where the previous mask misses, negative where it overshoots; the error near a click then
    counts as fixed."""
    prompts = prompts.clone()
    prompts[:, MASK_CHANNEL] = previous.float()
    shape, device = tuple(truth.shape[1:]), truth.device
    previous = previous.clone()
    for click in range(int(clicks.max(initial=0))):
        missed, extra = truth & ~previous, previous & ~truth
        positive = missed.sum((1, 2, 3)) >= extra.sum((1, 2, 3))
        error = torch.where(positive[:, None, None, None], missed, extra)
        wanted = error.any(dim=(1, 2, 3)) & _tensor(clicks > click, device, torch.bool)
        deepest = _depth(error.float()).flatten(1).argmax(1)
        sphere = _spheres(_voxels(deepest, shape)[:, None], wanted[:, None], shape, radius_vox)
        for channel, side in ((POSITIVE, positive), (NEGATIVE, ~positive)):
            prompts[:, channel] = torch.maximum(prompts[:, channel], sphere * side[:, None, None, None])
        fixed = torch.zeros_like(error, dtype=torch.float32).flatten(1)
        fixed[torch.arange(len(deepest), device=device), deepest] = wanted.float()
        fixed = fixed.view_as(error)
        for _ in range(FLOOD_STEPS):
            fixed = _dilate(fixed) * error
        previous = torch.where(fixed > 0, truth, previous)
    return prompts


def atlas_prior(sources: torch.Tensor, source_masks: torch.Tensor, target_masks: torch.Tensor, rows: torch.Tensor,
                rng: np.random.Generator, shift_voxels: tuple[float, float], scale_jitter: float) -> torch.Tensor:
    """What registering references onto a target gives (as `episodes.simulated_atlas_prior`): each
    source [P, D, H, W] moved so that its structure lands near the target structure of its row (centre
    within a spread drawn from `shift_voxels`, size within `scale_jitter`), averaged per row -> [N, D, H, W]."""
    shape, device = tuple(sources.shape[1:]), sources.device
    grid = _index_grid(shape, device)

    def centre_and_size(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = masks.float()
        total = weight.sum((1, 2, 3))
        return torch.einsum("p...,a...->pa", weight, grid) / total[:, None], total ** (1 / 3)

    target_centre, target_size = centre_and_size(target_masks)
    source_centre, source_size = centre_and_size(source_masks)
    spread = _tensor(rng.uniform(*shift_voxels, target_masks.shape[0]), device)[rows]
    jitter = _tensor(rng.uniform(1 - scale_jitter, 1 + scale_jitter, len(rows)), device)
    scale = source_size / target_size[rows] * jitter
    landing = target_centre[rows] + spread[:, None] * _tensor(rng.standard_normal((len(rows), 3)), device)
    offset = source_centre - scale[:, None] * landing  # output voxel x samples the source at scale * x + offset
    coords = scale[:, None, None, None, None] * grid[None] + offset[:, :, None, None, None]
    size = _tensor(shape, device)[:, None, None, None]
    moved = F.grid_sample(sources[:, None], (2 * coords / (size - 1) - 1).permute(0, 2, 3, 4, 1).flip(-1),
                          mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
    summed = torch.zeros_like(target_masks, dtype=torch.float32).index_add_(0, rows, moved)
    return (summed / torch.bincount(rows, minlength=target_masks.shape[0]).clamp_min(1)[:, None, None, None]).clamp(0, 1)


class DeviceEpisodes:
    """Draws a step's synthetic episodes on `device` (modes and prompt styles of an `EpisodeConfig`)."""

    def __init__(self, config: EpisodeConfig, patch_size: tuple[int, int, int], spacing_mm: float, seed: int, device: str) -> None:
        self.config, self.seed, self.device = config, int(seed), torch.device(device)
        self.shape = tuple(int(n) for n in patch_size)
        self.radius_vox = config.point_radius_mm / float(spacing_mm)

    def sample(self, step: int, count: int) -> DeviceBatch:
        """`count` episodes of step `step` (fewer when a layout has no structure big enough, which is rare)."""
        config, device = self.config, self.device
        rng = np.random.default_rng([self.seed, int(step), DEVICE_STREAM])
        generator = torch.Generator(device=device)
        generator.manual_seed(int(rng.integers(2**62)))
        modes = [_choose(rng, config.mode_weights) for _ in range(count)]
        bases = ["propagate" if m == "propagate" or (m == "correction" and rng.random() < 0.5) else "cross" for m in modes]
        references = [0 if base == "propagate" else int(rng.integers(1, config.max_references + 1)) for base in bases]
        owner = np.repeat(np.arange(count), [1 + r for r in references])  # the episode of each subject
        layouts = random_layouts(count, self.shape, rng, generator)
        labels = deform(layouts[_tensor(owner, device, torch.long)], rng, generator)
        values = int(layouts.max()) + 1
        layout_means = rng.uniform(0, 1, (count, values))
        for row in layout_means:
            with_look_alikes(row, rng, config.similar_contrast_fraction)
        means = layout_means[owner] + rng.normal(0, 0.05, (len(owner), values))
        spreads = rng.uniform(0.005, 0.08, (count, values))[owner]
        images = render(labels, _tensor(np.clip(means, 0, 1), device), _tensor(spreads, device), rng, generator)
        counts = torch.zeros((len(owner), values), device=device).scatter_add_(
            1, labels.flatten(1), torch.ones(labels.flatten(1).shape, device=device)).cpu().numpy()

        first = np.concatenate([[0], np.cumsum([1 + r for r in references])[:-1]])
        kept, rows, pairs, drawn_modes = [], [], [], []  # rows: (target image, group); pairs: (row, image, subject, dense)
        for episode in range(count):
            subjects = list(range(first[episode], first[episode] + 1 + references[episode]))
            groups = self._classes(counts[subjects], rng)
            if not groups and len(subjects) > 1:  # a structure missing from a reference: propagate instead
                subjects, bases[episode] = subjects[:1], "propagate"
                groups = self._classes(counts[subjects], rng)
            if not groups:
                continue
            mode = modes[episode] if modes[episode] in ("correction", "propagate") or bases[episode] == "cross" else bases[episode]
            dense = rng.random(len(subjects)) < config.dense_reference_fraction
            target = len(kept)
            kept += subjects
            for group in groups:
                rows.append((target, group, mode, bases[episode]))
                references_of_row = [(0, False)] if bases[episode] == "propagate" else [(n, dense[n]) for n in range(1, len(subjects))]
                pairs += [(len(rows) - 1, target + n, subjects[n], is_dense) for n, is_dense in references_of_row]
            drawn_modes.append(mode)
        return self._assemble(images[kept], labels, kept, rows, pairs, drawn_modes, rng, generator)

    def _classes(self, counts: np.ndarray, rng: np.random.Generator) -> list[tuple[int, ...]]:
        """Label groups present in every subject (as `EpisodeSampler._classes`); counts [subjects, values]."""
        present = (counts >= MIN_CLASS_VOXELS).all(axis=0)
        candidates = [int(v) for v in np.flatnonzero(present) if v > 0]
        if not candidates:
            return []
        rng.shuffle(candidates)
        chosen = candidates[: int(rng.integers(1, self.config.max_classes + 1))]
        groups = [(value,) for value in chosen]
        if len(candidates) > len(chosen) and rng.random() < self.config.merge_fraction:
            groups[0] = (chosen[0], candidates[len(chosen)])
        return groups

    def _assemble(self, images, labels, kept, rows, pairs, modes, rng, generator) -> DeviceBatch:
        device, radius = self.device, self.radius_vox

        def masks_of(subjects: list[int], groups: list[tuple[int, ...]]) -> torch.Tensor:
            values = _tensor([group + (-1,) * (2 - len(group)) for group in groups], device, torch.long)
            chosen = labels[_tensor(subjects, device, torch.long)]
            return (chosen[:, None] == values[:, :, None, None, None]).any(1)

        truth = masks_of([kept[target] for target, *_ in rows], [group for _, group, *_ in rows])
        row_of_pair = _tensor([row for row, *_ in pairs], device, torch.long)
        pair_masks = masks_of([subject for _, _, subject, _ in pairs], [rows[row][1] for row, *_ in pairs])
        weak_rows = [n for n, (_, _, _, base) in enumerate(rows) if base == "propagate"]
        weak_pairs = [p for p, (row, _, _, dense) in enumerate(pairs) if rows[row][3] == "cross" and not dense]
        drawn = weak_prompts(torch.cat([truth[weak_rows], pair_masks[weak_pairs]]), rng, generator, self.config, radius)
        target_prompts = torch.zeros((len(rows),) + tuple(drawn.shape[1:]), device=device)
        target_prompts[weak_rows] = drawn[: len(weak_rows)]
        ref_prompts = target_prompts[row_of_pair].clone()  # propagation: the target's own prompts
        ref_prompts[weak_pairs] = drawn[len(weak_rows):]
        dense_pairs = [p for p, (row, _, _, dense) in enumerate(pairs) if rows[row][3] == "cross" and dense]
        ref_prompts[dense_pairs, MASK_CHANNEL] = pair_masks[dense_pairs].float()
        atlas = [p for p, (row, *_) in enumerate(pairs) if rows[row][2] == "atlas"]
        if atlas:
            atlas_rows = row_of_pair[atlas]
            sources = ref_prompts[atlas][:, FOREGROUND_CHANNELS].amax(1)
            prior = atlas_prior(sources, pair_masks[atlas], truth, atlas_rows, rng, self.config.atlas_shift_voxels,
                                self.config.atlas_scale_jitter)
            target_prompts[atlas_rows, MASK_CHANNEL] = prior[atlas_rows]
        corrected = [n for n, (*_, mode, _) in enumerate(rows) if mode == "correction"]
        base_prompts = target_prompts[corrected].clone()
        if corrected:
            previous = corrupt_masks(truth[corrected], rng, generator)
            clicks = rng.integers(1, self.config.max_clicks + 1, len(corrected))
            target_prompts[corrected] = with_corrective_clicks(base_prompts, previous, truth[corrected], clicks, radius)
        inputs = FlatBatch(images[:, None], _tensor([image for _, image, _, _ in pairs], device, torch.long), ref_prompts,
                           row_of_pair, _tensor([target for target, *_ in rows], device, torch.long), target_prompts,
                           truth[:, None].float())
        return DeviceBatch(inputs, modes, _tensor(corrected, device, torch.long), base_prompts, self.config.max_clicks, radius)


def correct_own_predictions(predict: Callable[[FlatBatch], torch.Tensor], batch: DeviceBatch, rng: np.random.Generator,
                            fraction: float, autocast: Callable, rounds: int = 1) -> None:
    """Replace the corrupted-truth previous mask of about `fraction` of the correction rows by the
    network's own prediction from the rows' prompts without correction inputs, with new clicks (in place);
    then `rounds` - 1 times predict again with those clicks and add one on the new result."""
    chosen = batch.correction_rows[_tensor(rng.random(len(batch.correction_rows)) < fraction, batch.correction_rows.device, torch.bool)]
    if not len(chosen):
        return
    part = batch.inputs.select(chosen)
    part.target_prompts = batch.base_prompts[torch.isin(batch.correction_rows, chosen)]
    truth = part.masks[:, 0] > 0.5
    clicks = rng.integers(1, batch.max_clicks + 1, len(chosen))  # the first round's; one a round after it
    for _ in range(rounds):
        with torch.no_grad(), autocast():
            previous = predict(part)[:, 0] > 0
        part.target_prompts = with_corrective_clicks(part.target_prompts, previous, truth, clicks, batch.radius_vox)
        clicks = np.ones(len(chosen), dtype=int)
    batch.inputs.target_prompts[chosen] = part.target_prompts
