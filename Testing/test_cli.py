"""Every exit code of `weakicl`, bad inputs with one-line messages, and nothing written on failure."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ellipsoid, require_shared_data
from weakicl.cli import main
from weakicl.simulation import slice_boxes
from weakicl.volume import Geometry, Volume, read_label_map, read_volume, write_volume


@pytest.fixture()
def case(tmp_path):
    """An image with a structure on disk, its box prompts as voxel JSON, and a label image."""
    geometry = Geometry((1.0, 1.2, 2.0), (1.0, 2.0, 3.0), np.eye(3), (12, 24, 20))
    truth = ellipsoid(geometry.shape_kji, (6, 12, 10), (4, 6, 5))
    image = write_volume(tmp_path / "image.nii.gz", Volume((100.0 * truth).astype(np.float32), geometry))
    label = write_volume(tmp_path / "label.nrrd", Volume(truth.astype(np.uint8) * 3, geometry))
    prompts = tmp_path / "boxes.json"
    prompts.write_text(json.dumps(slice_boxes(truth).to_voxel_json()))
    return {"image": str(image), "label": str(label), "prompts": str(prompts), "dir": tmp_path, "geometry": geometry}


def run(case, *arguments):
    return main(["segment", case["image"], "--device", "cpu", "--weights", case["weights"], *arguments])


@pytest.fixture(autouse=True)
def weights(case, tiny_weights):
    case["weights"] = str(tiny_weights)


def test_propagation_writes_a_named_segmentation_on_the_input_grid(case, capsys):
    output = case["dir"] / "out.seg.nrrd"
    assert run(case, "--prompts", case["prompts"], "--label", "tumour", "--output", str(output)) == 0
    assert read_volume(output).geometry.same_grid(case["geometry"])
    assert "tumour" in capsys.readouterr().out


def test_cross_subject_context_with_prompts_and_with_a_label_image(case):
    for annotation, name, value in ((case["prompts"], "weak.nii.gz", 1), (case["label"], "dense.nrrd", 3)):
        output = case["dir"] / name
        assert run(case, "--context", case["image"], annotation, "--output", str(output)) == 0
        assert set(np.unique(read_label_map(output, case["geometry"]))) <= {0, value}  # the label image's value is kept


def test_a_probability_map_or_the_image_itself_as_context_label_is_refused(case, capsys):
    """A 0.5 voxel was rounded away without a word; the image given as its own label ran as ~135 classes."""
    truth = read_label_map(case["label"]) > 0
    soft = write_volume(case["dir"] / "soft.nrrd", Volume(np.where(truth, 0.5, 0.0).astype(np.float32), case["geometry"]))
    for annotation, message in ((str(soft), "whole numbers, found 0.5"), (case["image"], "both the image and its annotation")):
        output = case["dir"] / "out.nii.gz"
        assert run(case, "--context", case["image"], annotation, "--output", str(output)) == 2
        assert message in capsys.readouterr().err and not output.exists()


def two_value_label(case, values, name="two.nrrd"):
    """The case's structure split in two halves along k, labelled with `values`."""
    truth = read_label_map(case["label"]) > 0
    labels = np.zeros(truth.shape, np.uint16)
    labels[:6][truth[:6]], labels[6:][truth[6:]] = values
    return write_volume(case["dir"] / name, Volume(labels, case["geometry"]))


def test_label_values_of_a_dense_context_are_kept(case):
    """Defect 4: values 5 and 29 came out as 1 and 2."""
    path = two_value_label(case, (5, 29))
    output = case["dir"] / "multi.nii.gz"
    assert run(case, "--context", case["image"], str(path), "--no-align", "--output", str(output)) == 0
    assert set(np.unique(read_label_map(output))) <= {0, 5, 29} and read_label_map(output).max() > 0
    wide = two_value_label(case, (7, 300), "wide.nrrd")
    output = case["dir"] / "wide_out.nrrd"
    assert run(case, "--context", case["image"], str(wide), "--output", str(output)) == 0
    import SimpleITK as sitk

    image = sitk.ReadImage(str(output))
    assert image.GetPixelID() == sitk.sitkUInt16 and set(np.unique(sitk.GetArrayFromImage(image))) <= {0, 7, 300}


