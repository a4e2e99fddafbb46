"""Images with explicit geometry, read and written with SimpleITK.

Arrays are indexed [k, j, i]; voxel coordinates are IJK; physical coordinates are LPS millimetres
(ITK's convention). RAS appears only in the `*_ras` conversions used at the Slicer and markups edges.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import struct
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import provenance as _provenance
from .atomic import atomic_paths
from .errors import InputError, OutputExists

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
NIFTI_HEADER_BYTES = 540  # a NIfTI-2 header; a NIfTI-1 header is its first 348 bytes
MASK_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")  # .dcm: DICOM SEG, for DICOM targets
MAX_LABEL_VALUE = int(np.iinfo(np.uint16).max)  # label maps are written as uint8, or uint16 above 255
MAX_NON_FINITE_FRACTION = 0.01  # more NaN/Inf voxels than this is a broken image, not a few bad voxels
log = logging.getLogger(__name__)


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


DIGEST_CHUNK_BYTES = 1 << 22


def volume_digest(volume: Volume) -> str:
    """Content key of a volume: ids of freed arrays are reused, and arrays may be edited in place. Chunks
    are hashed in threads (hashlib lets go of the GIL), as every engine call hashes its volume: a single
    pass over a 256³ float volume took 0.17 s of a 0.58 s GPU call."""
    data = np.ascontiguousarray(volume.array).view(np.uint8).ravel()
    starts = range(0, data.size, DIGEST_CHUNK_BYTES)
    with ThreadPoolExecutor(max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        parts = pool.map(lambda start: hashlib.blake2b(data[start:start + DIGEST_CHUNK_BYTES], digest_size=16).digest(), starts)
        digest = hashlib.blake2b(b"".join(parts), digest_size=16)
    digest.update(repr((volume.array.dtype.str, volume.array.shape, volume.geometry.spacing, volume.modality)).encode())
    return digest.hexdigest()


def _sitk():
    import SimpleITK as sitk

    return sitk


def geometry_of(image) -> Geometry:
    """Geometry of a SimpleITK image."""
    return Geometry(image.GetSpacing(), image.GetOrigin(), np.reshape(image.GetDirection(), (3, 3)), image.GetSize()[::-1])


def read_volume(path: str | os.PathLike, modality: str = "auto", series_uid: str | None = None) -> Volume:
    """Read a 3D scalar image (NIfTI, NRRD, MHA, ...) as a Volume; a few NaN/Inf voxels are replaced
    (see `replace_non_finite`), more are refused. A folder, DICOMDIR or DICOM file is read as a DICOM
    series (`series_uid` picks one where there are several; see weakicl.dicom)."""
    sitk = _sitk()
    path = Path(path)
    if path.is_dir() or path.name.upper() == "DICOMDIR" or (path.is_file() and (path.suffix.lower() == ".dcm" or _is_dicom_file(path))):
        from .dicom import read_dicom

        return read_dicom(path, modality, series_uid)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        check_complete(path)
    except (EOFError, zlib.error, ValueError) as error:
        raise InputError(f"{path.name} is cut short or damaged ({error}); it cannot be read in full") from None
    except OSError:
        pass  # not gzip after all, or unreadable: ITK's reader says which
    try:
        with _c_stderr_to_debug_log("the image reader"):
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read image {path.name}: {_itk_reason(error)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name}: expected a scalar image, it has {image.GetNumberOfComponentsPerPixel()} components")
    if image.GetDimension() != 3:
        raise InputError(f"{path.name}: expected a 3D image, it is {image.GetDimension()}D")
    return Volume(replace_non_finite(sitk.GetArrayFromImage(image), path.name), geometry_of(image), modality)


def replace_non_finite(array: np.ndarray, source: str) -> np.ndarray:
    """NaN/Inf voxels (a broken slice, a failed reconstruction) would poison normalisation: up to
    MAX_NON_FINITE_FRACTION of them are set to the image minimum with a warning, more are refused."""
    if not np.issubdtype(array.dtype, np.floating):
        return array
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count == 0:
        return array
    if count > MAX_NON_FINITE_FRACTION * array.size:
        raise InputError(f"{source}: {count} of {array.size} voxels ({100 * count / array.size:.1f} %) are NaN or infinite "
                         f"(at most {100 * MAX_NON_FINITE_FRACTION:g} % can be repaired)")
    minimum = float(array[~bad].min())
    log.warning("%s: %d NaN or infinite voxels set to the image minimum %g", source, count, minimum)
    array = array.copy()
    array[bad] = minimum
    return array


def _is_dicom_file(path: Path) -> bool:
    """A DICOM part-10 file ("DICM" after a 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_label_map(path: str | os.PathLike, geometry: Geometry | None = None) -> np.ndarray:
    """Read an integer label image (a .seg.nrrd through slicerio, layers flattened); with `geometry`,
    require it to lie on that grid."""
    if str(path).lower().endswith(".seg.nrrd"):
        from .segfiles import read_segmentation

        segments = read_segmentation(path)
        volume = Volume(segments.label_map(), segments.geometry)
    else:
        volume = read_volume(path)
    if geometry is not None and not volume.geometry.same_grid(geometry, tolerance=1e-3):
        raise InputError(f"{Path(path).name}: the label image does not lie on the grid of its image")
    whole = np.rint(volume.array)
    fractional = volume.array[np.abs(volume.array - whole) > 1e-3]
    if fractional.size:  # rounding would drop a probability map's voxels below 0.5 without a word
        raise InputError(f"{Path(path).name}: a label image holds whole numbers, found {fractional.flat[0]:g} "
                         "(threshold a probability map first)")
    return whole.astype(np.int32)


def _mask_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"output must end with one of {', '.join(MASK_SUFFIXES)}: {path.name}")


