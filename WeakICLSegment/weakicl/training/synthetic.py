"""Procedural in-context tasks: random label layouts rendered as images (the SynthSeg idea).

A *layout* is a random 3D label map (ellipsoids, irregular blobs, tubes, shells, nested and touching
structures) that plays the role of one synthetic anatomy. Its *subjects* are random elastic and affine
deformations of it, each rendered with per-label intensities, partial-volume blur, bias field,
anisotropic resolution, noise and gamma. Subjects of one layout are related the way two patients are,
so a reference and a target drawn from one layout make an in-context task.

Everything is numpy/scipy on the CPU and deterministic for a given `numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

SHAPE_KINDS = ("ellipsoid", "blob", "tube", "nested", "touching", "shell")
SHAPE_WEIGHTS = np.array([0.25, 0.2, 0.15, 0.15, 0.15, 0.1])
MIN_STRUCTURE_VOXELS = 40


@dataclass(frozen=True)
class Contrast:
    """Per-label intensity of one synthetic "sequence": mean and spread for labels 0..n."""

    means: np.ndarray
    spreads: np.ndarray

    def varied(self, rng: np.random.Generator, amount: float = 0.05) -> Contrast:
        """The same sequence on another scanner or subject: means shifted slightly."""
        return Contrast(np.clip(self.means + rng.normal(0, amount, self.means.shape), 0, 1), self.spreads)


@lru_cache(maxsize=4)
def _unit_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel centres scaled to [-1, 1] per axis, shape (3, D, H, W), float32."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, control: int = 5) -> np.ndarray:
    """Smooth random field with unit-variance control values on a `control`^3 grid, trilinear in between."""
    coarse = rng.standard_normal((control,) * 3).astype(np.float32)
    return ndimage.zoom(coarse, [n / control for n in shape], order=1, mode="nearest", grid_mode=True)[
        : shape[0], : shape[1], : shape[2]
    ]


def random_rotation(rng: np.random.Generator, max_degrees: float = 180.0) -> np.ndarray:
    """Rotation matrix about a random axis by up to `max_degrees`."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


