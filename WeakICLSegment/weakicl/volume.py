"""Images with explicit geometry, read and written with SimpleITK.

Arrays are indexed [k, j, i]; voxel coordinates are IJK; physical coordinates are LPS millimetres
(ITK's convention). RAS appears only in the `*_ras` conversions used at the Slicer and markups edges.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MASK_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a [k, j, i] array lie in LPS space."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    shape_kji: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=float).reshape(3, 3))
        object.__setattr__(self, "shape_kji", tuple(int(n) for n in self.shape_kji))
        if min(self.spacing) <= 0:
            raise InputError(f"voxel spacing must be positive, got {self.spacing}")

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray, shape_kji: tuple[int, int, int]) -> Geometry:
        """Geometry from a Slicer-style 4x4 IJK-to-RAS matrix."""
        ijk_to_lps = np.asarray(matrix, dtype=float)[:3, :4].copy()
        ijk_to_lps = LPS_TO_RAS @ ijk_to_lps
        spacing = np.linalg.norm(ijk_to_lps[:, :3], axis=0)
        return cls(tuple(spacing), tuple(ijk_to_lps[:, 3]), ijk_to_lps[:, :3] / spacing, shape_kji)

    @classmethod
    def identity(cls, shape_kji: tuple[int, int, int], spacing=(1.0, 1.0, 1.0)) -> Geometry:
        return cls(tuple(spacing), (0.0, 0.0, 0.0), np.eye(3), shape_kji)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return self.shape_kji[::-1]

    def ijk_to_lps_matrix(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras_matrix(self) -> np.ndarray:
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.ijk_to_lps_matrix()

    def ijk_to_lps(self, points_ijk: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        return points @ (self.direction * np.asarray(self.spacing)).T + np.asarray(self.origin)

    def lps_to_ijk(self, points_lps: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(np.asarray(points_lps, dtype=float)) - np.asarray(self.origin)
        return np.linalg.solve(self.direction * np.asarray(self.spacing), points.T).T

    def ijk_to_ras(self, points_ijk: np.ndarray) -> np.ndarray:
        return self.ijk_to_lps(points_ijk) @ LPS_TO_RAS

    def ras_to_ijk(self, points_ras: np.ndarray) -> np.ndarray:
        return self.lps_to_ijk(np.atleast_2d(np.asarray(points_ras, dtype=float)) @ LPS_TO_RAS)

    def contains_ijk(self, points_ijk: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
        """True for points inside the image, voxel borders included."""
        points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        upper = np.asarray(self.shape_ijk, dtype=float) - 1 + tolerance
        return np.all((points >= -tolerance) & (points <= upper), axis=1)

    def same_grid(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        return (
            self.shape_kji == other.shape_kji
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )


@dataclass
class Volume:
    """A scalar 3D image: array [k, j, i] plus geometry and modality ("CT", "MR" or "auto")."""

    array: np.ndarray
    geometry: Geometry
    modality: str = "auto"

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"expected a 3D image, got an array of {self.array.ndim} dimensions")
        if tuple(self.array.shape) != self.geometry.shape_kji:
            raise InputError(f"array shape {self.array.shape} does not match geometry {self.geometry.shape_kji}")
        if self.modality not in ("CT", "MR", "auto"):
            raise InputError(f"modality must be CT, MR or auto, not {self.modality!r}")


def volume_digest(volume: Volume) -> str:
    """Content key of a volume: ids of freed arrays are reused, and arrays may be edited in place."""
    digest = hashlib.blake2b(np.ascontiguousarray(volume.array).view(np.uint8).ravel(), digest_size=16)
    digest.update(repr((volume.array.dtype.str, volume.array.shape, volume.geometry.spacing, volume.modality)).encode())
    return digest.hexdigest()


def _sitk():
    import SimpleITK as sitk

    return sitk


def geometry_of(image) -> Geometry:
    """Geometry of a SimpleITK image."""
    return Geometry(image.GetSpacing(), image.GetOrigin(), np.reshape(image.GetDirection(), (3, 3)), image.GetSize()[::-1])


def read_volume(path: str | os.PathLike, modality: str = "auto") -> Volume:
    """Read a 3D scalar image (NIfTI, NRRD, MHA, ...) as a Volume."""
    sitk = _sitk()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read image {path}: {str(error).strip().splitlines()[-1]}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name}: expected a scalar image, it has {image.GetNumberOfComponentsPerPixel()} components")
    if image.GetDimension() != 3:
        raise InputError(f"{path.name}: expected a 3D image, it is {image.GetDimension()}D")
    return Volume(sitk.GetArrayFromImage(image), geometry_of(image), modality)


def read_label_map(path: str | os.PathLike, geometry: Geometry | None = None) -> np.ndarray:
    """Read an integer label image; with `geometry`, require it to lie on that grid."""
    volume = read_volume(path)
    if geometry is not None and not volume.geometry.same_grid(geometry, tolerance=1e-3):
        raise InputError(f"{Path(path).name}: the label image does not lie on the grid of its image")
    return np.rint(volume.array).astype(np.int32)


def _mask_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"output must end with one of {', '.join(MASK_SUFFIXES)}: {path.name}")


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail before any work when an output could not be written."""
    path = Path(path)
    _mask_suffix(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"output folder is not writable: {path.parent}")
    return path


