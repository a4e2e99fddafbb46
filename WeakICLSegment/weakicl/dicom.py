"""DICOM in and out: an image series read as a Volume with its geometry checked, results as DICOM SEG.

Headers are read with pydicom (series selection, geometry from ImagePositionPatient and
ImageOrientationPatient, both LPS like the engine), pixels with SimpleITK/GDCM (compressed transfer
syntaxes included). A series whose slices are not a regular grid (gantry tilt: slices shifted in their
plane; non-uniform or missing slices) is resampled onto a regular grid with a warning, and a result is
mapped back onto the source slices before it is written as DICOM SEG, so each SEG frame lies on the
source slice it references.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError
from .provenance import header_value
from .volume import SEGMENT_COLOURS, Geometry, Volume

log = logging.getLogger(__name__)

NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}
POSITION_TOLERANCE_MM = 0.01  # in-plane shift below which a series counts as untilted
SPACING_TOLERANCE = 0.01  # relative spread of slice steps below which spacing counts as uniform


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise InputError("DICOM needs pydicom: pip install 'weakicl[dicom]'") from None
    return pydicom


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A folder, a DICOMDIR or a .dcm file: inputs read as DICOM rather than by SimpleITK's file readers."""
    path = Path(path)
    return path.is_dir() or path.name.upper() == "DICOMDIR" or path.suffix.lower() in (".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found under a folder: its files (unsorted) with their headers, and what to show a
    user choosing it."""

    uid: str
    modality: str
    description: str
    number: int | None
    files: tuple[Path, ...]
    headers: tuple = field(default=(), repr=False, compare=False)  # pydicom datasets without pixel data

    def summary(self) -> str:
        return f"{self.uid} ({self.modality or '?'}, {self.description or 'no description'}, {len(self.files)} files)"


@dataclass(frozen=True)
class SliceLayout:
    """How the source slices (in their sorted order) lie relative to the regular grid of the Volume.

    `positions_k`: each source slice's position along the slice normal, in Volume slices (fractional when
    the spacing is not uniform); `shifts_ij`: each source slice's in-plane offset in voxels (gantry tilt).
    """

    positions_k: np.ndarray
    shifts_ij: np.ndarray

    @property
    def regular(self) -> bool:
        return (np.allclose(self.positions_k, np.arange(len(self.positions_k)), atol=1e-3)
                and np.allclose(self.shifts_ij, 0.0, atol=1e-3))

    def to_grid(self, slices: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
        """Source slices [S, J, I] -> the regular grid [K, J, I] (linear interpolation)."""
        from scipy import ndimage

        slices = slices.astype(np.float32)
        fill = float(slices.min())
        aligned = np.stack([
            ndimage.shift(plane, shift, order=1, mode="constant", cval=fill) if np.any(shift) else plane
            for plane, shift in zip(slices, self.shifts_ij)
        ])
        k = np.arange(shape_kji[0], dtype=float)
        upper = np.clip(np.searchsorted(self.positions_k, k, side="right"), 1, len(self.positions_k) - 1)
        lower = upper - 1
        span = self.positions_k[upper] - self.positions_k[lower]
        weight = np.clip((k - self.positions_k[lower]) / span, 0.0, 1.0)[:, None, None].astype(np.float32)
        return (1 - weight) * aligned[lower] + weight * aligned[upper]

    def to_source(self, masks: np.ndarray) -> np.ndarray:
        """Masks on the regular grid [N, K, J, I] -> masks on the source slices [N, S, J, I] (nearest voxel)."""
        from scipy import ndimage

        nearest = np.clip(np.rint(self.positions_k).astype(int), 0, masks.shape[1] - 1)
        picked = masks[:, nearest]
        for index, shift in enumerate(self.shifts_ij):
            if np.any(shift):
                for n in range(picked.shape[0]):
                    picked[n, index] = ndimage.shift(picked[n, index].astype(np.uint8), -shift, order=0, mode="constant", cval=0) > 0
        return picked


@dataclass(frozen=True, eq=False)
class DicomGeometry(Geometry):
    """A grid read from a DICOM series; it keeps the series so a result on it can be written as DICOM SEG."""

    headers: tuple = field(default=(), repr=False, compare=False)  # pydicom datasets, sorted, no pixel data
    layout: SliceLayout | None = field(default=None, repr=False, compare=False)


def find_series(path: str | os.PathLike) -> list[SeriesInfo]:
    """Every image series under a folder (recursively), a DICOMDIR's folder, or the folder of a .dcm file."""
    pydicom = _pydicom()
    path = Path(path)
    root = path if path.is_dir() else path.parent
    groups: dict[str, list] = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR"):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in header or "Rows" not in header or header.get("Modality", "") in NOT_IMAGES:
            continue
        groups.setdefault(str(header.SeriesInstanceUID), []).append((file, header))
    return [
        SeriesInfo(uid, str(members[0][1].get("Modality", "")), str(members[0][1].get("SeriesDescription", "")),
                   _integer(members[0][1].get("SeriesNumber")), tuple(file for file, _ in members),
                   tuple(header for _, header in members))
        for uid, members in groups.items()
    ]


