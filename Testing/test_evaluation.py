"""The evaluation harness: metrics against hand counts, prompt and click simulation, baselines on a
synthetic ellipsoid, and `weakicl evaluate` end to end on a two-case synthetic manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ellipsoid, require_shared_data
from weakicl.errors import InputError
from weakicl.evaluation.baselines import AtlasRegistration, BoxInterpolation, GrowCut, OtsuThreshold, growcut_backend
from weakicl.evaluation.manifest import read_manifest, select_structures
from weakicl.evaluation.metrics import bootstrap_mean, click_curve_area, click_effect, dice, score
from weakicl.evaluation.protocols import Method, Settings, Trial, evaluate, target_prompts
from weakicl.prompts import Box, PromptSet
from weakicl.volume import Geometry, Volume
from weakicl.simulation import slice_fractions, slice_positions
from weakicl.evaluation.runner import add_evaluate_arguments, run_evaluate
from weakicl.simulation import FULL_CONNECTIVITY

SHAPE = (20, 26, 26)  # small: the tiny network slides 16-voxel windows over it
SPACING_IJK = (0.9, 1.0, 1.2)


# -- metrics ---------------------------------------------------------------------------------------
def cubes(shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A 10-voxel cube and the same cube moved `shift` voxels along k: 800 of 1000 voxels overlap."""
    truth = np.zeros((20, 20, 20), dtype=bool)
    truth[5:15, 5:15, 5:15] = True
    return np.roll(truth, shift, axis=0), truth


def test_metrics_of_two_shifted_cubes_match_hand_counts():
    prediction, truth = cubes()
    scores = score(prediction, truth, (1.0, 1.0, 1.0))
    assert scores.dice == pytest.approx(2 * 800 / 2000)
    # Every surface voxel is within 2 voxels of the other surface; the 100 voxels of the leading face
    # (20% of the 488 surface voxels) are exactly 2 away, so the 95th percentile is 2.
    assert scores.hd95 == pytest.approx(2.0)
    assert scores.nsd == pytest.approx(1.0)
    # At 1 mm, 100 face voxels plus the 6x6 centre of the opposite face (136 of 488, on each surface) fail.
    assert score(prediction, truth, (1.0, 1.0, 1.0), tolerance_mm=1.0).nsd == pytest.approx(352 / 488, abs=1e-4)


def test_metrics_use_the_spacing_in_array_order():
    prediction, truth = cubes()
    assert score(prediction, truth, (2.0, 1.0, 1.0)).hd95 == pytest.approx(4.0)  # 2 voxels of 2 mm along k
    assert score(prediction, truth, (1.0, 3.0, 3.0)).hd95 == pytest.approx(2.0)


def test_an_empty_prediction_has_no_hd95_and_zero_scores():
    _, truth = cubes()
    scores = score(np.zeros_like(truth), truth, (1.0, 1.0, 1.0))
    assert (scores.dice, scores.hd95, scores.nsd) == (0.0, None, 0.0)


def test_bootstrap_is_seeded_and_drops_missing_values():
    values = [0.2, 0.9, None, 0.5, 0.7]
    first, second = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert first == second and first.n == 4 and first.mean == pytest.approx(0.575)
    assert first.low <= first.mean <= first.high
    assert bootstrap_mean([0.4] * 5).as_dict() == {"mean": 0.4, "ci95": [0.4, 0.4], "n": 5}
    assert bootstrap_mean([None]) is None


