"""Geometry conventions and I/O: output grids must equal input grids, oblique and anisotropic included."""

import numpy as np
import pytest

from conftest import oblique_geometry
from weakicl.errors import InputError
from weakicl.volume import DIGEST_CHUNK_BYTES, Geometry, Volume, read_label_map, read_volume, volume_digest, write_mask, write_volume


def test_ras_and_lps_conversions_agree_with_the_matrix():
    geometry = oblique_geometry()
    ijk = np.array([[3.0, 4.0, 5.0], [0.0, 0.0, 0.0]])
    homogeneous = np.c_[ijk, np.ones(2)]
    np.testing.assert_allclose(geometry.ijk_to_ras(ijk), (homogeneous @ geometry.ijk_to_ras_matrix().T)[:, :3])
    np.testing.assert_allclose(geometry.ras_to_ijk(geometry.ijk_to_ras(ijk)), ijk, atol=1e-9)
    ras = geometry.ijk_to_ras(ijk)
    np.testing.assert_allclose(ras[:, :2], -geometry.ijk_to_lps(ijk)[:, :2])


def test_geometry_from_slicer_matrix_round_trips():
    geometry = oblique_geometry()
    rebuilt = Geometry.from_ijk_to_ras(geometry.ijk_to_ras_matrix(), geometry.shape_kji)
    assert rebuilt.same_grid(geometry)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd"])
def test_written_masks_keep_the_input_grid(tmp_path, suffix):
    geometry = oblique_geometry()
    masks = np.zeros((2,) + geometry.shape_kji, dtype=bool)
    masks[0, 2:5, 3:9, 4:8] = True
    masks[1, 7:10, 3:9, 4:8] = True
    path = write_mask(tmp_path / f"out{suffix}", masks, geometry, ["liver", "spleen"])
    back = read_volume(path)
    assert back.geometry.same_grid(geometry)
    labels = read_label_map(path, geometry)
    assert np.array_equal(labels == 1, masks[0]) and np.array_equal(labels == 2, masks[1])
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]


def test_seg_nrrd_carries_segment_names(tmp_path):
    import SimpleITK as sitk

    geometry = oblique_geometry()
    path = write_mask(tmp_path / "out.seg.nrrd", np.ones(geometry.shape_kji, bool), geometry, ["left kidney"])
    image = sitk.ReadImage(str(path))
    assert image.GetMetaData("Segment0_Name") == "left kidney"
    assert image.GetMetaData("Segment0_LabelValue") == "1"


def test_image_round_trip(tmp_path):
    geometry = oblique_geometry()
    volume = Volume(np.arange(np.prod(geometry.shape_kji), dtype=np.float32).reshape(geometry.shape_kji), geometry)
    back = read_volume(write_volume(tmp_path / "image.nrrd", volume))
    assert back.geometry.same_grid(geometry) and np.array_equal(back.array, volume.array)


def test_two_dimensional_image_is_rejected(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="3D"):
        read_volume(tmp_path / "flat.nrrd")


def test_bad_output_suffix_is_rejected(tmp_path):
    geometry = oblique_geometry()
    with pytest.raises(InputError, match="must end with"):
        write_mask(tmp_path / "out.png", np.zeros(geometry.shape_kji, bool), geometry, ["x"])


def test_a_few_non_finite_voxels_are_replaced_by_the_minimum_and_many_refused(tmp_path, weakicl_log):
    """Defect 5: NaN or Inf voxels (a NaN slab) went into the network unnoticed."""
    geometry = Geometry.identity((10, 10, 10))
    array = np.full(geometry.shape_kji, 5.0, np.float32)
    array[0, 0, 0], array[1, 1, 1], array[2, 2, 2] = np.nan, np.inf, -3.0
    back = read_volume(write_volume(tmp_path / "few.nrrd", Volume(array, geometry)))
    assert np.isfinite(back.array).all() and back.array[0, 0, 0] == back.array[1, 1, 1] == -3.0
    assert weakicl_log == ["few.nrrd: 2 NaN or infinite voxels set to the image minimum -3"]
    array[:1] = np.nan  # one slice of ten: 10 %
    with pytest.raises(InputError, match="NaN or infinite"):
        read_volume(write_volume(tmp_path / "slab.nrrd", Volume(array, geometry)))


def test_output_that_is_a_folder_or_exists_is_refused_before_work(tmp_path):
    from weakicl.errors import OutputExists
    from weakicl.volume import check_output_path

    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path / "out.nii.gz")
    (tmp_path / "old.nrrd").write_bytes(b"x")
    with pytest.raises(OutputExists, match="--overwrite"):
        check_output_path(tmp_path / "old.nrrd", overwrite=False)
    assert check_output_path(tmp_path / "old.nrrd", overwrite=True).name == "old.nrrd"