def test_label_value_picks_one_class_and_allows_prompts(case, capsys):
    path = two_value_label(case, (5, 29))
    output = case["dir"] / "one.nii.gz"
    assert run(case, "--context", case["image"], str(path), "--label-value", "29", "--prompts", case["prompts"],
               "--output", str(output)) == 0
    assert set(np.unique(read_label_map(output))) <= {0, 29}
    assert run(case, "--context", case["image"], str(path), "--label-value", "4", "--output", str(case["dir"] / "x.nii.gz")) == 2
    assert "label value 4 is not in the context" in capsys.readouterr().err


def test_segment_names_of_a_seg_nrrd_context_are_kept(case):
    import SimpleITK as sitk

    from weakicl.volume import write_mask

    truth = read_label_map(case["label"]) > 0
    halves = np.stack([truth & (np.arange(12) < 6)[:, None, None], truth & (np.arange(12) >= 6)[:, None, None]])
    context = write_mask(case["dir"] / "context.seg.nrrd", halves, case["geometry"], ["head", "tail"], values=[5, 29])
    output = case["dir"] / "named.seg.nrrd"
    assert run(case, "--context", case["image"], str(context), "--output", str(output)) == 0
    image = sitk.ReadImage(str(output))
    assert {image.GetMetaData(f"Segment{n}_Name") for n in range(2)} == {"head", "tail"}


def test_context_is_registered_onto_the_target_unless_no_align(case):
    truth = read_label_map(case["label"]) > 0
    masks = {}
    for flags in ((), ("--no-align",)):
        output = case["dir"] / f"out{len(flags)}.nii.gz"
        assert run(case, "--context", case["image"], case["label"], *flags, "--output", str(output)) == 0
        masks[flags] = read_label_map(output, case["geometry"]) > 0
    aligned, plain = masks[()], masks[("--no-align",)]
    def dice(mask):
        return 2 * (mask & truth).sum() / (mask.sum() + truth.sum())

    assert dice(aligned) > 0.7 and dice(aligned) > dice(plain) + 0.2  # even an untrained network starts from the prior


def test_multi_label_context_segments_every_label_in_one_pass(case):
    two_labels = read_label_map(case["label"])
    two_labels[two_labels > 0] = np.where(np.arange(two_labels.shape[0]) < 6, 1, 2)[:, None, None].repeat(two_labels.shape[1], 1).repeat(two_labels.shape[2], 2)[two_labels > 0]
    path = write_volume(case["dir"] / "two.nrrd", Volume(two_labels.astype(np.uint8), case["geometry"]))
    output = case["dir"] / "multi.seg.nrrd"
    assert run(case, "--context", case["image"], str(path), "--output", str(output)) == 0
    import SimpleITK as sitk

    image = sitk.ReadImage(str(output))
    assert image.GetMetaData("Segment1_Name") == "segment_2"


def test_few_nan_voxels_are_replaced_with_a_warning_and_a_box_past_the_edge_is_clipped(case, capsys):
    """Defects 5 and 8: NaN voxels went in unnoticed; a box 3 voxels past the edge was refused."""
    image = read_volume(case["image"])
    image.array[0, 0, :5] = np.nan  # 5 of 5760 voxels
    path = write_volume(case["dir"] / "nan.nrrd", image)
    (case["dir"] / "edge.json").write_text("\ufeff" + json.dumps({"boxes": [{"min": [4, 6, 5], "max": [22, 16, 5]}]}), encoding="utf-8")
    output = case["dir"] / "o.nii.gz"
    code = main(["segment", str(path), "--prompts", str(case["dir"] / "edge.json"), "--output", str(output), "--device", "cpu",
                 "--weights", case["weights"]])
    assert code == 0 and output.is_file()
    messages = capsys.readouterr().err
    assert "5 NaN or infinite voxels" in messages and "clipped" in messages