def test_click_curve_area_is_the_normalised_trapezoid():
    assert click_curve_area([0.0, 1.0]) == pytest.approx(0.5)
    assert click_curve_area([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert click_curve_area([0.2, 0.6, 1.0]) == pytest.approx(0.6)


def test_click_effect_measures_depth_component_and_right_and_wrong_changes():
    truth = np.zeros((1, 12, 12), dtype=bool)
    truth[0, 2:10, 2:10] = True
    previous = truth.copy()
    previous[0, 2:10, 6:10] = False  # a missed 8x4 slab: its voxels are 1-4 face steps from the result
    corrected = previous.copy()
    corrected[0, 2:10, 6:8] = True  # half the slab fixed...
    corrected[0, 0, 0:3] = True  # ...and three voxels wrongly added far away
    deep = click_effect(previous, corrected, truth, (0, 5, 8), positive=True)
    assert (deep.depth_voxels, deep.component_voxels, deep.fixed_in_component) == (3, 32, 16)
    assert (deep.right_changes, deep.wrong_changes) == (16, 3)
    assert click_effect(previous, corrected, truth, (0, 5, 6), positive=True).depth_voxels == 1  # on the border
    negative = click_effect(corrected, previous, truth, (0, 0, 1), positive=False)  # undoing it: a false positive
    assert (negative.depth_voxels, negative.component_voxels, negative.right_changes, negative.wrong_changes) == (1, 3, 3, 16)
    nothing = np.zeros_like(truth)
    assert click_effect(nothing, nothing, truth, (0, 5, 5), positive=True).depth_voxels is None  # no side to measure from


# -- prompts and clicks ----------------------------------------------------------------------------
def test_slice_fractions_are_evenly_spaced_inside_the_extent():
    assert slice_fractions(3) == (0.25, 0.5, 0.75)
    assert slice_fractions(1) == (0.5,)
    assert len(slice_fractions(5)) == 5


def test_three_boxes_are_tight_on_the_slices_at_a_quarter_half_and_three_quarters():
    truth = ellipsoid((40, 40, 40), (20, 18, 22), (12, 8, 10))  # extent along k: slices 8..32
    prompts = target_prompts(truth, Settings("propagate"), np.random.default_rng(0))
    assert [int(box.lo_ijk[2]) for box in prompts.boxes] == [14, 20, 26]
    for box in prompts.boxes:
        k = int(box.lo_ijk[2])
        assert box.hi_ijk[2] == k
        rows, columns = np.nonzero(truth[k])
        assert (box.lo_ijk[1], box.hi_ijk[1]) == (rows.min(), rows.max())
        assert (box.lo_ijk[0], box.hi_ijk[0]) == (columns.min(), columns.max())


@pytest.mark.parametrize("slice_axis", ["j", "i"])
def test_boxes_and_points_on_coronal_or_sagittal_slices_lie_across_the_chosen_axis(slice_axis):
    truth = ellipsoid((40, 40, 40), (20, 18, 22), (12, 8, 10))
    axis_ijk = "ijk".index(slice_axis)
    settings = Settings("propagate", slice_axis=slice_axis)
    boxes = target_prompts(truth, settings, np.random.default_rng(0)).boxes
    extent = np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != 2 - axis_ijk)))
    assert [box.thin_axes() for box in boxes] == [[axis_ijk]] * 3 and f"across {slice_axis}" in settings.label
    assert [box.lo_ijk[axis_ijk] for box in boxes] == [float(p) for p in slice_positions(truth, slice_fractions(3), 2 - axis_ijk)]
    assert extent[0] < boxes[0].lo_ijk[axis_ijk] < boxes[-1].lo_ijk[axis_ijk] < extent[-1]
    points = target_prompts(truth, Settings("propagate", prompt_kind="points", slice_axis=slice_axis), np.random.default_rng(5)).points
    assert [p.ijk[axis_ijk] for p in points] == [box.lo_ijk[axis_ijk] for box in boxes]
    assert all(truth[tuple(int(c) for c in p.ijk[::-1])] for p in points)


@pytest.mark.parametrize("slice_axis", ["k", "j", "i"])
def test_growcut_extends_the_box_hull_along_the_boxes_own_slice_axis(slice_axis):
    """GrowCut's unknown region is the box hull one gap past the outer boxes: extended along k only,
    sagittal boxes of a structure long along i left its ends as background seeds (Dice 0.87)."""
    truth = ellipsoid((30, 30, 60), (15, 15, 30), (6, 6, 22))  # long along i
    rng = np.random.default_rng(0)
    volume = Volume((np.where(truth, 100.0, 0.0) + rng.normal(0, 10, truth.shape)).astype(np.float32),
                    Geometry.identity(truth.shape), "CT")
    boxes = target_prompts(truth, Settings("propagate", slice_axis=slice_axis), rng)
    mask = GrowCut("random-walker").segment(Trial(None, volume, boxes, [(volume, boxes)]), [], None)
    assert dice(mask, truth) > 0.97
    if slice_axis == "i":  # a line among them (a thin part's tight box) leaves the axis to the slice boxes
        lined = PromptSet(boxes=[boxes.boxes[0], Box((30.0, 15.0, 10.0), (30.0, 15.5, 20.0)), boxes.boxes[2]])
        mask = GrowCut("random-walker").segment(Trial(None, volume, lined, [(volume, lined)]), [], None)
        assert dice(mask, truth) > 0.97


