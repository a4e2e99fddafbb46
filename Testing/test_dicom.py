"""DICOM in (series folders, several series, tilted and non-uniform series) and DICOM SEG out, on series
built here with pydicom; SEG files are checked by reading them back with highdicom and pydicom."""

from __future__ import annotations

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from weakicl.cli import main  # noqa: E402
from weakicl.errors import InputError  # noqa: E402
from weakicl.simulation import slice_boxes  # noqa: E402
from weakicl.volume import Geometry, read_volume, write_mask  # noqa: E402

ROWS, COLUMNS, PIXEL = 14, 16, (0.8, 0.7)  # PixelSpacing: between rows (j), between columns (i)


def linear(points: np.ndarray) -> np.ndarray:
    """Image content as a function of LPS position, so any correct resampling reproduces it exactly."""
    return 2.0 * points[..., 0] + 3.0 * points[..., 1] + 5.0 * points[..., 2] + 100.0


def write_series(folder, positions, row=(1, 0, 0), column=(0, 1, 0), series_uid=None, study_uid=None, description="axial",
                 content=linear, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2"):
    """Single-frame CT slices at `positions` (LPS), written in reverse order so reading must sort them
    (without a FrameOfReferenceUID when it is None, as some slice writers leave them)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or pydicom.uid.generate_uid()
    study_uid = study_uid or "1.2.826.0.1.3680043.8.498.1"
    row, column = np.asarray(row, float), np.asarray(column, float)
    i, j = np.meshgrid(np.arange(COLUMNS), np.arange(ROWS))
    for number, position in reversed(list(enumerate(positions))):
        points = np.asarray(position) + i[..., None] * PIXEL[1] * row + j[..., None] * PIXEL[0] * column
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P1", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study_uid, "1", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription, ds.Modality = series_uid, 3, description, "CT"
        if frame_of_reference_uid is not None:
            ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.InstanceNumber = number + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *column)]
        ds.PixelSpacing = list(PIXEL)
        ds.SliceThickness = 1.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.rint(content(points)).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{number:03d}.dcm", enforce_file_format=True)
    return series_uid


def axial_positions(z):
    return [(-5.0, 3.0, float(value)) for value in z]


def interior_error(volume, rows_lost: int = 0) -> float:
    """Largest difference between the volume and the content function, one voxel in from every border
    (and `rows_lost` more rows at the end, which a tilted slab does not cover)."""
    ranges = [np.arange(1, n - 1) for n in volume.geometry.shape_kji]
    ranges[1] = ranges[1][: len(ranges[1]) - rows_lost]
    k, j, i = np.meshgrid(*ranges, indexing="ij")
    points = volume.geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    return float(np.abs(volume.array[k, j, i].ravel() - linear(points)).max())


def test_a_series_folder_reads_sorted_with_its_lps_geometry(tmp_path):
    write_series(tmp_path / "ct", axial_positions([10, 12, 14, 16, 18]))
    volume = read_volume(tmp_path / "ct")
    geometry = volume.geometry
    assert geometry.shape_kji == (5, ROWS, COLUMNS) and volume.modality == "CT"
    assert np.allclose(geometry.spacing, (0.7, 0.8, 2.0)) and np.allclose(geometry.origin, (-5, 3, 10))
    assert np.allclose(geometry.direction, np.eye(3))
    assert interior_error(volume) <= 0.5  # only the int16 rounding of the stored pixels
    assert read_volume(tmp_path / "ct" / "slice002.dcm").geometry.same_grid(geometry)  # a file picks its series


def test_several_series_are_listed_and_chosen_by_uid(tmp_path):
    axial = write_series(tmp_path / "study" / "a", axial_positions([0, 1, 2]))
    coronal = write_series(tmp_path / "study" / "b", [(0.0, float(y), 0.0) for y in (0, 2, 4)], row=(1, 0, 0), column=(0, 0, -1),
                           description="coronal")
    with pytest.raises(InputError, match="2 series") as error:
        read_volume(tmp_path / "study")
    assert axial in str(error.value) and coronal in str(error.value) and "--series-uid" in str(error.value)
    assert read_volume(tmp_path / "study", series_uid=coronal).geometry.shape_kji == (3, ROWS, COLUMNS)
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "study", series_uid="1.2.3")


def test_a_dicomdir_reads_the_series_it_indexes(tmp_path):
    from pydicom.fileset import FileSet

    write_series(tmp_path / "source", axial_positions([0, 2, 4]))
    fileset = FileSet()
    for path in sorted((tmp_path / "source").iterdir()):
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "export")  # DICOMDIR plus files in a PT000000/ST000000/... tree
    volume = read_volume(tmp_path / "export" / "DICOMDIR")
    assert volume.geometry.shape_kji == (3, ROWS, COLUMNS) and np.allclose(volume.geometry.origin, (-5, 3, 0))


def test_gantry_tilt_is_resampled_with_a_warning(tmp_path, weakicl_log):
    angle = np.radians(15)
    column = (0.0, np.cos(angle), -np.sin(angle))  # the slices are tilted; the table moves along z
    write_series(tmp_path / "tilted", axial_positions([0, 2, 4, 6, 8, 10]), column=column)
    volume = read_volume(tmp_path / "tilted")
    assert any("gantry tilt of 15.0 degrees" in message for message in weakicl_log)
    geometry = volume.geometry
    assert np.allclose(geometry.direction.T @ geometry.direction, np.eye(3))  # a regular, orthogonal grid
    assert np.isclose(geometry.spacing[2], 2 * np.cos(angle))
    assert interior_error(volume, rows_lost=4) < 1.0  # the last slice is shifted by 10 mm * sin 15 deg = 3.2 rows


def test_non_uniform_spacing_is_resampled_with_a_warning(tmp_path, weakicl_log):
    write_series(tmp_path / "gap", axial_positions([0, 1, 2, 4, 5, 6]))  # slice 3 is missing
    volume = read_volume(tmp_path / "gap")
    assert any("not uniform" in message for message in weakicl_log) and volume.geometry.shape_kji[0] == 7
    assert np.isclose(volume.geometry.spacing[2], 1.0) and interior_error(volume) < 1.0


@pytest.mark.parametrize("positions, message", [
    (axial_positions([0, 1, 1, 2]), "share a position"),
    (axial_positions([0]), "one slice"),
])
def test_series_that_are_not_one_volume_are_refused(tmp_path, positions, message):
    write_series(tmp_path / "bad", positions)
    with pytest.raises(InputError, match=message):
        read_volume(tmp_path / "bad")


def test_a_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM image series"):
        read_volume(tmp_path)


def sphere(points: np.ndarray, centre, radius: float) -> np.ndarray:
    return np.linalg.norm(points - np.asarray(centre), axis=-1) <= radius


def source_pixels(ds) -> np.ndarray:
    """LPS position of every pixel of a source slice [rows, columns, 3]."""
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    i, j = np.meshgrid(np.arange(ds.Columns), np.arange(ds.Rows))
    return (np.asarray(ds.ImagePositionPatient, float) + i[..., None] * float(ds.PixelSpacing[1]) * orientation[:3]
            + j[..., None] * float(ds.PixelSpacing[0]) * orientation[3:])


@pytest.mark.parametrize("kind", ["regular", "tilted", "gap"])
def test_dicom_seg_frames_lie_on_their_source_slices(tmp_path, kind):
    column = (0.0, np.cos(np.radians(10)), -np.sin(np.radians(10))) if kind == "tilted" else (0, 1, 0)
    z = [0, 1, 2, 4, 5, 6, 7] if kind == "gap" else [0, 1.5, 3, 4.5, 6, 7.5, 9]
    series_uid = write_series(tmp_path / kind, axial_positions(z), column=column)
    volume = read_volume(tmp_path / kind)
    k, j, i = np.meshgrid(*[np.arange(n) for n in volume.geometry.shape_kji], indexing="ij")
    grid_points = volume.geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(volume.geometry.shape_kji + (3,))
    masks = np.stack([sphere(grid_points, (0.5, 8.0, 4.0), 3.2), grid_points[..., 0] < -1.0])
    record = {"tool": {"name": "weakicl", "version": "test"}, "weights": {"sha256": "ab" * 32}}
    path = write_mask(tmp_path / "seg.dcm", masks, volume.geometry, ["lesion", "left part"], provenance=record)

    seg = hd.seg.segread(path)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["lesion", "left part"]
    assert seg.get_segment_description(1).segmented_property_type.value == "85756007"
    sources = sorted((pydicom.dcmread(p) for p in (tmp_path / kind).iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], segment_numbers=[1, 2])
    truth = np.stack([np.stack([sphere(source_pixels(ds), (0.5, 8.0, 4.0), 3.2), source_pixels(ds)[..., 0] < -1.0], axis=-1)
                      for ds in sources])
    agreement = 2 * (frames.astype(bool) & truth).sum() / (frames.astype(bool).sum() + truth.sum())
    assert agreement > (0.999 if kind == "regular" else 0.9), agreement

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert ds.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert json.loads(ds.ImageComments)["weights"]["sha256"] == "ab" * 32


def test_dicom_seg_needs_a_dicom_target(tmp_path):
    geometry = Geometry.identity((3, 4, 5))
    with pytest.raises(InputError, match="needs a DICOM series"):
        write_mask(tmp_path / "seg.dcm", np.ones(geometry.shape_kji, bool), geometry, ["x"])
    assert not list(tmp_path.iterdir())


def test_segment_command_reads_a_series_and_writes_dicom_seg(tmp_path, tiny_weights):
    z = np.arange(8) * 1.5
    centre = (0.5, 8.0, 5.0)
    write_series(tmp_path / "series", axial_positions(z), content=lambda p: 200.0 * sphere(p, centre, 3.5))
    volume = read_volume(tmp_path / "series")
    k, j, i = np.meshgrid(*[np.arange(n) for n in volume.geometry.shape_kji], indexing="ij")
    truth = sphere(volume.geometry.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(i.shape + (3,)), centre, 3.5)
    prompts = tmp_path / "boxes.json"
    prompts.write_text(json.dumps(slice_boxes(truth).to_voxel_json()))
    output = tmp_path / "result.dcm"
    assert main(["segment", str(tmp_path / "series"), "--prompts", str(prompts), "--label", "lesion", "--output", str(output),
                 "--device", "cpu", "--weights", str(tiny_weights)]) == 0
    seg = hd.seg.segread(output)
    assert seg.get_segment_description(1).segment_label == "lesion"
    assert seg.Rows == ROWS and seg.Columns == COLUMNS


def test_dicom_seg_of_a_series_without_frame_of_reference_is_refused_before_any_work(tmp_path, tiny_weights, capsys, monkeypatch):
    """Audit D4: highdicom's ValueError came after the computation, as an internal error (exit 1)."""
    import weakicl.session

    def never(*args, **kwargs):
        raise AssertionError("segmented before the output was checked")

    write_series(tmp_path / "series", axial_positions(np.arange(6) * 1.5), frame_of_reference_uid=None)
    prompts = tmp_path / "boxes.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "boxes": [{"min": [3, 3, 2], "max": [9, 9, 2]}]}))
    monkeypatch.setattr(weakicl.session.Segmenter, "segment", never)
    assert main(["segment", str(tmp_path / "series"), "--prompts", str(prompts), "--output", str(tmp_path / "seg.dcm"),
                 "--device", "cpu", "--weights", str(tiny_weights)]) == 2
    assert capsys.readouterr().err.strip() == ("weakicl: error: seg.dcm: DICOM SEG output needs the series' FrameOfReferenceUID "
                                               "(0020,0052), which its slices lack; write .seg.nrrd, .nii.gz, .nrrd or .mha instead")
    assert not (tmp_path / "seg.dcm").exists()


def test_segment_command_refuses_dicom_seg_for_a_nifti_target_before_any_work(tmp_path, tiny_weights, capsys):
    from weakicl.volume import Volume, write_volume

    geometry = Geometry.identity((4, 8, 8))
    image = write_volume(tmp_path / "image.nii.gz", Volume(np.zeros(geometry.shape_kji, np.float32), geometry))
    prompts = tmp_path / "boxes.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "boxes": [{"min": [1, 1, 1], "max": [4, 4, 2]}]}))
    assert main(["segment", str(image), "--prompts", str(prompts), "--output", str(tmp_path / "seg.dcm"),
                 "--device", "cpu", "--weights", str(tiny_weights)]) == 2
    assert "needs a DICOM series" in capsys.readouterr().err and not (tmp_path / "seg.dcm").exists()