SEGMENT_COLOURS = [(0.9, 0.3, 0.2), (0.2, 0.6, 0.9), (0.3, 0.8, 0.3), (0.9, 0.8, 0.2), (0.7, 0.3, 0.8), (0.2, 0.8, 0.8)]


def write_mask(path: str | os.PathLike, masks: np.ndarray, geometry: Geometry, names: list[str]) -> Path:
    """Write binary masks (N,K,J,I) as a label map (class n -> value n+1) or a Slicer .seg.nrrd, atomically."""
    path = check_output_path(path)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 3:
        masks = masks[None]
    if masks.shape[1:] != geometry.shape_kji or len(names) != masks.shape[0]:
        raise InputError("masks, geometry and names do not agree")
    labels = np.zeros(geometry.shape_kji, dtype=np.uint8)
    for index in range(masks.shape[0]):
        labels[masks[index] & (labels == 0)] = index + 1
    image = image_on_grid(labels, geometry)
    if _mask_suffix(path) == ".seg.nrrd":
        _add_segment_metadata(image, names)
    _write_atomically(image, path, _mask_suffix(path))
    return path


def write_volume(path: str | os.PathLike, volume: Volume) -> Path:
    """Write an image with its geometry, atomically."""
    path = check_output_path(path)
    _write_atomically(image_on_grid(volume.array, volume.geometry), path, _mask_suffix(path))
    return path


def image_on_grid(array: np.ndarray, geometry: Geometry):
    """A SimpleITK image of `array` ([k, j, i]) placed by `geometry` (LPS, as ITK expects)."""
    image = _sitk().GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.ravel()))
    return image


def _write_atomically(image, path: Path, suffix: str) -> None:
    with atomic_path(path, suffix) as temporary:
        _sitk().WriteImage(image, str(temporary), True)


def _add_segment_metadata(image, names: list[str]) -> None:
    """Slicer's segmentation NRRD fields, so segments open with their names and colours."""
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    extent = " ".join(f"0 {n - 1}" for n in image.GetSize())
    for index, name in enumerate(names):
        colour = SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)]
        prefix = f"Segment{index}_"
        image.SetMetaData(prefix + "ID", f"Segment_{index + 1}")
        image.SetMetaData(prefix + "Name", name)
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", " ".join(f"{c:g}" for c in colour))
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(index + 1))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", extent)
        image.SetMetaData(prefix + "Tags", "Segmentation.Status:inprogress|")