def test_jittered_boxes_are_loose_or_tight_by_a_few_voxels_on_the_same_slices():
    truth = ellipsoid((40, 40, 40), (20, 18, 22), (12, 8, 10))
    tight = target_prompts(truth, Settings("propagate"), np.random.default_rng(0)).boxes
    settings = Settings("propagate", jitter=0.15)
    jittered = target_prompts(truth, settings, np.random.default_rng(0)).boxes
    assert "jitter 0.15" in settings.label and "jitter" not in Settings("propagate").label
    moved = []
    for exact, drawn in zip(tight, jittered):
        assert drawn.lo_ijk[2] == drawn.hi_ijk[2] == exact.lo_ijk[2]  # still on the annotated slice
        size = np.array(exact.hi_ijk[:2]) - np.array(exact.lo_ijk[:2]) + 1
        shift = np.abs(np.array(drawn.lo_ijk[:2] + drawn.hi_ijk[:2]) - np.array(exact.lo_ijk[:2] + exact.hi_ijk[:2]))
        assert np.all(shift <= 0.15 * np.concatenate([size, size]) + 1e-9)
        moved.append(shift.max())
    assert max(moved) >= 1.0  # a few voxels off, as hands draw


def test_context_subjects_come_from_the_same_or_from_another_collection():
    from weakicl.evaluation.manifest import Case, Structure
    from weakicl.evaluation.protocols import context_subjects

    def structure(case_id: str, collection: str, name: str = "spleen") -> Structure:
        case = Case(case_id, collection, "CT" if collection == "ct" else "MR", Path("i"), Path("l"), ((1, name),))
        return Structure(case, 1, name, "unseen")

    target = structure("ct1", "ct")
    pool = [target, structure("ct2", "ct"), structure("mr1", "mr"), structure("mr2", "mr"), structure("mr3", "mr", "liver")]
    assert [s.case.id for s in context_subjects(target, pool, Settings("cross-weak", k=3))] == ["ct2"]
    other = Settings("cross-weak", k=2, context_collection="other")
    assert sorted(s.case.id for s in context_subjects(target, pool, other)) == ["mr1", "mr2"]
    assert other.label == "cross-weak (k=2, other collection)"


def test_point_prompts_lie_inside_the_structure_on_the_same_slices_and_are_reproducible():
    truth = ellipsoid((40, 40, 40), (20, 18, 22), (12, 8, 10))
    settings = Settings("propagate", prompt_kind="points")
    points = target_prompts(truth, settings, np.random.default_rng(5)).points
    again = target_prompts(truth, settings, np.random.default_rng(5)).points
    assert points == again and [p.ijk[2] for p in points] == [14.0, 20.0, 26.0]
    assert all(p.positive and truth[tuple(int(c) for c in p.ijk[::-1])] for p in points)


class OracleFill(Method):
    """Starts with two holes in the truth; each click fills the error component it lands in."""

    name = "oracle"

    def __init__(self, truth: np.ndarray) -> None:
        from scipy import ndimage

        self.truth = truth
        self.start = truth.copy()
        self.start[8:14, 8:14, 8:14] = False  # the bigger hole: corrected first
        self.start[16:19, 16:19, 16:19] = False
        self.components = ndimage.label(truth & ~self.start, FULL_CONNECTIVITY)[0]
        self.clicks_seen: list = []

    def segment(self, trial, clicks, previous):
        self.clicks_seen = list(clicks)
        mask = self.start.copy()
        for click in clicks:
            mask |= self.components == self.components[tuple(int(c) for c in click.ijk[::-1])]
        return mask


def test_click_loop_corrects_the_largest_error_first_and_stays_flat_once_perfect(tmp_path):
    truth = np.zeros((24, 24, 24), dtype=bool)
    truth[6:20, 6:20, 6:20] = True
    manifest = write_manifest(tmp_path, [write_case(tmp_path, "cube", truth, 0)])
    structure = select_structures(*read_manifest(manifest), None, False)[0]
    oracle = OracleFill(truth)
    record = evaluate(oracle, structure, Settings("interactive", clicks=4), [])
    first, second = oracle.clicks_seen
    assert first.positive and all(10 <= c <= 11 for c in first.ijk)  # the centre of the 6-voxel hole
    assert second.positive and all(16 <= c <= 18 for c in second.ijk)
    assert record.click_dice[2:] == [1.0, 1.0, 1.0] and record.click_dice[0] < record.click_dice[1] < 1.0
    assert record.auc == pytest.approx(click_curve_area(record.click_dice))
    assert record.clicks_honoured == [True, True]  # each filled hole holds its click
    assert record.far_dice_change == [0.0, 0.0]  # each fill lies within 20 mm of its click: nothing far changes
    entry = record.as_dict()
    assert entry["clicks_honoured"] == [True, True] and len(entry["far_dice_change"]) == 2