class _Painter:
    """Paints implicit shapes (negative inside) one after another onto a label map."""

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator) -> None:
        self.rng = rng
        self.grid = _unit_grid(shape)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.roughness = [smooth_field(shape, rng, control=6) for _ in range(3)]
        self.fields: list[np.ndarray] = []
        self.centres: list[np.ndarray] = []
        self.radii: list[np.ndarray] = []

    def _rough(self, amplitude: float) -> np.ndarray:
        weights = self.rng.normal(0, amplitude, 3).astype(np.float32)
        return sum(w * f for w, f in zip(weights, self.roughness))

    def ellipsoid(self, centre: np.ndarray, radii: np.ndarray, roughness: float) -> np.ndarray:
        offset = self.grid - centre.reshape(3, 1, 1, 1).astype(np.float32)
        rotated = np.einsum("ij,j...->i...", random_rotation(self.rng).astype(np.float32), offset)
        scaled = rotated / radii.reshape(3, 1, 1, 1).astype(np.float32)
        return np.sqrt((scaled**2).sum(axis=0)) - 1.0 + self._rough(roughness)

    def tube(self, radius: float) -> np.ndarray:
        """Quadratic Bezier curve through the volume, thickened to `radius` (unit-grid units)."""
        ends = self.rng.uniform(-0.9, 0.9, (3, 3))
        t = np.linspace(0, 1, 48)[:, None]
        curve = (1 - t) ** 2 * ends[0] + 2 * t * (1 - t) * ends[1] + t**2 * ends[2]
        shape = np.array(self.labels.shape)
        marks = np.ones(self.labels.shape, dtype=bool)
        indices = np.clip(np.rint((curve + 1) / 2 * (shape - 1)).astype(int), 0, shape - 1)
        marks[tuple(indices.T)] = False
        distance = ndimage.distance_transform_edt(marks, sampling=2.0 / (shape - 1)).astype(np.float32)
        return distance / radius - 1.0 + self._rough(0.15)

    def paint(self, field: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> None:
        self.labels[field <= 0] = len(self.fields) + 1
        self.fields.append(field)
        self.centres.append(centre)
        self.radii.append(radii)

    def add(self, kind: str) -> None:
        rng = self.rng
        if kind in ("nested", "touching", "shell") and not self.fields:
            kind = "ellipsoid"
        if kind in ("ellipsoid", "blob"):
            centre = rng.uniform(-0.6, 0.6, 3)
            radii = rng.uniform(0.12, 0.45, 3)
            self.paint(self.ellipsoid(centre, radii, 0.08 if kind == "ellipsoid" else 0.35), centre, radii)
        elif kind == "tube":
            radius = rng.uniform(0.04, 0.1)
            self.paint(self.tube(radius), np.zeros(3), np.full(3, radius))
        elif kind == "nested":
            parent = rng.integers(len(self.fields))
            radii = self.radii[parent] * rng.uniform(0.3, 0.6, 3)
            centre = self.centres[parent] + rng.uniform(-0.3, 0.3, 3) * self.radii[parent]
            self.paint(self.ellipsoid(centre, radii, 0.1), centre, radii)
        elif kind == "touching":
            parent = rng.integers(len(self.fields))
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            radii = rng.uniform(0.1, 0.3, 3)
            centre = self.centres[parent] + direction * (self.radii[parent].mean() + 0.6 * radii.mean())
            self.paint(self.ellipsoid(centre, radii, 0.1), centre, radii)
        else:
            parent = rng.integers(len(self.fields))
            thickness = rng.uniform(0.1, 0.3)
            around = self.fields[parent]
            shell = np.where(around > 0, around - thickness, 1.0).astype(np.float32)
            self.paint(shell, self.centres[parent], self.radii[parent] * (1 + thickness))

    def result(self) -> np.ndarray:
        """Label map with structures too small to be a task merged into the background, renumbered 1..n."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.fields) + 1)
        keep = np.flatnonzero(counts >= MIN_STRUCTURE_VOXELS)
        keep = keep[keep > 0]
        lookup = np.zeros(len(counts), dtype=np.uint8)
        lookup[keep] = np.arange(1, len(keep) + 1)
        return lookup[self.labels]


def random_layout(shape: tuple[int, int, int], rng: np.random.Generator, max_structures: int = 8) -> np.ndarray:
    """A random synthetic anatomy: uint8 label map, background 0, structures 1..n (n >= 1 in practice)."""
    painter = _Painter(tuple(int(n) for n in shape), rng)
    if rng.random() < 0.6:
        painter.paint(painter.ellipsoid(np.zeros(3), rng.uniform(0.7, 1.0, 3), 0.1), np.zeros(3), np.full(3, 0.85))
    for kind in rng.choice(SHAPE_KINDS, size=rng.integers(2, max_structures + 1), p=SHAPE_WEIGHTS):
        painter.add(str(kind))
    return painter.result()


def deform(labels: np.ndarray, rng: np.random.Generator, displacement_vox: float = 3.0, max_degrees: float = 12.0) -> np.ndarray:
    """Another subject of the same anatomy: smooth elastic displacement plus a small affine, nearest-neighbour."""
    shape = np.array(labels.shape, dtype=np.float32)
    centre = (shape - 1) / 2
    matrix = random_rotation(rng, max_degrees) * rng.uniform(0.88, 1.12, 3)
    shift = rng.uniform(-0.05, 0.05, 3) * shape
    grid = np.indices(labels.shape, dtype=np.float32).reshape(3, -1)
    coords = (matrix.astype(np.float32) @ (grid - centre[:, None])) + (centre + shift)[:, None].astype(np.float32)
    amplitude = rng.uniform(0, displacement_vox)
    for axis in range(3):
        coords[axis] += amplitude * smooth_field(labels.shape, rng, control=4).ravel()
    return ndimage.map_coordinates(labels, coords, order=0, mode="nearest").reshape(labels.shape)


SIMILAR_OFFSET = (0.02, 0.08)  # a look-alike's mean differs from its model's by this much (either sign)


def random_contrast(count: int, rng: np.random.Generator, similar_fraction: float = 0.0) -> Contrast:
    """Random intensities for background and `count` labels, so any structure can be bright or dark;
    with look-alike neighbours in `similar_fraction` of them (`with_look_alikes`)."""
    means = rng.uniform(0, 1, count + 1)
    spreads = rng.uniform(0.005, 0.08, count + 1)
    with_look_alikes(means, rng, similar_fraction)
    return Contrast(means, spreads)


def render(labels: np.ndarray, contrast: Contrast, rng: np.random.Generator) -> np.ndarray:
    """Image of a label map: texture, partial-volume blur, bias field, anisotropy, noise, gamma; float32 in [0, 1]."""
    shape = labels.shape
    image = contrast.means[labels] + contrast.spreads[labels] * rng.standard_normal(shape, dtype=np.float32)
    image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.2, 1.2, 3))
    image *= np.exp(rng.uniform(0, 0.35) * smooth_field(shape, rng, control=3))
    if rng.random() < 0.35:
        image = _lower_resolution(image, int(rng.integers(0, 3)), int(rng.integers(2, 5)))
    image += rng.uniform(0, 0.05) * rng.standard_normal(shape, dtype=np.float32)
    low, high = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    return (image ** np.exp(rng.normal(0, 0.3))).astype(np.float32)


def _lower_resolution(image: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Thick slices along `axis`: blur and keep every `factor`-th slice, then interpolate linearly back."""
    thick = ndimage.gaussian_filter1d(image, factor / 2.0, axis=axis)
    kept = np.take(thick, np.arange(0, image.shape[axis], factor), axis=axis)
    position = np.arange(image.shape[axis]) / factor
    below = np.minimum(np.floor(position).astype(int), kept.shape[axis] - 1)
    above = np.minimum(below + 1, kept.shape[axis] - 1)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = -1
    weight = (position - below).reshape(weight_shape).astype(np.float32)
    return (1 - weight) * np.take(kept, below, axis=axis) + weight * np.take(kept, above, axis=axis)


def with_look_alikes(means: np.ndarray, rng: np.random.Generator, fraction: float) -> None:
    """In place, with probability `fraction`: about half the labels of `means` [background, 1..n] take
    the mean of one of the others that keep theirs (the background's too), offset by SIMILAR_OFFSET. Why:
    look-alike neighbours, as a liver beside the kidney, vena cava and muscle of nearly its density on a CT
    without contrast, which only shape and subtle contrast separate; independent random intensities rarely
    make them. No random number is drawn when `fraction` is 0, so existing episode streams stand."""
    if fraction <= 0 or len(means) < 2 or rng.random() >= fraction:
        return
    changing = np.concatenate([[False], rng.random(len(means) - 1) < 0.5])
    models = np.flatnonzero(~changing)
    for label in np.flatnonzero(changing):
        offset = rng.uniform(*SIMILAR_OFFSET) * rng.choice([-1.0, 1.0])
        means[label] = np.clip(means[int(rng.choice(models))] + offset, 0.0, 1.0)


class SyntheticTasks:
    """A deterministic family of synthetic anatomies: layout `index` is always the same label map."""

    def __init__(self, shape: tuple[int, int, int], seed: int, anatomies: int = 5000, max_structures: int = 8,
                 similar_fraction: float = 0.0) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.similar_fraction = similar_fraction
        self.seed = int(seed)
        self.anatomies = int(anatomies)
        self.max_structures = max_structures
        self.layout = lru_cache(maxsize=128)(self._make_layout)

    def _make_layout(self, index: int) -> np.ndarray:
        return random_layout(self.shape, np.random.default_rng([self.seed, 7919, index]), self.max_structures)

    def subjects(self, rng: np.random.Generator, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """`count` related subjects of one random anatomy: (images, label maps), one shared contrast."""
        layout = self.layout(int(rng.integers(self.anatomies)))
        contrast = random_contrast(int(layout.max()), rng, self.similar_fraction)
        labels = [deform(layout, rng) for _ in range(count)]
        images = [render(subject, contrast.varied(rng), rng) for subject in labels]
        return images, labels
