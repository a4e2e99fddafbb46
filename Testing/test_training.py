"""Training pipeline: synthetic tasks, episode sampling, the real-data cache and a 3-step run with resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO

PATCH = (24, 24, 24)
TINY_RUN = {
    "net": {"channels": [4, 8], "query_tokens": 2, "attention_heads": 2, "task_layers": 1, "patch_size": list(PATCH)},
    "episodes": {"max_classes": 2, "max_references": 2},
    "total_steps": 3, "warmup_steps": 1, "log_every": 1, "validate_every": 2, "checkpoint_every": 2,
}


def test_synthetic_subjects_have_shape_range_and_are_deterministic():
    from weakicl.training.synthetic import SyntheticTasks

    tasks = SyntheticTasks((32, 32, 32), seed=3)
    images, labels = tasks.subjects(np.random.default_rng(1), 3)
    again, again_labels = SyntheticTasks((32, 32, 32), seed=3).subjects(np.random.default_rng(1), 3)
    assert len(images) == len(labels) == 3
    for image, label, image2, label2 in zip(images, labels, again, again_labels):
        assert image.shape == label.shape == (32, 32, 32)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert label.max() >= 1
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(label, label2)
    assert not np.array_equal(labels[0], labels[1])  # subjects differ by their deformation


def test_look_alike_contrasts_copy_another_labels_intensity_and_draw_nothing_when_off():
    from weakicl.training.synthetic import SIMILAR_OFFSET, random_contrast, with_look_alikes

    rng, untouched = np.random.default_rng(5), np.random.default_rng(5)
    means = np.array([0.1, 0.5, 0.9])
    with_look_alikes(means, rng, 0.0)
    np.testing.assert_array_equal(means, [0.1, 0.5, 0.9])
    assert rng.random() == untouched.random()  # the episode stream of older configs stands

    close = 0
    for seed in range(40):
        plain = random_contrast(6, np.random.default_rng(seed)).means
        alike = random_contrast(6, np.random.default_rng(seed), similar_fraction=1.0).means
        np.testing.assert_array_equal(plain[0], alike[0])  # the background keeps its own intensity
        for label in np.flatnonzero(plain != alike):
            gaps = np.abs(np.delete(alike, label) - alike[label])
            assert gaps.min() <= SIMILAR_OFFSET[1] + 1e-9  # within the offset of some other label
            close += 1
    assert close >= 40  # about half of 6 labels in each of 40 contrasts


@pytest.mark.parametrize("seed", range(4))
def test_sampled_episodes_are_consistent(seed):
    from weakicl.training.episodes import MODES, EpisodeConfig, EpisodeSampler

    sampler = EpisodeSampler(EpisodeConfig(max_classes=2, max_references=2), PATCH, 1.0, seed=0)
    episode = sampler.sample(np.random.default_rng(seed))
    classes, references = episode.ref_prompts.shape[:2]
    assert episode.mode in MODES
    assert episode.masks.shape == (classes,) + PATCH and episode.masks.any(axis=(1, 2, 3)).all()
    assert episode.target_prompts.shape == (classes, 5) + PATCH
    assert len(episode.references) == references and max(episode.references) < len(episode.images)
    assert episode.ref_prompts.reshape(classes, references, -1).max(axis=-1).min() > 0  # every reference is prompted


def test_a_step_leaves_a_worker_as_shared_tensors_and_arrives_unchanged():
    import pickle

    from weakicl.training.episodes import EpisodeConfig, EpisodeSampler
    from weakicl.training.loop import StepEpisodes, unpack_episodes

    sampler = EpisodeSampler(EpisodeConfig(max_classes=2, max_references=2, mode_weights={"propagate": 1, "correction": 1}), PATCH, 1.0, seed=0)
    packed = StepEpisodes(sampler, 7, 4)[3]
    rng = np.random.default_rng([7, 3])
    drawn = [sampler.sample(rng) for _ in range(4)]
    assert len(packed.tensors) == 2  # float32 and bool: one tensor each for the whole step
    assert len(pickle.dumps(packed.episodes)) < 2000  # what is pickled holds no voxels
    for episode, arrived in zip(drawn, unpack_episodes(packed)):
        for name, value in vars(episode).items():
            if isinstance(value, np.ndarray):
                assert getattr(arrived, name).dtype == value.dtype
                np.testing.assert_array_equal(getattr(arrived, name), value)
            else:
                assert getattr(arrived, name) == value, name


def test_atlas_episodes_carry_the_moved_reference_annotations_as_a_soft_prior():
    from weakicl.prompts import MASK_CHANNEL
    from weakicl.training.episodes import EpisodeConfig, EpisodeSampler

    sampler = EpisodeSampler(EpisodeConfig(mode_weights={"atlas": 1.0}, max_references=3), PATCH, 1.0, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        episode = sampler.sample(rng)
        prior = episode.target_prompts[:, MASK_CHANNEL]
        assert episode.mode == "atlas" and episode.references
        assert 0.0 <= prior.min() and prior.max() <= 1.0 and prior.max() > 0
        assert not episode.target_prompts[:, :MASK_CHANNEL].any()  # no target prompts: only the prior


def test_simulated_atlas_prior_lands_near_the_target_structure():
    from conftest import ellipsoid
    from weakicl.training.episodes import ATLAS_SHIFT_VOXELS, simulated_atlas_prior

    target = ellipsoid(PATCH, (12, 12, 12), (5, 6, 4))
    reference = ellipsoid(PATCH, (8, 15, 10), (4, 5, 4))  # smaller and elsewhere in its own patch
    for seed in range(5):
        prior = simulated_atlas_prior([reference.astype(np.float32)], [reference], target, np.random.default_rng(seed))
        centre = np.average(np.argwhere(prior > 0), axis=0, weights=prior[prior > 0])
        assert np.linalg.norm(centre - 12) < 4 * ATLAS_SHIFT_VOXELS[1]
        assert 0.7 < prior.sum() / target.sum() < 1.4  # resized to the target's structure, within the 10 % jitter


def test_atlas_prior_error_follows_the_episode_config():
    """`atlas_shift_voxels` / `atlas_scale_jitter` set how far off the simulated registration lands."""
    from conftest import ellipsoid
    from weakicl.training.episodes import EpisodeConfig, simulated_atlas_prior

    target = ellipsoid(PATCH, (12, 12, 12), (5, 6, 4))
    reference = ellipsoid(PATCH, (8, 15, 10), (4, 5, 4))

    def mean_miss(shift, jitter) -> float:
        misses = []
        for seed in range(8):
            prior = simulated_atlas_prior([reference.astype(np.float32)], [reference], target, np.random.default_rng(seed), shift, jitter)
            misses.append(np.linalg.norm(np.average(np.argwhere(prior > 0), axis=0, weights=prior[prior > 0]) - 12))
        return float(np.mean(misses))

    assert mean_miss((0.0, 0.0), 0.0) < 0.6  # exact registration: centred on the target structure
    assert mean_miss((3.0, 4.0), 0.2) > 3.0
    config = EpisodeConfig(atlas_shift_voxels=[1, 4], atlas_scale_jitter=0.2)  # as a JSON config gives them
    assert config.atlas_shift_voxels == (1.0, 4.0) and EpisodeConfig().atlas_shift_voxels == (0.5, 2.5)


def test_corrective_clicks_address_distinct_errors():
    from weakicl.training.episodes import corrective_clicks

    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    previous = truth.copy()
    previous[5:15, 5:15, 5:8] = False  # a miss
    previous[1:3, 1:3, 1:3] = True  # a small overshoot
    clicks = corrective_clicks(previous, truth, 3)
    assert [c.positive for c in clicks] == [True, False]


class ScriptedNetwork:
    """Stands in for the network in a training loop's own-prediction passes: pass n returns `results[n]`
    (boolean class masks) as logits, whatever the inputs."""

    def __init__(self, results):
        self.results, self.passes = list(results), 0

    def encode_image(self, images):
        return [images]

    def encode_task(self, features, prompts):
        import torch

        return torch.zeros((prompts.shape[0], 1, 1))

    def decode(self, features, tokens, prompts):
        import torch

        result = torch.as_tensor(self.results[self.passes])
        self.passes += 1
        return torch.where(result[:, None], 5.0, -5.0)


def misses_then_overshoots(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two results of (C,D,H,W) `truth`: one missing its first half along K, one whole plus a block far from it."""
    from scipy import ndimage

    missing = truth.copy()
    for index, mask in enumerate(truth):
        k = np.flatnonzero(mask.any(axis=(1, 2)))
        missing[index, : (k[0] + k[-1]) // 2 + 1] = False
    far = ~ndimage.binary_dilation(truth, iterations=4)
    overshooting = truth | far
    return missing, overshooting


def test_click_rounds_put_each_later_click_on_the_networks_new_result():
    import contextlib

    from weakicl.prompts import MASK_CHANNEL, PROMPT_CHANNELS
    from weakicl.training.episodes import EpisodeConfig, EpisodeSampler
    from weakicl.training.loop import use_own_predictions

    config = EpisodeConfig(max_classes=1, max_references=1, max_clicks=1, mode_weights={"correction": 1.0},
                           prompt_weights={"slice_boxes": 1.0})  # no points but the clicks
    episode = EpisodeSampler(config, PATCH, 1.0, seed=0).sample(np.random.default_rng(0))
    truth = episode.masks > 0.5
    missing, overshooting = misses_then_overshoots(truth)
    network = ScriptedNetwork([missing, overshooting])
    use_own_predictions(network, [episode], np.random.default_rng(0), 1.0, config, "cpu", contextlib.nullcontext, rounds=2)
    assert network.passes == 2
    prompts = episode.target_prompts[0]
    np.testing.assert_array_equal(prompts[MASK_CHANNEL] > 0.5, overshooting[0])  # the latest result
    positive, negative = (prompts[PROMPT_CHANNELS.index(name)] for name in ("positive", "negative"))
    centre = np.unravel_index(np.argmax(positive), positive.shape)
    assert positive.max() == 1 and (truth[0] & ~missing[0])[centre]  # the first round's click, kept
    centre = np.unravel_index(np.argmax(negative), negative.shape)
    assert negative.max() == 1 and (overshooting[0] & ~truth[0])[centre]  # the second, on the new result


def test_click_rounds_must_be_at_least_one(tmp_path):
    from weakicl.errors import InputError
    from weakicl.training.loop import TrainConfig

    path = tmp_path / "rounds.json"
    path.write_text(json.dumps(TINY_RUN | {"click_rounds": 0}))
    with pytest.raises(InputError, match="click_rounds"):
        TrainConfig.from_file(path)


def _write_case(folder, name, labels, seed):
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    image = (labels * 50 + rng.normal(100, 5, labels.shape)).astype(np.float32)
    for suffix, array in (("image", image), ("label", labels.astype(np.uint8))):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{name}_{suffix}.nii.gz"))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A manifest with 4 train cases, 1 validation case and an unseen label, prepared into a cache."""
    pytest.importorskip("SimpleITK")
    from weakicl.training.data import prepare_cache

    folder = tmp_path_factory.mktemp("data")
    cases = []
    for number in range(5):
        labels = np.zeros((20, 26, 22), np.uint8)
        labels[4 + number % 2:12, 6:16, 5:14] = 1
        labels[12:16, 8:18, 6:16] = 2
        labels[5:10, 17:22, 15:19] = 3
        _write_case(folder, f"case{number}", labels, number)
        cases.append({"id": f"case{number}", "collection": "toy", "modality": "MR", "image": f"case{number}_image.nii.gz",
                      "label": f"case{number}_label.nii.gz", "labels": {"1": "one", "2": "two", "3": "three"}})
    manifest = {"cases": cases, "splits": {"train": ["case0", "case1", "case2"], "validation": ["case4"]},
                "unseen_labels": {"cases": {"case0": ["3"], "case1": ["3"], "case2": ["3"], "case3": ["3"]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    prepare_cache(folder / "manifest.json", folder / "cache", log=lambda message: None)
    return folder / "cache"


def test_cache_and_sampler_never_use_validation_cases_or_unseen_labels(tiny_cache):
    from weakicl.training.data import CachedSubjects, load_cases, read_index
    from weakicl.training.episodes import EpisodeConfig, EpisodeSampler

    index = read_index(tiny_cache)
    assert {e["id"]: e["split"] for e in index["cases"]} == {"case0": "train", "case1": "train", "case2": "train",
                                                             "case3": "train", "case4": "validation"}
    train = load_cases(tiny_cache, "train")
    assert all(3 not in case.structures and not (case.labels == 3).any() for case in train)
    sampler = EpisodeSampler(EpisodeConfig(synthetic_fraction=0.0, max_references=3), PATCH, 1.0, 0, CachedSubjects(train, PATCH))
    for step in range(30):
        episode = sampler.sample(np.random.default_rng([0, step]))
        assert "case4" not in episode.ids
        assert all(3 not in values for values in episode.values)
    (validation,) = load_cases(tiny_cache, "validation")
    assert validation.id == "case4" and 3 in validation.structures


def test_three_steps_write_loadable_weights_and_resume_continues(tmp_path, tiny_cache):
    from weakicl.cli import main
    from weakicl.weights import load_weights

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"cache": str(tiny_cache), "validation_cases": 1}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    model, card = load_weights(out / "weakicl.safetensors")
    assert card["training"]["steps"] == 3 and card["architecture"]["channels"] == [4, 8]
    assert "CC-BY-SA" not in json.dumps(card["data"]) and (out / "curves.png").is_file()
    assert [entry["step"] for entry in json.loads((out / "validation.json").read_text())] == [2, 3]

    assert main(["train", "--config", str(config), "--out", str(out), "--device", "cpu", "--resume", str(out), "--steps", "5"]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())["state"]
    assert state["step"] == 5 and [entry["step"] for entry in state["history"]] == [1, 2, 3, 4, 5]
    assert load_weights(out / "weakicl.safetensors")[1]["training"]["steps"] == 5


def test_a_checkpoint_exports_as_the_weights_a_run_would_write_at_that_step(tmp_path):
    import subprocess
    import sys

    from weakicl.cli import main
    from weakicl.weights import load_weights

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"cache": None, "checkpoint_every": 2, "validate_every": 10}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--device", "cpu", "--steps", "2"]) == 0
    export = tmp_path / "step2" / "weakicl.safetensors"
    script = [sys.executable, str(REPO / "scripts" / "export_checkpoint.py")]
    assert subprocess.run(script + [str(out), "--out", str(export)], capture_output=True).returncode == 0
    assert export.read_bytes() == (out / "weakicl.safetensors").read_bytes()  # the step-2 checkpoint is the run's end
    card = load_weights(export)[1]
    assert card["training"]["steps"] == 2 and "step 2" in card["weights"] and [d["collection"] for d in card["data"]] == ["synthetic"]
    refused = subprocess.run(script + [str(tmp_path), "--out", str(tmp_path / "none.safetensors")], capture_output=True, text=True)
    assert refused.returncode == 2 and "no checkpoint" in refused.stderr and "Traceback" not in refused.stderr


def test_resume_from_a_checkpoint_without_optimizer_moments(tmp_path, capsys):
    """The shipped checkpoint carries weights and counters only; continuing it must work."""
    from weakicl.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"total_steps": 1}))
    shipped = tmp_path / "shipped"
    assert main(["train", "--config", str(config), "--out", str(shipped), "--device", "cpu"]) == 0
    (shipped / "checkpoint" / "optimizer.pt").unlink()
    out = tmp_path / "continued"
    assert main(["train", "--config", str(config), "--out", str(out), "--device", "cpu", "--resume", str(shipped / "checkpoint"), "--steps", "2"]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["state"]["step"] == 2
    assert "AdamW moments start afresh" in capsys.readouterr().err


def test_resume_refuses_another_architecture(tmp_path):
    from weakicl.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"total_steps": 1}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(TINY_RUN | {"net": TINY_RUN["net"] | {"channels": [8, 8]}}))
    assert main(["train", "--config", str(other), "--out", str(tmp_path / "run"), "--device", "cpu", "--resume", str(tmp_path / "run")]) == 2