# -- synthetic manifest ----------------------------------------------------------------------------
def write_case(folder, name: str, truth: np.ndarray, seed: int) -> dict:
    """A noisy image where `truth` (label 1) is bright, and a 3x3x3 speck (label 2, too small to evaluate)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    labels = truth.astype(np.uint8)
    labels[1:4, 1:4, 1:4] = 2
    image = (40 + 100 * truth + rng.normal(0, 12, truth.shape)).astype(np.float32)
    for array, suffix in ((image, "image"), (labels, "label")):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(SPACING_IJK)
        itk.SetOrigin((10.0, -5.0, 3.0))
        sitk.WriteImage(itk, str(folder / f"{name}_{suffix}.nii.gz"))
    return {"id": name, "collection": "synthetic", "modality": "MR", "image": f"{name}_image.nii.gz",
            "label": f"{name}_label.nii.gz", "labels": {"1": "blob", "2": "speck"}}


def write_manifest(folder, cases: list[dict], **extra) -> Path:
    path = folder / "manifest.json"
    path.write_text(json.dumps({"cases": cases, **extra}))
    return path


@pytest.fixture(autouse=True)
def fresh_case_cache():
    """Cases are cached by path; every test writes its own files."""
    from weakicl.evaluation.manifest import load_case

    load_case.cache_clear()
    yield
    load_case.cache_clear()


@pytest.fixture()
def synthetic_manifest(tmp_path) -> Path:
    """Two subjects with a bright ellipsoid each; case_b's speck is declared unseen."""
    cases = [write_case(tmp_path, "case_a", ellipsoid(SHAPE, (10, 13, 12), (6, 8, 7)), 1),
             write_case(tmp_path, "case_b", ellipsoid(SHAPE, (9, 12, 14), (6, 8, 7)), 2)]
    return write_manifest(tmp_path, cases, splits={"validation": ["case_a", "case_b"]},
                          unseen_labels={"cases": {"case_b": ["2"]}})


def test_selection_keeps_unseen_structures_out_of_the_split(synthetic_manifest):
    cases, document = read_manifest(synthetic_manifest)
    split = select_structures(cases, document, "validation", False)
    assert [s.key for s in split] == ["case_a/1", "case_a/2", "case_b/1"]
    both = select_structures(cases, document, "validation", True)
    assert [(s.key, s.group) for s in both][-1] == ("case_b/2", "unseen")
    assert len(select_structures(cases, document, None, False)) == 4
    with pytest.raises(InputError, match="no split 'test'"):
        select_structures(cases, document, "test", False)


def test_tuning_structures_are_training_tasks_never_validation_or_unseen(tmp_path, monkeypatch):
    from weakicl.evaluation import manifest as manifest_module
    from weakicl.evaluation.manifest import tuning_structures

    blob = ellipsoid(SHAPE, (10, 13, 12), (6, 8, 7))
    cases = [write_case(tmp_path, name, blob, seed) for seed, name in enumerate(["ct", "train_0", "train_1", "train_2", "held"])]
    path = write_manifest(tmp_path, cases, splits={"train": ["train_0", "train_1", "train_2"], "validation": ["held"]},
                          unseen_labels={"cases": {"ct": ["1"]}})
    monkeypatch.setattr(manifest_module, "TUNING_STRUCTURES", {"ct": (1, 2, 7)})  # 1 unseen, 7 not a label
    monkeypatch.setattr(manifest_module, "TUNING_HIPPOCAMPUS_STRIDE", 2)
    chosen = tuning_structures(*read_manifest(path))
    assert [(s.key, s.group) for s in chosen] == [("ct/2", "tuning-other"), ("train_0/1", "tuning-hippocampus"),
                                                  ("train_0/2", "tuning-hippocampus"), ("train_2/1", "tuning-hippocampus"),
                                                  ("train_2/2", "tuning-hippocampus")]
    monkeypatch.setattr(manifest_module, "TUNING_STRUCTURES", {})
    with pytest.raises(InputError, match="none of the tuning structures"):
        tuning_structures(*read_manifest(write_manifest(tmp_path, cases[4:])))


