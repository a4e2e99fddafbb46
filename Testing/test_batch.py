"""`weakicl batch`: one context for a folder, a DICOM study or a manifest; fixed output names; resumable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import ellipsoid
from weakicl.atomic import TEMPORARY_PREFIX, _HOST
from weakicl.batch import connect, output_name
from weakicl.cli import main
from weakicl.errors import InputError
from weakicl.session import Segmenter
from weakicl.volume import Geometry, Volume, read_label_map, write_volume


@pytest.fixture()
def study(tmp_path):
    """Three small target volumes in a folder and a reference image with its label image elsewhere."""
    geometry = Geometry((1.0, 1.2, 2.0), (1.0, 2.0, 3.0), np.eye(3), (10, 20, 16))
    (tmp_path / "images").mkdir()
    (tmp_path / "ref").mkdir()
    for number, centre in enumerate(((5, 10, 8), (4, 9, 8), (5, 11, 7))):
        truth = ellipsoid(geometry.shape_kji, centre, (3, 5, 4))
        write_volume(tmp_path / "images" / f"case{number}.nii.gz", Volume((100.0 * truth).astype(np.float32), geometry))
    truth = ellipsoid(geometry.shape_kji, (5, 10, 8), (3, 5, 4))
    reference = write_volume(tmp_path / "ref" / "ref.nii.gz", Volume((100.0 * truth).astype(np.float32), geometry))
    label = write_volume(tmp_path / "ref" / "ref_label.nrrd", Volume(truth.astype(np.uint8), geometry))
    return {"dir": tmp_path, "images": tmp_path / "images", "context": [str(reference), str(label)], "geometry": geometry}


@pytest.fixture()
def segment_calls(monkeypatch):
    """How many volumes the batch actually segmented."""
    calls = []
    original = Segmenter.segment

    def counting(self, target, *args, **kwargs):
        calls.append(target.geometry.shape_kji)
        return original(self, target, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment", counting)
    return calls


def batch(study, tiny_weights, *arguments):
    return main(["batch", *arguments, "--context", *study["context"], "--weights", str(tiny_weights), "--device", "cpu", "--no-align"])


def test_output_names_follow_one_rule():
    assert output_name("case0.nii.gz", "liver") == "case0 liver.seg.nrrd"
    assert output_name("CT 3", "left kidney", ".dcm") == "CT 3 left kidney.dcm"
    assert output_name("a.mha", "x/y:z", ".nii.gz") == "a x_y_z.nii.gz"


def test_a_folder_gets_one_output_per_volume_next_to_it_and_a_rerun_skips_them(study, tiny_weights, segment_calls, capsys):
    assert batch(study, tiny_weights, str(study["images"]), "--label", "blob") == 0
    outputs = sorted(p.name for p in study["images"].glob("*.seg.nrrd"))
    assert outputs == ["case0 blob.seg.nrrd", "case1 blob.seg.nrrd", "case2 blob.seg.nrrd"] and len(segment_calls) == 3
    table = capsys.readouterr().out
    assert table.count(" done ") == 3 and "case1 blob.seg.nrrd" in table
    assert read_label_map(study["images"] / "case0 blob.seg.nrrd", study["geometry"]).shape == study["geometry"].shape_kji

    assert batch(study, tiny_weights, str(study["images"]), "--label", "blob") == 0  # outputs are not taken as inputs
    assert len(segment_calls) == 3 and capsys.readouterr().out.count("skipped") == 3


def test_a_killed_batch_resumes_with_only_the_missing_output(study, tiny_weights, segment_calls, capsys):
    out = study["dir"] / "out"
    out.mkdir()
    assert batch(study, tiny_weights, str(study["images"]), "--out", str(out), "--output-format", "nii.gz") == 0
    assert len(segment_calls) == 3
    (out / "case1 segment.nii.gz").unlink()  # the run was killed while writing case1: no output nor its provenance,
    (out / "case1 segment.nii.gz.provenance.json").unlink()  # a partial temporary file
    dead = 2 ** 22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    partial = out / f"{TEMPORARY_PREFIX}{dead}-{_HOST}-0000abcd.nii.gz"
    partial.write_bytes(b"\x1f\x8b half a file")
    capsys.readouterr()

    assert batch(study, tiny_weights, str(study["images"]), "--out", str(out), "--output-format", "nii.gz") == 0
    assert len(segment_calls) == 4  # only case1 again
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == [f"case{n} segment.nii.gz" for n in range(3)]
    assert not partial.exists()
    table = capsys.readouterr().out
    assert table.count("skipped") == 2 and table.count(" done ") == 1


def test_a_nifti_cut_short_inside_a_whole_gzip_stream_fails_that_volume_only(study, tiny_weights, segment_calls, capsys):
    """Audit D1 in a batch: case1 held half its voxels as zeros and was segmented as if whole."""
    from test_volume import cut_inside_a_whole_gzip_stream

    cut_inside_a_whole_gzip_stream(study["images"] / "case1.nii.gz")
    assert batch(study, tiny_weights, str(study["images"]), "--label", "blob") == 2
    assert sorted(p.name for p in study["images"].glob("*.seg.nrrd")) == ["case0 blob.seg.nrrd", "case2 blob.seg.nrrd"]
    assert len(segment_calls) == 2 and "case1.nii.gz is cut short" in capsys.readouterr().out


def test_an_output_removed_without_its_provenance_sidecar_fails_and_says_why(study, tiny_weights, segment_calls, capsys):
    """The sidecar is part of the output and is not replaced without --overwrite: a rerun said the output
    was "written meanwhile by another run" and wrote nothing."""
    assert batch(study, tiny_weights, str(study["images"]), "--output-format", "nii.gz") == 0
    (study["images"] / "case1 segment.nii.gz").unlink()
    capsys.readouterr()
    assert batch(study, tiny_weights, str(study["images"]), "--output-format", "nii.gz") == 2
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("case1"))
    assert "failed" in row and "case1 segment.nii.gz.provenance.json (the provenance of case1 segment.nii.gz) exists" in row
    assert len(segment_calls) == 3
    assert batch(study, tiny_weights, str(study["images"]), "--output-format", "nii.gz", "--overwrite") == 0
    assert (study["images"] / "case1 segment.nii.gz").exists() and len(segment_calls) == 6


def test_a_manifest_names_outputs_by_case_id(study, tiny_weights, segment_calls):
    manifest = study["dir"] / "manifest.json"
    manifest.write_text(json.dumps({"cases": [{"id": "first", "image": "images/case0.nii.gz"},
                                              {"id": "second", "image": "images/case2.nii.gz"}],
                                    "splits": {"validation": ["second"]}}))
    out = study["dir"] / "out"
    out.mkdir()
    assert batch(study, tiny_weights, str(manifest), "--split", "validation", "--out", str(out), "--output-format", "mha") == 0
    assert [p.name for p in out.iterdir()] == ["second segment.mha"] and len(segment_calls) == 1


def test_dicom_seg_output_needs_dicom_inputs(study, tiny_weights, capsys):
    assert batch(study, tiny_weights, str(study["images"]), "--output-format", "dicom-seg") == 2
    assert "DICOM SEG output needs DICOM inputs" in capsys.readouterr().err
    assert not list(study["images"].glob("*.dcm"))


def test_a_dicom_study_gets_one_dicom_seg_per_series(study, tiny_weights, segment_calls, capsys):
    pytest.importorskip("highdicom")
    import highdicom as hd
    from test_dicom import axial_positions, write_series

    root = study["dir"] / "dicom"
    write_series(root / "a", axial_positions(range(0, 12, 2)), series_uid="1.2.826.0.1.3680043.8.498.11", description="CT head")
    write_series(root / "b", axial_positions(range(0, 6)), series_uid="1.2.826.0.1.3680043.8.498.12", description="CT neck")
    assert batch(study, tiny_weights, str(root), "--output-format", "dicom-seg") == 0
    outputs = sorted(p.name for p in root.glob("*.dcm"))
    assert outputs == ["CT head 3 segment.dcm", "CT neck 3 segment.dcm"] and len(segment_calls) == 2
    assert hd.seg.segread(root / "CT neck 3 segment.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID.endswith(".12")


def test_a_series_without_frame_of_reference_fails_alone_in_a_dicom_seg_batch(study, tiny_weights, segment_calls, capsys):
    """Audit D4 in a batch: the SEG of a series without FrameOfReferenceUID stopped the whole run as an internal error."""
    pytest.importorskip("highdicom")
    from test_dicom import axial_positions, write_series

    root = study["dir"] / "dicom"
    write_series(root / "a", axial_positions(range(0, 12, 2)), series_uid="1.2.826.0.1.3680043.8.498.11", description="CT head",
                 frame_of_reference_uid=None)
    write_series(root / "b", axial_positions(range(0, 6)), series_uid="1.2.826.0.1.3680043.8.498.12", description="CT neck")
    assert batch(study, tiny_weights, str(root), "--output-format", "dicom-seg") == 2
    assert sorted(p.name for p in root.glob("*.dcm")) == ["CT neck 3 segment.dcm"] and len(segment_calls) == 1
    table = capsys.readouterr().out
    assert "failed" in table and "needs the series' FrameOfReferenceUID" in table


def test_a_dask_cluster_runs_the_batch(study, tiny_weights, segment_calls):
    distributed = pytest.importorskip("distributed")
    out = study["dir"] / "out"
    out.mkdir()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        assert batch(study, tiny_weights, str(study["images"]), "--out", str(out), "--scheduler", cluster.scheduler_address) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"case{n} segment.seg.nrrd" for n in range(3)] and len(segment_calls) == 3


def test_an_unreachable_scheduler_is_a_bad_input():
    pytest.importorskip("distributed")
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        connect("tcp://127.0.0.1:9", timeout=1)