def test_invalid_config_is_a_user_error(tmp_path):
    from weakicl.cli import main

    config = tmp_path / "bad.json"
    config.write_text(json.dumps(TINY_RUN | {"episodes": {"max_references": 0}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    config.write_text(json.dumps(TINY_RUN | {"learning_rate": 0.1}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2


def test_framed_patches_fit_each_structure_to_the_same_fraction_of_the_patch(tiny_cache):
    from weakicl.training.data import FRAME_SCALE_JITTER, CachedSubjects, load_cases

    subjects = CachedSubjects(load_cases(tiny_cache, "train"), PATCH, frame_fill=0.6)
    for step in range(12):
        drawn = subjects.draw(np.random.default_rng([3, step]), 0)
        mask = drawn.labels[0] == drawn.primary
        extent = (np.argwhere(mask).max(axis=0) - np.argwhere(mask).min(axis=0) + 1).max()
        low, high = 0.6 * PATCH[0] / FRAME_SCALE_JITTER[1], 0.6 * PATCH[0] / FRAME_SCALE_JITTER[0]
        assert low - 2 <= extent <= high + 2  # whatever the structure's own size


def test_click_weights_weigh_the_loss_inside_point_prompts_only():
    import torch

    from weakicl.training.episodes import EpisodeConfig, EpisodeSampler
    from weakicl.training.loop import click_weights, segmentation_loss

    sampler = EpisodeSampler(EpisodeConfig(mode_weights={"correction": 1.0}), PATCH, 1.0, 0)
    episodes = [sampler.sample(np.random.default_rng([0, step])) for step in range(2)]
    assert click_weights(episodes, 0.0, "cpu") is None
    weights = click_weights(episodes, 4.0, "cpu")
    assert weights.shape[0] == sum(e.classes for e in episodes) and weights.min() == 1.0 and weights.max() > 4.5
    targets = torch.from_numpy(np.concatenate([e.masks for e in episodes])[:, None].astype(np.float32))
    wrong = (1 - 2 * targets) * 5.0  # confidently wrong everywhere
    plain, _ = segmentation_loss(wrong, targets, 0.0, 1.0)
    weighted, _ = segmentation_loss(wrong, targets, 0.0, 1.0, weights)
    assert weighted > plain


def test_far_negative_weights_weigh_background_beyond_the_distance_only():
    import torch

    from weakicl.training.loop import far_negative_weights

    masks = torch.zeros(2, 1, 16, 16, 16)
    masks[0, 0, 8, 8, 8] = 1.0  # the second row has no structure: all of it is far background
    assert far_negative_weights(masks, 0.0, 3) is None
    weights = far_negative_weights(masks, 2.0, 3)
    assert weights.shape == masks.shape
    assert torch.all(weights[0, 0, 5:12, 5:12, 5:12] == 1.0)  # within 3 voxels (chessboard): plain BCE
    assert weights[0, 0, 8, 8, 12] == 3.0 and weights[0, 0, 0, 0, 0] == 3.0 and torch.all(weights[1] == 3.0)


def test_one_shot_runs_warm_up_from_their_first_step_and_decay_with_the_clock():
    from weakicl.training.loop import TrainConfig, learning_rate

    config = TrainConfig(lr=1e-3, warmup_steps=10, total_steps=100_000, min_lr_fraction=0.05)
    assert learning_rate(config, 9_000, 0.0, first_step=9_000) == pytest.approx(1e-4)  # resumed: warms up again
    assert learning_rate(config, 9_010, 0.0, first_step=9_000) == pytest.approx(1e-3)
    assert learning_rate(config, 9_500, 0.5, first_step=9_000) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert learning_rate(config, 9_600, 1.0, first_step=9_000) == pytest.approx(5e-5)  # the minutes are over: the floor
    assert 0.95e-3 < learning_rate(config, 9_000) < 1e-3  # by steps: 9 % of total_steps, near the peak


@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO / "configs").glob("*.json")))
def test_every_shipped_config_builds_its_network_and_sampler(name):
    from weakicl.network import NetConfig
    from weakicl.training.episodes import EpisodeConfig
    from weakicl.training.loop import TrainConfig

    config = TrainConfig.from_file(REPO / "configs" / f"{name}.json")
    net, episodes = NetConfig(**config.net), EpisodeConfig(**config.episodes)
    assert config.total_steps > 0 and net.patch_size and episodes.max_references >= 1
    if name in ("cpu_atlas", "gpu"):  # they continue the shipped checkpoint: same network as cpu.json
        assert net == NetConfig(**TrainConfig.from_file(REPO / "configs" / "cpu.json").net) and episodes.mode_weights["atlas"] > 0
    if name == "cpu_v02":  # continues the shipped checkpoint with framing: same parameters, framing in the card
        shipped = NetConfig(**TrainConfig.from_file(REPO / "configs" / "cpu.json").net)
        assert {**net.to_dict(), "extra": {}} == shipped.to_dict() and net.extra["framing"]["extent_voxels"] > 0


def test_a_trimmed_cache_fits_its_budget_and_keeps_validation_and_small_collections(tiny_cache, tmp_path):
    from weakicl.errors import InputError
    from weakicl.training.data import load_cases, read_index, trim_cache

    index = read_index(tiny_cache)
    files = {entry["id"]: (tiny_cache / entry["file"]).stat().st_size for entry in index["cases"]}
    budget = sum(files.values()) - files["case1"] // 2  # one training case too many
    assert trim_cache(tiny_cache, tmp_path / "trimmed", budget) == {"toy": 1}
    trimmed = read_index(tmp_path / "trimmed")
    assert len(trimmed["cases"]) == len(index["cases"]) - 1 and "case4" in {entry["id"] for entry in trimmed["cases"]}
    assert sum(path.stat().st_size for path in (tmp_path / "trimmed").rglob("*") if path.is_file()) <= budget
    assert len(load_cases(tmp_path / "trimmed", "train")) == 3 and len(load_cases(tmp_path / "trimmed", "validation")) == 1
    with pytest.raises(InputError, match="does not fit"):
        trim_cache(tiny_cache, tmp_path / "too_small", files["case4"])
    with pytest.raises(InputError, match="would replace its source"):
        trim_cache(tiny_cache, tiny_cache, budget)
    assert read_index(tiny_cache)["cases"] == index["cases"]  # the source is untouched