def check_output_path(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Fail before any work when an output, or the provenance sidecar that is part of it, could not be
    written (the write re-checks `overwrite`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name ending with one of {', '.join(MASK_SUFFIXES)}")
    _mask_suffix(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"output folder is not writable: {path.parent}")
    if not overwrite and os.path.lexists(path):
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    sidecar = _provenance.sidecar_of(path)
    if sidecar is not None and sidecar.is_dir():
        raise InputError(f"{sidecar}, where the provenance of {path.name} goes, is a folder; choose another output name")
    if sidecar is not None and not overwrite and os.path.lexists(sidecar):
        raise OutputExists(f"{sidecar} (the provenance of {path.name}) exists; pass --overwrite to replace it")
    return path


SEGMENT_COLOURS = [(0.9, 0.3, 0.2), (0.2, 0.6, 0.9), (0.3, 0.8, 0.3), (0.9, 0.8, 0.2), (0.7, 0.3, 0.8), (0.2, 0.8, 0.8)]


def checked_masks(masks: np.ndarray, geometry: Geometry, names: list[str],
                  values: list[int] | None) -> tuple[np.ndarray, list[int]]:
    """Masks as (N, K, J, I) bool and their label values (default n+1), checked against the grid and names."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 3:
        masks = masks[None]
    values = list(range(1, len(names) + 1)) if values is None else [int(v) for v in values]
    if masks.shape[1:] != geometry.shape_kji or len(names) != masks.shape[0] or len(values) != len(names):
        raise InputError("masks, geometry, names and label values do not agree")
    return masks, values


def write_mask(path: str | os.PathLike, masks: np.ndarray, geometry: Geometry, names: list[str],
               values: list[int] | None = None, overwrite: bool = True, provenance: dict | None = None) -> Path:
    """Write binary masks (N,K,J,I) as a label map, a Slicer .seg.nrrd (weakicl.segfiles, overlaps in
    layers) or, on the grid of a DICOM series, a DICOM SEG (.dcm, weakicl.dicom), atomically (see `atomic_path`).

    Class n gets label value `values[n]` (default n+1), so label values of a dense context come out
    unchanged; the file is uint8 when every value fits, uint16 otherwise. Without `overwrite` an
    existing file, even one that appears during the write, raises OutputExists. `provenance`
    (weakicl.provenance.provenance()) goes into the NRRD/MHA header, or a sidecar JSON beside NIfTI.
    """
    path = check_output_path(path, overwrite)
    masks, values = checked_masks(masks, geometry, names, values)
    if len(set(values)) != len(values) or min(values, default=1) < 1 or max(values, default=1) > MAX_LABEL_VALUE:
        raise InputError(f"label values must be distinct and within 1-{MAX_LABEL_VALUE}, got {values}")
    if _mask_suffix(path) == ".seg.nrrd":
        from .segfiles import write_segmentation

        return write_segmentation(path, masks, geometry, names, values, overwrite, provenance)
    if _mask_suffix(path) == ".dcm":
        from .dicom import write_dicom_seg

        return write_dicom_seg(path, masks, geometry, names, overwrite, provenance)
    labels = np.zeros(geometry.shape_kji, dtype=np.uint8 if max(values, default=1) <= 255 else np.uint16)
    for index, value in enumerate(values):
        labels[masks[index] & (labels == 0)] = value
    image = image_on_grid(labels, geometry)
    _record_provenance(image, path, provenance)
    _write_atomically(image, path, _mask_suffix(path), overwrite, provenance)
    return path


def _record_provenance(image, path: Path, record: dict | None) -> None:
    if record is not None and _provenance.in_header(path):
        image.SetMetaData(_provenance.HEADER_KEY, _provenance.header_value(record))


def write_volume(path: str | os.PathLike, volume: Volume, overwrite: bool = True) -> Path:
    """Write an image with its geometry, atomically (see `atomic_path`)."""
    path = check_output_path(path, overwrite)
    _write_atomically(image_on_grid(volume.array, volume.geometry), path, _mask_suffix(path), overwrite, None)
    return path


def image_on_grid(array: np.ndarray, geometry: Geometry):
    """A SimpleITK image of `array` ([k, j, i]) placed by `geometry` (LPS, as ITK expects)."""
    image = _sitk().GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.ravel()))
    return image


def _write_atomically(image, path: Path, suffix: str, overwrite: bool, provenance: dict | None) -> None:
    """Write `image`, with the sidecar of `provenance` where its format needs one: both or neither."""
    sitk = _sitk()
    expected = sitk.GetArrayFromImage(image)
    geometry = geometry_of(image)

    finite = np.isfinite(expected) if np.issubdtype(expected.dtype, np.floating) else slice(None)

    def verify(temporary: Path) -> None:
        if temporary.stat().st_size == 0:
            raise ValueError("nothing was written")
        check_complete(temporary)
        back = sitk.ReadImage(str(temporary))
        # NaN voxels are not compared: ITK's NIfTI reader turns them into zeros
        if not geometry_of(back).same_grid(geometry, tolerance=1e-3) or \
                not np.array_equal(sitk.GetArrayViewFromImage(back)[finite], expected[finite]):
            raise ValueError("the voxels read back differ from those written")

    sidecar = _provenance.sidecar_of(path) if provenance is not None else None
    outputs = ([(sidecar, ".json", None)] if sidecar else []) + [(path, suffix, verify)]  # the image last, see atomic_paths
    with atomic_paths(outputs, overwrite) as temporaries, _c_stderr_to_debug_log("the image writer"):
        if sidecar:
            temporaries[0].write_text(_provenance.sidecar_json(provenance))
        sitk.WriteImage(image, str(temporaries[-1]), True)


def _itk_reason(error: RuntimeError) -> str:
    """The line of an ITK reader's exception that says what is wrong: its "Reason:" line quotes the C
    library's last errno, stale after a short read ("No such file or directory" for a file cut short)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip() and not line.startswith("Reason:")]
    reason = lines[-1] if lines else "ITK could not read it"
    reason = re.sub(r"\(0x[0-9a-f]+\)", "", reason.split("ITK ERROR: ", 1)[-1])  # the reader object's address
    return f"{reason} (cut short, damaged or not an image?)"


@contextmanager
def _c_stderr_to_debug_log(source: str) -> Iterator[None]:
    """ITK's image libraries print their own failures on the process's stderr (NIfTI's "** ERROR: NWAD:
    wrote only ...", MetaIO's "data not read completely"); they go to the debug log instead, so a
    failed read or write reports one line (the InputError's or WriteError's)."""
    try:
        saved, capture = os.dup(2), tempfile.TemporaryFile()
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace").strip()
        capture.close()
        if text:
            log.debug("from %s: %s", source, text)


def check_complete(path: str | os.PathLike) -> None:
    """Raise when a gzip stream (EOFError, zlib.error) or a NIfTI file, plain or inside a whole gzip
    stream (ValueError), is cut short: ITK reads all of them without complaint, filling the missing
    voxels with zeros (a truncated mask looks empty). Other files pass: ITK's own reader checks them."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as stream:  # EOFError or BadGzipFile (an OSError) when cut short
            header = stream.read(NIFTI_HEADER_BYTES)
            size = len(header)
            while chunk := stream.read(1 << 22):
                size += len(chunk)
        if name.endswith(".nii.gz"):
            _check_nifti_size(header, size)
    elif name.endswith(".nii"):
        with open(path, "rb") as handle:
            header = handle.read(NIFTI_HEADER_BYTES)
        _check_nifti_size(header, path.stat().st_size)


def _check_nifti_size(header: bytes, size: int) -> None:
    """Raise ValueError when `size` bytes of NIfTI data are fewer than its `header` calls for."""
    # (header size, dim, bitpix, vox_offset) layouts of NIfTI-1 and NIfTI-2
    for header_size, dim_format, dim_at, bits_at, offset_format, offset_at in ((348, "8h", 40, 72, "f", 108), (540, "8q", 16, 14, "q", 168)):
        for order in "<>":
            if len(header) >= header_size and struct.unpack_from(order + "i", header, 0)[0] == header_size:
                dims = struct.unpack_from(order + dim_format, header, dim_at)
                bits = struct.unpack_from(order + "h", header, bits_at)[0]
                offset = struct.unpack_from(order + offset_format, header, offset_at)[0]
                needed = int(offset) + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bits // 8
                if size < needed:
                    raise ValueError(f"{size} bytes where the header needs {needed}")
                return