BAD_INPUTS = [
    (lambda c: ["--prompts", c["prompts"], "--output", str(c["dir"] / "o.png")], "must end with"),
    (lambda c: ["--prompts", c["prompts"], "--output", str(c["dir"] / "missing" / "o.nii.gz")], "folder does not exist"),
    (lambda c: ["--output", str(c["dir"] / "o.nii.gz")], "give --context"),
    (lambda c: ["--prompts", str(c["dir"] / "nope.json"), "--output", str(c["dir"] / "o.nii.gz")], "not found"),
    (lambda c: ["--context", str(c["dir"] / "nope.nii.gz"), c["prompts"], "--output", str(c["dir"] / "o.nii.gz")], "image not found"),
    (lambda c: ["--prompts", c["bad"]["outside"], "--output", str(c["dir"] / "o.nii.gz")], "outside the image"),
    (lambda c: ["--prompts", c["bad"]["inverted"], "--output", str(c["dir"] / "o.nii.gz")], "inverted"),
    (lambda c: ["--prompts", c["bad"]["empty"], "--output", str(c["dir"] / "o.nii.gz")], "no prompts"),
    (lambda c: ["--prompts", c["bad"]["garbage"], "--output", str(c["dir"] / "o.nii.gz")], "not valid JSON"),
    (lambda c: ["--context", c["image"], c["bad"]["empty_label"], "--output", str(c["dir"] / "o.nii.gz")], "empty"),
    (lambda c: ["--context", c["image"], c["bad"]["other_grid"], "--output", str(c["dir"] / "o.nii.gz")], "grid"),
    (lambda c: ["--prompts", c["prompts"], "--output", str(c["dir"] / "o.nii.gz"), "--weights", str(c["dir"] / "no.safetensors")], "weights not found"),
    (lambda c: ["--prompts", c["prompts"], "--output", c["bad"]["existing"]], "exists"),
    (lambda c: ["--context", c["image"], c["bad"]["two_labels"], "--prompts", c["prompts"], "--output", str(c["dir"] / "o.nii.gz")], "one class"),
    # defect 8: output = target with --overwrite replaced the input image; an input as output is refused before any work
    (lambda c: ["--prompts", c["prompts"], "--output", c["image"], "--overwrite"], "is the target image"),
    (lambda c: ["--context", c["image"], c["label"], "--output", c["label"], "--overwrite"], "is the context annotation"),
    (lambda c: ["--prompts", c["prompts"], "--output", c["bad"]["folder_output"]], "is a folder"),  # defect 7
    (lambda c: ["--prompts", c["bad"]["markups_object"], "--output", str(c["dir"] / "o.nii.gz")], "must be a list"),  # defect 7
    (lambda c: ["--prompts", str(c["dir"]), "--output", str(c["dir"] / "o.nii.gz")], "is a folder"),  # defect 8
    (lambda c: ["--prompts", c["bad"]["zero_box"], "--output", str(c["dir"] / "o.nii.gz")], "less than one voxel"),  # defect 5
    (lambda c: ["--prompts", c["bad"]["negative_roi"], "--output", str(c["dir"] / "o.nii.gz")], "non-negative"),  # defect 5
    (lambda c: ["--prompts", c["bad"]["far_box"], "--output", str(c["dir"] / "o.nii.gz")], "outside the image"),
    (lambda c: ["--context", c["bad"]["nan_image"], c["label"], "--output", str(c["dir"] / "o.nii.gz")], "NaN or infinite"),  # defect 5
    (lambda c: ["--context", c["image"], c["prompts"], "--label-value", "3", "--output", str(c["dir"] / "o.nii.gz")], "label images"),
    (lambda c: ["--prompts", c["prompts"], "--label-value", "3", "--output", str(c["dir"] / "o.nii.gz")], "label images"),
]