@pytest.mark.parametrize("method, minimum", [
    (BoxInterpolation(), 0.55),  # the hull covers only the middle half of the extent, with box corners
    (GrowCut("random-walker"), 0.85),
    (OtsuThreshold(), 0.55),  # Otsu is confined to the hull as well
])
def test_each_baseline_segments_a_bright_ellipsoid(synthetic_manifest, method, minimum):
    cases, document = read_manifest(synthetic_manifest)
    structure = select_structures(cases, document, "validation", False)[0]
    record = evaluate(method, structure, Settings("propagate"), [])
    assert record.status == "ok" and record.scores.dice > minimum


@pytest.mark.skipif(growcut_backend() != "slicer", reason="slicer-core (vtkImageGrowCutSegment) not installed")
def test_slicer_growcut_segments_a_bright_ellipsoid(synthetic_manifest):
    cases, document = read_manifest(synthetic_manifest)
    structure = select_structures(cases, document, "validation", False)[0]
    assert evaluate(GrowCut("slicer"), structure, Settings("propagate"), []).scores.dice > 0.85


@pytest.mark.skipif(growcut_backend() != "slicer", reason="slicer-core (vtkImageGrowCutSegment) not installed")
@pytest.mark.parametrize("slices", [1, 2])
def test_slicer_growcut_takes_a_structure_on_one_or_two_thick_slices(slices):
    """vtkImageGrowCutSegment refuses an image under 3 voxels a side, and padded on one side only, a single
    slice grows nothing beyond its seeds: the crop is padded on both sides for it."""
    truth = np.zeros((slices, 24, 24), dtype=bool)
    truth[:, 8:16, 8:16] = True
    volume = Volume(np.where(truth, 100.0, 0.0).astype(np.float32), Geometry.identity(truth.shape, (1.0, 1.0, 9.0)), "CT")
    boxes = PromptSet(boxes=[Box((8, 8, k), (15, 15, k)) for k in range(slices)])
    mask = GrowCut("slicer").segment(Trial(None, volume, boxes, [(volume, boxes)]), [], None)
    assert mask.shape == truth.shape and dice(mask, truth) > 0.9


def test_box_interpolation_clicks_paint_and_growcut_clicks_seed(synthetic_manifest):
    cases, document = read_manifest(synthetic_manifest)
    structure = select_structures(cases, document, "validation", False)[0]
    for method in (BoxInterpolation(), GrowCut("random-walker")):
        record = evaluate(method, structure, Settings("interactive", clicks=3), [])
        assert len(record.click_dice) == 4 and record.click_dice[-1] >= record.click_dice[0] - 0.02


def test_baselines_are_not_applicable_without_target_boxes(synthetic_manifest):
    cases, document = read_manifest(synthetic_manifest)
    structures = select_structures(cases, document, "validation", False)
    for settings in (Settings("cross-weak"), Settings("propagate", prompt_kind="points")):
        assert evaluate(BoxInterpolation(), structures[0], settings, structures).status == "n/a"
    assert evaluate(OtsuThreshold(), structures[0], Settings("interactive"), structures).reason == "cannot take corrective clicks"


def test_atlas_baseline_registers_the_other_subject_and_needs_context_subjects(synthetic_manifest):
    cases, document = read_manifest(synthetic_manifest)
    structures = select_structures(cases, document, "validation", False)
    blob = structures[0]
    for protocol, minimum in (("cross-dense", 0.8), ("cross-weak", 0.5)):  # a weak context gives its box hull
        record = evaluate(AtlasRegistration(), blob, Settings(protocol), structures)
        assert record.status == "ok" and record.scores.dice > minimum
    for settings in (Settings("propagate"), Settings("interactive", start="cross-weak")):
        assert evaluate(AtlasRegistration(), blob, settings, structures).status == "n/a"


# -- the command -----------------------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    return parser.parse_args(list(argv))


