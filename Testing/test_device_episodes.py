"""Synthetic episodes drawn with torch on the training device (`weakicl.training.device_episodes`),
their use in the training loop, and the one-run GPU script, all on the CPU with tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

PATCH = (24, 24, 24)
TINY_NET = {"channels": [4, 8], "query_tokens": 2, "attention_heads": 2, "task_layers": 1, "patch_size": list(PATCH)}
TINY_RUN = {
    "net": TINY_NET, "episodes": {"max_classes": 2, "max_references": 2}, "cache": None, "episodes_per_step": 3,
    "device_synthetic_fraction": 1.0, "self_prediction_fraction": 0.5, "click_rounds": 2, "click_loss_weight": 4.0,
    "total_steps": 3, "warmup_steps": 1, "log_every": 1, "validate_every": 10, "checkpoint_every": 2, "threads": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw(count: int = 6, step: int = 0, seed: int = 0, **episode_options):
    from weakicl.training.device_episodes import DeviceEpisodes
    from weakicl.training.episodes import EpisodeConfig

    options = {"max_classes": 2, "max_references": 2} | episode_options
    return DeviceEpisodes(EpisodeConfig(**options), PATCH, 1.0, seed, "cpu").sample(step, count)


def test_episodes_are_network_inputs_of_consistent_shapes():
    from weakicl.prompts import PROMPT_CHANNELS
    from weakicl.training.episodes import MODES

    drawn = draw(mode_weights={"propagate": 1, "cross": 1, "atlas": 1, "correction": 1})
    batch = drawn.inputs
    images, rows, pairs = batch.images.shape[0], batch.target_index.shape[0], batch.ref_index.shape[0]
    assert batch.images.shape == (images, 1) + PATCH and batch.images.dtype == torch.float32
    assert batch.ref_prompts.shape == (pairs, len(PROMPT_CHANNELS)) + PATCH
    assert batch.target_prompts.shape == (rows, len(PROMPT_CHANNELS)) + PATCH and batch.masks.shape == (rows, 1) + PATCH
    assert batch.ref_index.dtype == batch.groups.dtype == batch.target_index.dtype == torch.long
    assert int(batch.ref_index.max()) < images and int(batch.target_index.max()) < images
    assert torch.bincount(batch.groups, minlength=rows).min() >= 1  # every class has a reference
    assert set(drawn.modes) <= set(MODES) and 0 < len(drawn.modes) <= 6
    assert (batch.masks.flatten(1).sum(1) > 0).all() and set(batch.masks.unique().tolist()) <= {0.0, 1.0}
    assert (batch.ref_prompts.flatten(1).amax(1) > 0).all()  # every reference is prompted
    assert torch.isfinite(batch.images).all() and abs(float(batch.images.mean())) < 0.1  # z-scored per image


def test_slice_boxes_lie_on_the_structure():
    from weakicl.prompts import PROMPT_CHANNELS

    batch = draw(mode_weights={"propagate": 1}, prompt_weights={"slice_boxes": 1}, box_jitter=0.0).inputs
    box, hull = PROMPT_CHANNELS.index("box"), PROMPT_CHANNELS.index("box_hull")
    for row in range(batch.target_index.shape[0]):
        mask = batch.masks[row, 0] > 0
        lo, hi = (torch.nonzero(mask).amin(0) - 1).clamp_min(0), torch.nonzero(mask).amax(0) + 1
        inside_box = torch.zeros_like(mask)
        inside_box[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True  # the bounding box, 1 voxel of slice thickness
        prompts = batch.target_prompts[row]
        assert prompts[box].any() and not (prompts[box] > 0)[~inside_box].any()
        assert prompts[hull].any() and not (prompts[hull] > 0)[~inside_box].any()
        assert torch.equal(batch.ref_prompts[batch.groups == row][0], prompts)  # propagation: the same prompts


def test_points_fall_inside_or_outside_the_structure():
    from weakicl.prompts import PROMPT_CHANNELS

    batch = draw(mode_weights={"propagate": 1}, prompt_weights={"points": 1}).inputs
    positive, negative = PROMPT_CHANNELS.index("positive"), PROMPT_CHANNELS.index("negative")
    centres_seen = 0
    for row in range(batch.target_index.shape[0]):
        mask = batch.masks[row, 0] > 0
        positives, negatives = batch.target_prompts[row, positive] == 1, batch.target_prompts[row, negative] == 1
        assert positives.any() and not positives[~mask].any() and not negatives[mask].any()
        centres_seen += int(negatives.sum())
    assert centres_seen > 0


def test_the_same_seed_and_step_give_the_same_episodes():
    options = {"mode_weights": {"propagate": 1, "cross": 1, "atlas": 1, "correction": 1}}
    first, again, other = draw(4, step=5, **options), draw(4, step=5, **options), draw(4, step=6, **options)
    assert first.modes == again.modes
    for name in ("images", "ref_index", "ref_prompts", "groups", "target_index", "target_prompts", "masks"):
        assert torch.equal(getattr(first.inputs, name), getattr(again.inputs, name)), name
    assert first.inputs.images.shape != other.inputs.images.shape or not torch.equal(first.inputs.images, other.inputs.images)


def test_look_alike_neighbours_render_other_images_on_the_device():
    plain, alike = draw(4, step=3), draw(4, step=3, similar_contrast_fraction=1.0)
    assert plain.modes == alike.modes  # drawn before the intensities
    assert not torch.equal(plain.inputs.images[0], alike.inputs.images[0])
    assert torch.isfinite(alike.inputs.images).all() and (alike.inputs.masks.flatten(1).sum(1) > 0).all()


def test_corrective_clicks_address_the_larger_error_first():
    from weakicl.prompts import MASK_CHANNEL, PROMPT_CHANNELS
    from weakicl.training.device_episodes import with_corrective_clicks

    truth = torch.zeros((1, 20, 20, 20), dtype=torch.bool)
    truth[0, 5:15, 5:15, 5:15] = True
    previous = truth.clone()
    previous[0, 5:15, 5:15, 5:8] = False  # a miss
    previous[0, 1:3, 1:3, 1:3] = True  # a small overshoot
    prompts = with_corrective_clicks(torch.zeros((1, 5, 20, 20, 20)), previous, truth, np.array([2]), radius_vox=2.0)
    positive, negative = (prompts[0, PROMPT_CHANNELS.index(name)] == 1 for name in ("positive", "negative"))
    assert torch.equal(prompts[0, MASK_CHANNEL] > 0, previous[0])
    assert positive.sum() == 1 and (truth[0] & ~previous[0])[positive].all()
    assert negative.sum() == 1 and (previous[0] & ~truth[0])[negative].all()


def test_click_rounds_on_the_device_put_each_later_click_on_the_networks_new_result():
    import contextlib

    from test_training import misses_then_overshoots

    from weakicl.prompts import MASK_CHANNEL, PROMPT_CHANNELS
    from weakicl.training.device_episodes import correct_own_predictions

    batch = draw(4, max_classes=1, max_clicks=1, mode_weights={"correction": 1.0}, prompt_weights={"slice_boxes": 1.0})
    rows = batch.correction_rows
    truth = batch.inputs.masks[rows, 0] > 0.5
    results = iter(misses_then_overshoots(truth.numpy()))
    passes = []

    def predict(part):
        passes.append(part.target_prompts.clone())
        return torch.where(torch.as_tensor(next(results))[:, None], 5.0, -5.0)

    correct_own_predictions(predict, batch, np.random.default_rng(0), 1.0, contextlib.nullcontext, rounds=2)
    missing, overshooting = misses_then_overshoots(truth.numpy())
    assert len(passes) == 2 and not passes[0][:, MASK_CHANNEL].any()  # the first pass sees no correction inputs
    prompts = batch.inputs.target_prompts[rows]
    assert torch.equal(prompts[:, MASK_CHANNEL] > 0.5, torch.as_tensor(overshooting))
    positive, negative = (prompts[:, PROMPT_CHANNELS.index(name)] == 1 for name in ("positive", "negative"))
    assert torch.equal(positive.flatten(1).sum(1), torch.ones(len(rows), dtype=torch.long))
    assert torch.as_tensor(truth.numpy() & ~missing)[positive].all()  # the first round's clicks, kept
    assert torch.equal(negative.flatten(1).sum(1), torch.ones(len(rows), dtype=torch.long))
    assert torch.as_tensor(overshooting & ~truth.numpy())[negative].all()  # the second, on the new result


def test_training_with_device_episodes_is_deterministic_and_resumes(tmp_path):
    from weakicl.cli import main
    from weakicl.weights import load_weights

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"episodes": TINY_RUN["episodes"] | {"mode_weights": {"propagate": 1, "cross": 1, "correction": 2}}}))
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--config", str(config), "--out", str(whole), "--device", "cpu"]) == 0
    assert main(["train", "--config", str(config), "--out", str(split), "--device", "cpu", "--steps", "2"]) == 0
    assert main(["train", "--config", str(config), "--out", str(split), "--device", "cpu", "--resume", str(split)]) == 0
    histories = [json.loads((run / "checkpoint" / "state.json").read_text())["state"]["history"] for run in (whole, split)]
    assert [entry["step"] for entry in histories[1]] == [1, 2, 3]
    for entry in histories[0]:  # where each step's time went, for reading a log's episodes/s
        assert set(entry["seconds_per_step"]) == {"waiting for CPU episodes", "CPU episodes' own predictions and upload",
                                                  "device episodes", "network step"}
        assert entry["seconds_per_step"]["network step"] > 0
    assert np.allclose([entry["loss"] for entry in histories[0]], [entry["loss"] for entry in histories[1]])
    model, card = load_weights(whole / "weakicl.safetensors")
    assert 0 < card["training"]["episodes"] <= 3 * 3  # a layout without a structure big enough drops its episode
    resumed, _ = load_weights(split / "weakicl.safetensors")
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_device_fraction_must_be_a_fraction(tmp_path):
    from weakicl.cli import main

    config = tmp_path / "bad.json"
    config.write_text(json.dumps(TINY_RUN | {"device_synthetic_fraction": 1.5}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2


def test_the_gpu_config_continues_the_shipped_network():
    from conftest import REPO
    from weakicl.network import NetConfig
    from weakicl.training.episodes import EpisodeConfig
    from weakicl.training.loop import TrainConfig

    config = TrainConfig.from_file(REPO / "configs" / "gpu_v03.json")
    shipped = TrainConfig.from_file(REPO / "configs" / "cpu.json")
    assert NetConfig(**config.net) == NetConfig(**shipped.net) and EpisodeConfig(**config.episodes).max_clicks >= 1
    assert 0.5 <= config.device_synthetic_fraction <= 1 and config.episodes_per_step >= 32


def test_gpu_script_runs_on_the_cpu(tmp_path):
    from conftest import REPO

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"total_steps": 2}))
    out = tmp_path / "out"
    environment = os.environ | {"CONFIG": str(config), "DEVICE": "cpu", "RESUME": "", "RUN": str(tmp_path / "run"),
                                "OUT": str(out), "BENCH_SECONDS": "0", "OMP_NUM_THREADS": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_train.sh"), "1"], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    throughput = json.loads((out / "throughput.json").read_text())
    assert throughput["steps"] == 2 and throughput["episodes"] == 6 and throughput["episodes_per_s"] > 0
    assert "CPU" in throughput["device"]
    for name in ("checkpoint/model.safetensors", "checkpoint/ema.safetensors", "checkpoint/state.json", "weakicl.safetensors",
                 "weakicl.json", "validation.json"):
        assert (out / name).is_file(), name


def test_gpu_session_script_packs_its_results_into_the_files_the_device_tool_brings_back(tmp_path):
    """The lent-GPU session (benchmark, then train) on the CPU with a tiny config; the benchmark is cut
    off by its timeout, and the rest must still come back: at most 8 files under OUT."""
    import tarfile

    from conftest import REPO

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RUN | {"total_steps": 2}))
    out = tmp_path / "out"
    environment = os.environ | {"CONFIG": str(config), "DEVICE": "cpu", "RESUME": "", "OUT": str(out), "BENCH_SECONDS": "0",
                                "BENCH_TIMEOUT": "1", "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
                                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh"), "1"], env=environment, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert files == ["checkpoint/ema.safetensors", "checkpoint/model.safetensors", "checkpoint/state.json", "results.tar.gz",
                     "weakicl.json", "weakicl.safetensors"]
    with tarfile.open(out / "results.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"results/throughput.json", "results/validation.json", "results/train.log", "results/engine.log"} <= names