@pytest.fixture()
def bad_files(case):
    folder = case["dir"]
    documents = {
        "outside": {"points": [{"ijk": [500, 1, 1]}]},
        "inverted": {"boxes": [{"min": [9, 9, 9], "max": [1, 9, 9]}]},
        "empty": {"boxes": [], "points": []},
    }
    bad = {}
    for name, document in documents.items():
        (folder / f"{name}.json").write_text(json.dumps(document))
        bad[name] = str(folder / f"{name}.json")
    (folder / "garbage.json").write_text("{{{")
    bad["garbage"] = str(folder / "garbage.json")
    geometry = case["geometry"]
    bad["empty_label"] = str(write_volume(folder / "empty_label.nrrd", Volume(np.zeros(geometry.shape_kji, np.uint8), geometry)))
    shifted = Geometry(geometry.spacing, (50.0, 0.0, 0.0), geometry.direction, geometry.shape_kji)
    bad["other_grid"] = str(write_volume(folder / "other_grid.nrrd", Volume(np.ones(geometry.shape_kji, np.uint8), shifted)))
    two = np.zeros(geometry.shape_kji, np.uint8)
    two[2:4, 5:9, 5:9], two[7:9, 5:9, 5:9] = 1, 2
    bad["two_labels"] = str(write_volume(folder / "two_labels.nrrd", Volume(two, geometry)))
    documents = {
        "markups_object": {"markups": {"type": "ROI", "center": [5, 5, 5], "size": [4, 4, 0]}},
        "zero_box": {"boxes": [{"min": [5, 5, 5], "max": [5, 5.5, 9]}]},
        "negative_roi": {"markups": [{"type": "ROI", "coordinateSystem": "LPS", "center": [8, 12, 10], "size": [-6, 4, 2]}]},
        "far_box": {"boxes": [{"min": [30, 0, 0], "max": [40, 5, 5]}]},
    }
    for name, document in documents.items():
        (folder / f"{name}.json").write_text(json.dumps(document))
        bad[name] = str(folder / f"{name}.json")
    (folder / "out.nii.gz").mkdir()
    bad["folder_output"] = str(folder / "out.nii.gz")
    slab = (100.0 * (read_label_map(case["label"]) > 0)).astype(np.float32)
    slab[:3] = np.nan  # 3 of 12 slices: the NaN slab of defect 5
    bad["nan_image"] = str(write_volume(folder / "nan_slab.nrrd", Volume(slab, geometry)))
    (folder / "existing.nii.gz").write_bytes(b"keep me")
    bad["existing"] = str(folder / "existing.nii.gz")
    case["bad"] = bad
    return bad


@pytest.mark.parametrize("arguments, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bad_files, capsys, arguments, message):
    before = sorted(p.name for p in case["dir"].iterdir())
    assert run(case, *arguments(case)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and error[0].startswith("weakicl: error:")
    assert sorted(p.name for p in case["dir"].iterdir()) == before
    assert (case["dir"] / "existing.nii.gz").read_bytes() == b"keep me"


def test_internal_error_exits_1(case, monkeypatch, capsys):
    import weakicl.session

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(weakicl.session.Segmenter, "segment", broken)
    assert run(case, "--prompts", case["prompts"], "--output", str(case["dir"] / "o.nii.gz")) == 1
    assert "internal error" in capsys.readouterr().err
    assert not (case["dir"] / "o.nii.gz").exists()


def test_unknown_option_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--no-such-option"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", [[], ["segment"], ["demo"], ["evaluate"], ["train"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "weakicl.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: weakicl" in result.stdout


def test_demo_writes_segmentation_and_overlay(tmp_path, tiny_weights, capsys):
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu", "--weights", str(tiny_weights)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"phantom_image.nii.gz", "phantom_segmentation.seg.nrrd", "phantom_overlay.png"} <= names
    assert "Dice" in capsys.readouterr().out


def test_demo_refuses_a_file_as_out_and_leaves_no_folder_when_the_weights_fail(tmp_path, capsys):
    """Audit D7/D9: --out naming a file was an internal error (FileExistsError), and bad weights left an
    empty --out folder behind."""
    existing = tmp_path / "notes.json"
    existing.write_text("{}")
    assert main(["demo", "--out", str(existing), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"weakicl: error: --out {existing} is a file; give a folder for the demo's files"
    assert existing.read_text() == "{}"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "weights not found" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_segment_a_shared_case_from_a_markups_box(tmp_path, tiny_weights):
    data = require_shared_data()
    manifest = json.loads((data / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["id"] == manifest["splits"]["validation"][0])
    image = read_volume(data / case["image"])
    truth = read_label_map(data / case["label"], image.geometry) == 1
    box = slice_boxes(truth, (0.5,)).boxes[0]
    corners = image.geometry.ijk_to_ras(np.array([box.lo_ijk, box.hi_ijk]))
    roi = {"markups": [{"type": "ROI", "coordinateSystem": "RAS", "center": list(corners.mean(axis=0)),
                        "size": list(np.abs(corners[1] - corners[0])), "orientation": list(np.eye(3).ravel())}]}
    (tmp_path / "box.mrk.json").write_text(json.dumps(roi))
    output = tmp_path / "out.nii.gz"
    assert main(["segment", str(data / case["image"]), "--prompts", str(tmp_path / "box.mrk.json"), "--output", str(output),
                 "--device", "cpu", "--weights", str(tiny_weights)]) == 0
    written = read_volume(output)
    assert written.geometry.same_grid(image.geometry, tolerance=1e-6)