def test_label_values_are_written_as_given_in_a_wide_type_when_needed(tmp_path):
    import SimpleITK as sitk

    geometry = oblique_geometry()
    masks = np.zeros((2,) + geometry.shape_kji, dtype=bool)
    masks[0, 2:5], masks[1, 7:10] = True, True
    small = write_mask(tmp_path / "small.nii.gz", masks, geometry, ["a", "b"], values=[5, 29])
    assert sitk.ReadImage(str(small)).GetPixelID() == sitk.sitkUInt8 and set(np.unique(read_label_map(small))) == {0, 5, 29}
    wide = write_mask(tmp_path / "wide.seg.nrrd", masks, geometry, ["a", "b"], values=[5, 300])
    assert set(np.unique(read_label_map(wide))) == {0, 5, 300}
    image = sitk.ReadImage(str(wide))
    assert {image.GetMetaData(f"Segment{n}_LabelValue") for n in range(2)} == {"5", "300"}
    with pytest.raises(InputError, match="distinct"):
        write_mask(tmp_path / "bad.nii.gz", masks, geometry, ["a", "b"], values=[3, 3])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_image_is_refused_not_read_as_zeros(tmp_path, suffix):
    """Defect 1's other half: ITK reads a cut-short .nii.gz or .nii with the missing voxels as zeros."""
    geometry = oblique_geometry()
    path = write_volume(tmp_path / f"image{suffix}", Volume(np.ones(geometry.shape_kji, np.float32), geometry))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="cut short"):
        read_volume(path)


def test_a_truncated_mha_is_one_line_without_itks_own_output(tmp_path, capfd):
    """MetaIO printed its own two lines on the process's stderr, and the message ended with a stale errno
    ("Reason: No such file or directory" for a file that is there)."""
    geometry = oblique_geometry()
    path = write_volume(tmp_path / "image.mha", Volume(np.ones(geometry.shape_kji, np.float32), geometry))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    capfd.readouterr()
    with pytest.raises(InputError, match=r"cannot read image image.mha: .*\(cut short, damaged or not an image\?\)") as raised:
        read_volume(path)
    assert "No such file" not in str(raised.value) and "0x" not in str(raised.value)
    assert capfd.readouterr().err == ""


def cut_inside_a_whole_gzip_stream(path):
    """A .nii.gz whose gzip stream is complete but holds only the first half of the NIfTI file."""
    import gzip

    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    return path


def test_a_nifti_cut_short_inside_a_complete_gzip_stream_is_refused(tmp_path):
    """Audit D1: the gzip check passed, and ITK read the missing half of the voxels as zeros."""
    geometry = oblique_geometry()
    image = cut_inside_a_whole_gzip_stream(write_volume(tmp_path / "image.nii.gz", Volume(np.ones(geometry.shape_kji, np.float32), geometry)))
    with pytest.raises(InputError, match=r"image.nii.gz is cut short or damaged \(\d+ bytes where the header needs \d+\)"):
        read_volume(image)
    labels = np.ones(geometry.shape_kji, bool)
    label = cut_inside_a_whole_gzip_stream(write_mask(tmp_path / "label.nii.gz", labels, geometry, ["x"]))
    with pytest.raises(InputError, match="label.nii.gz is cut short"):
        read_label_map(label, geometry)
    whole = write_mask(tmp_path / "whole.nii.gz", labels, geometry, ["x"])
    assert read_label_map(whole, geometry).sum() == labels.sum()


def test_the_content_key_sees_one_voxel_in_any_chunk_and_nothing_else():
    shape = (80, 128, 256)  # several hashing chunks
    assert np.prod(shape) * 4 > 2 * DIGEST_CHUNK_BYTES
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    geometry = Geometry((1.0, 1.0, 2.0), (0, 0, 0), np.eye(3), shape)
    key = volume_digest(Volume(array, geometry, "MR"))
    assert volume_digest(Volume(np.asfortranarray(array), geometry, "MR")) == key  # layout is not content
    for index in ((0, 0, 0), (79, 127, 255)):
        edited = array.copy()
        edited[index] += 1
        assert volume_digest(Volume(edited, geometry, "MR")) != key
    assert volume_digest(Volume(array, geometry, "CT")) != key
    assert volume_digest(Volume(array, Geometry((1.0, 1.0, 3.0), (0, 0, 0), np.eye(3), shape), "MR")) != key