def _integer(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def select_series(path: str | os.PathLike, series_uid: str | None = None) -> SeriesInfo:
    """The series to read: the one asked for, the one a .dcm file belongs to, or the only one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    series = find_series(path)
    if not series:
        raise InputError(f"no DICOM image series found in {path}")
    if series_uid is None and path.is_file() and path.name.upper() != "DICOMDIR":
        series_uid = next((s.uid for s in series if path in s.files), None)
        if series_uid is None:
            raise InputError(f"{path.name} is not a DICOM image")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise InputError(f"series {series_uid} not found in {path}; found: " + "; ".join(s.summary() for s in series))
        return chosen[0]
    if len(series) > 1:
        raise InputError(f"{path} holds {len(series)} series; choose one with --series-uid (or give a file of the series): "
                         + "; ".join(s.summary() for s in series))
    return series[0]


def read_dicom(path: str | os.PathLike, modality: str = "auto", series_uid: str | None = None) -> Volume:
    """Read one DICOM image series as a Volume on a regular LPS grid (resampled, with a warning, if it is not)."""
    import SimpleITK as sitk

    info = select_series(path, series_uid)
    headers = list(info.headers)
    name = Path(path).name
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise InputError(f"{name}: multi-frame (enhanced) DICOM images are not supported; export the series as single-frame slices")
    geometry, order, layout = _geometry(headers, name)
    slices = []
    for index in order:
        try:
            image = sitk.ReadImage(str(info.files[index]))
        except RuntimeError as error:
            raise InputError(f"cannot read {info.files[index].name}: {str(error).strip().splitlines()[-1]}") from None
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{name}: expected a greyscale series, it has colour images")
        pixels = sitk.GetArrayFromImage(image).reshape(geometry.shape_kji[1:])
        slices.append(pixels.astype(np.float32) if pixels.dtype == np.float64 else pixels)  # GDCM rescales to float64
    array = np.stack(slices)
    if not layout.regular:
        array = layout.to_grid(array, geometry.shape_kji)
    sorted_headers = tuple(headers[index] for index in order)
    geometry = DicomGeometry(geometry.spacing, geometry.origin, geometry.direction, geometry.shape_kji,
                             headers=sorted_headers, layout=layout)
    if modality == "auto" and info.modality in ("CT", "MR"):
        modality = info.modality
    return Volume(array, geometry, modality)


def _geometry(headers: list, name: str) -> tuple[Geometry, np.ndarray, SliceLayout]:
    """The regular grid of a series, the slice order along its normal, and where each source slice lies on it."""
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        pixel_spacing = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
    except AttributeError as error:
        raise InputError(f"{name}: a slice lacks {str(error).split()[-1]}, so its position is unknown") from None
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        raise InputError(f"{name}: the slices have different orientations; this is not one 3D volume")
    if len({(int(h.Rows), int(h.Columns)) for h in headers}) > 1 or not np.allclose(pixel_spacing, pixel_spacing[0], atol=1e-4):
        raise InputError(f"{name}: the slices differ in size or pixel spacing; this is not one 3D volume")
    row, column = orientations[0, :3], orientations[0, 3:]
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    if len(headers) < 2:
        raise InputError(f"{name}: the series has one slice; a 3D volume needs at least two")
    steps = np.diff(along)
    if np.any(steps < POSITION_TOLERANCE_MM):
        repeated = int(np.sum(steps < POSITION_TOLERANCE_MM)) + 1
        raise InputError(f"{name}: {repeated} slices share a position (several phases, echoes or acquisitions in one series); "
                         "split the series into 3D volumes first")
    step = float(np.median(steps))
    count = int(round((along[-1] - along[0]) / step)) + 1
    spacing_k = (along[-1] - along[0]) / (count - 1)
    spacing_i, spacing_j = pixel_spacing[0][1], pixel_spacing[0][0]  # PixelSpacing is (between rows, between columns)
    offsets = (positions - positions[0]) - np.outer(along - along[0], normal)
    shifts_ij = np.stack([offsets @ row / spacing_i, offsets @ column / spacing_j], axis=1)[:, ::-1]  # (j, i) for ndimage
    layout = SliceLayout(positions_k=(along - along[0]) / spacing_k, shifts_ij=shifts_ij)
    uniform = np.ptp(steps) <= SPACING_TOLERANCE * step and count == len(headers)
    tilted = np.max(np.linalg.norm(offsets, axis=1)) > POSITION_TOLERANCE_MM
    if tilted:
        tilt = np.degrees(np.arctan2(np.linalg.norm(offsets[-1]), along[-1] - along[0]))
        log.warning("%s: gantry tilt of %.1f degrees; resampled onto a regular grid perpendicular to the slices", name, tilt)
    if not uniform:
        log.warning("%s: slice spacing is not uniform (%.3g to %.3g mm); resampled to %.3g mm (%d slices from %d)",
                    name, steps.min(), steps.max(), spacing_k, count, len(headers))
    shape = (count, int(headers[0].Rows), int(headers[0].Columns))
    geometry = Geometry((spacing_i, spacing_j, spacing_k), tuple(positions[0]), np.stack([row, column, normal], axis=1), shape)
    return geometry, order, layout


def check_seg_target(output: str | os.PathLike, geometry: Geometry) -> None:
    """Refuse DICOM SEG output for a target not read from DICOM, or from a series without a Frame of
    Reference, before any work is done. A SEG must carry its source images' FrameOfReferenceUID to lie
    in their space; a new one made up here would claim a space no other object of the study shares."""
    if not str(output).lower().endswith(".dcm"):
        return
    if not isinstance(geometry, DicomGeometry):
        raise InputError(f"{Path(output).name}: DICOM SEG output needs a DICOM series as the target; "
                         "write .seg.nrrd, .nii.gz, .nrrd or .mha instead")
    if not all(header.get("FrameOfReferenceUID") for header in geometry.headers):
        raise InputError(f"{Path(output).name}: DICOM SEG output needs the series' FrameOfReferenceUID (0020,0052), "
                         "which its slices lack; write .seg.nrrd, .nii.gz, .nrrd or .mha instead")


def write_dicom_seg(path: str | os.PathLike, masks: np.ndarray, geometry: Geometry, names: list[str],
                    overwrite: bool = True, provenance: dict | None = None) -> Path:
    """Write masks (N, K, J, I) on a DICOM series' grid as a binary DICOM SEG referencing that series, atomically."""
    from . import __version__

    path = Path(path)
    check_seg_target(path, geometry)
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise InputError("DICOM SEG output needs highdicom: pip install 'weakicl[dicom]'") from None
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 3:
        masks = masks[None]
    if masks.shape[1:] != geometry.shape_kji or len(names) != masks.shape[0]:
        raise InputError("masks, geometry and names do not agree")
    frames = geometry.layout.to_source(masks) if not geometry.layout.regular else masks
    algorithm = hd.AlgorithmIdentificationSequence(name="WeakICL", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=index + 1,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)])),
        )
        for index, name in enumerate(names)
    ]
    source = geometry.headers[0]
    segmentation = hd.seg.Segmentation(
        source_images=list(geometry.headers),
        pixel_array=np.moveaxis(frames, 0, -1),  # (source slice, rows, columns, segment)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(source.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="WeakICLSegment",
        manufacturer_model_name="weakicl",
        software_versions=__version__,
        device_serial_number=__version__,
        content_description="WeakICL segmentation (research use)",
        series_description="WeakICL segmentation",
        omit_empty_frames=bool(frames.any()),
    )
    if provenance is not None:
        segmentation.ImageComments = header_value(provenance)

    def verify(temporary: Path) -> None:
        if len(hd.seg.segread(temporary).SegmentSequence) != len(names):
            raise ValueError("the segments read back differ from those written")

    with atomic_path(path, ".dcm", overwrite=overwrite, verify=verify) as temporary:
        segmentation.save_as(temporary)
    return path