def test_evaluate_end_to_end_on_a_synthetic_manifest(synthetic_manifest, tiny_weights, tmp_path):
    from weakicl.weights import sha256_of

    out = tmp_path / "report"
    args = parse("--manifest", str(synthetic_manifest), "--split", "validation", "--protocol", "propagate",
                 "cross-weak", "cross-dense", "interactive", "--k", "1", "--clicks", "1", "--weights",
                 str(tiny_weights), "--device", "cpu", "--out", str(out))
    assert run_evaluate(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["weights_sha256"] == sha256_of(tiny_weights)
    assert results["structures_evaluated"] == 2 and len(results["skipped_structures"]) == 1
    assert len(results["records"]) == 4 * 5 * 2  # settings x methods x structures
    by = {(r["setting"], r["method"], r["case"]): r for r in results["records"]}
    assert by[("propagate (3 box slices)", "growcut", "case_a")]["dice"] > 0.85
    assert by[("cross-dense (k=1)", "model", "case_b")]["status"] == "ok"
    assert by[("cross-weak (k=1)", "threshold", "case_b")]["status"] == "n/a"
    assert by[("cross-dense (k=1)", "atlas", "case_b")]["dice"] > 0.7
    assert by[("propagate (3 box slices)", "atlas", "case_a")]["status"] == "n/a"
    assert len(by[("interactive (propagate, 3 box slices, 1 click)", "model", "case_a")]["dice_after_click"]) == 2
    report = (out / "report.md").read_text()
    assert "## cross-dense (k=1)" in report and "| growcut | blob | 2 |" in report
    for figure in ("dice-propagate-3-box-slices", "clicks-interactive-propagate-3-box-slices-1-click", "overlays-cross-weak-k-1"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000


def test_the_unaligned_ablation_shares_the_network_and_skips_the_atlas_prior(synthetic_manifest, tiny_weights):
    from weakicl.evaluation.methods import build_methods

    model, unaligned = build_methods(["model", "model-unaligned"], str(tiny_weights), "cpu")
    assert (model.name, unaligned.name) == ("model", "model-unaligned") and model.segmenter is unaligned.segmenter
    cases, document = read_manifest(synthetic_manifest)
    structures = select_structures(cases, document, "validation", False)
    with_prior, without = (evaluate(m, structures[0], Settings("cross-dense"), structures) for m in (model, unaligned))
    assert with_prior.scores.dice > 0.7 and with_prior.scores.dice != without.scores.dice  # an untrained network follows the prior


def test_the_network_only_ablation_leaves_clicks_to_the_network(synthetic_manifest, tiny_weights):
    from weakicl.evaluation.methods import build_methods

    model, network = build_methods(["model", "model-network-only"], str(tiny_weights), "cpu")
    assert (model.network_only, network.network_only) == (False, True) and network.align_context
    cases, document = read_manifest(synthetic_manifest)
    structure = select_structures(cases, document, "validation", False)[0]
    seeded, alone = (evaluate(m, structure, Settings("interactive", clicks=3), []) for m in (model, network))
    assert all(seeded.clicks_honoured)  # an untrained network does not follow clicks by itself; seeds do
    assert len(alone.click_dice) == len(seeded.click_dice) == 4


@pytest.mark.parametrize("argv, message", [
    (("--manifest", "missing.json"), "manifest not found"),
    (("--method", "magic"), "unknown method 'magic'"),
    (("--protocol", "guess"), "unknown protocol 'guess'"),
    (("--limit", "0"), r"--limit must be at least 1 \(cases per group\), got 0"),  # audit D5: an empty report, exit 0
    (("--limit", "-1"), "--limit must be at least 1"),
])
def test_bad_input_is_one_line_input_error(synthetic_manifest, tmp_path, argv, message):
    args = parse("--manifest", str(synthetic_manifest), "--out", str(tmp_path / "out"), "--method", "box-interp", *argv)
    with pytest.raises(InputError, match=message):
        run_evaluate(args)


def test_an_earlier_evaluation_is_replaced_only_with_overwrite_and_q_hides_the_bars(synthetic_manifest, tmp_path, capsys):
    """Audit D5: a rerun with the same --out replaced results.json and report.md without asking, and -q
    still drew a progress bar per setting."""
    from weakicl.cli import main

    out = tmp_path / "out"
    command = ["evaluate", "--manifest", str(synthetic_manifest), "--split", "validation", "--method", "box-interp",
               "--out", str(out), "-q"]
    assert main(command) == 0
    assert capsys.readouterr().err == ""
    results, report = (out / "results.json").read_bytes(), (out / "report.md").read_bytes()
    assert main(command + ["--seed", "5"]) == 2
    assert capsys.readouterr().err.strip() == (f"weakicl: error: {out} holds an earlier evaluation (results.json, report.md); "
                                               "pass --overwrite to replace it")
    assert (out / "results.json").read_bytes() == results and (out / "report.md").read_bytes() == report
    assert main(command + ["--seed", "5", "--overwrite", "--slice-axis", "j"]) == 0
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["settings"]["seed"] == 5 and rerun["settings"]["slice_axis"] == "j"
    assert [s["setting"] for s in rerun["summary"]][0] == "propagate (3 box slices across j)"


def test_baselines_on_two_real_validation_hippocampi(tmp_path):
    data = require_shared_data()
    out = tmp_path / "real"
    args = parse("--manifest", str(data / "manifest.json"), "--split", "validation", "--limit", "2",
                 "--method", "box-interp", "growcut", "threshold", "--out", str(out))
    assert run_evaluate(args) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    dice = {row["method"]: row["dice"]["mean"] for row in summary if row["structure"] == "all"}
    assert dice["growcut"] > 0.6 and dice["box-interp"] > 0.5 and dice["threshold"] > 0.4


def test_a_3d_box_prompt_is_the_structures_bounding_box_and_baselines_need_slice_boxes():
    from weakicl.evaluation.protocols import NotApplicable

    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[2:5, 3:8, 4:9] = True
    settings = Settings("propagate", prompt_kind="box3d")
    (box,) = target_prompts(mask, settings, np.random.default_rng(0)).boxes
    assert box.lo_ijk == (4.0, 3.0, 2.0) and box.hi_ijk == (8.0, 7.0, 4.0) and box.thin_axes() == []
    assert settings.label == "propagate (a 3D box)"
    with pytest.raises(NotApplicable, match="needs box prompts"):
        BoxInterpolation().check(settings)
    with pytest.raises(InputError, match="jitter"):  # a 3D box is drawn tight: no jitter that the label would claim
        target_prompts(mask, Settings("propagate", prompt_kind="box3d", jitter=0.1), np.random.default_rng(0))


def test_ideal_local_fix_flips_the_clicked_error_within_the_radius_only():
    from weakicl.prompts import Point
    from weakicl.simulation import corrective_click, ideal_local_fix

    truth = np.zeros((9, 40, 9), dtype=bool)
    truth[2:7, 2:38, 2:7] = True
    prediction = truth.copy()
    prediction[2:7, 2:38, 6] = False  # one missed sheet along j, 36 voxels long and 5 deep
    click = corrective_click(prediction, truth)
    assert click.positive
    spacing_kji = (1.0, 2.0, 1.0)  # j voxels are 2 mm: 10 mm reaches 5 of them each way
    near = ideal_local_fix(prediction, truth, click, 10.0, spacing_kji)
    added = near & ~prediction
    assert added.any() and not (added & ~truth).any()  # only error voxels, and only added
    j = np.nonzero(added.any(axis=(0, 2)))[0]
    assert j.min() >= click.ijk[1] - 5 and j.max() <= click.ijk[1] + 5
    assert dice(near, truth) < dice(ideal_local_fix(prediction, truth, click, None, spacing_kji), truth) == 1.0
    on_right_voxel = Point((4.0, 10.0, 4.0), True)  # inside the structure already: nothing to fix there
    assert np.array_equal(ideal_local_fix(prediction, truth, on_right_voxel, 10.0, spacing_kji), prediction)


def test_own_box_ceiling_draws_boxes_on_one_masks_slices_around_another(monkeypatch):
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from own_box_ceiling import boxes_on

    from weakicl.simulation import slice_fractions, slice_positions

    slices_of = np.zeros((20, 16, 16), dtype=bool)
    slices_of[2:11, 5:9, 5:9] = True
    around = np.zeros_like(slices_of)
    around[0:8, 0:7, 3:12] = True  # ends before slices_of does: its last slice gets no box
    boxes = boxes_on(slices_of, around, 0).boxes
    positions = slice_positions(slices_of, slice_fractions(4), 0)
    assert [int(b.lo_ijk[2]) for b in boxes] == positions[:-1] and positions[-1] >= 8
    assert all(b.lo_ijk[:2] == (3.0, 0.0) and b.hi_ijk[:2] == (11.0, 6.0) for b in boxes)  # around's extent, IJK
    grown = boxes_on(slices_of, around, 0, grow=1).boxes
    assert all(b.lo_ijk[:2] == (2.0, 0.0) and b.hi_ijk[:2] == (12.0, 7.0) for b in grown)  # clipped at the image edge
