"""The training loop behind `weakicl train --config CONFIG --out DIR [--minutes N] [--resume CKPT]`.

Each step draws `episodes_per_step` episodes (synthetic and cached real tasks, see `episodes`), runs the
references and targets through the network in one flattened batch, and minimises Dice + BCE with AdamW
(linear warm-up, cosine decay). The data of step s depends only on (seed, s), so a resumed run continues
exactly where it stopped. Weights of an exponential moving average (EMA) are validated and released.

Output folder: `checkpoint/` (model, EMA and optimizer state, `state.json`), `validation.json`,
`curves.png`, and the final EMA weights with their model card (`weakicl.weights.save_weights`).
Torch is imported inside functions so that building the command line stays light.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from .flat_batch import FlatBatch

CHECKPOINT = "checkpoint"
WEIGHTS_NAME = "weakicl.safetensors"
DATA_SOURCES = {
    "synthetic": {"name": "procedural synthetic label maps and images (weakicl.training.synthetic)", "licence": "none needed (generated)"},
    "msd_hippocampus": {
        "name": "Medical Segmentation Decathlon, Task04 Hippocampus (MR, manual labels)",
        "licence": "CC-BY-SA 4.0",
        "attribution": "Antonelli et al., The Medical Segmentation Decathlon, Nature Communications 13, 4128 (2022); "
                       "Simpson et al., arXiv:1902.09063 (2019). Data from http://medicaldecathlon.com under CC-BY-SA 4.0, "
                       "preprocessed (resampled, normalised, cropped) for training.",
    },
    "totalsegmentator_examples": {"name": "TotalSegmentator test reference files (CT, automatic labels)", "licence": "Apache-2.0",
                                  "attribution": "Wasserthal et al., Radiology: Artificial Intelligence 5(5) (2023)."},
    "brain_t1_aseg": {"name": "VoxelMorph test scan with FreeSurfer aseg labels (MR, automatic labels)", "licence": "Apache-2.0"},
    "mni152_2009a": {"name": "MNI ICBM152 2009a template with thresholded tissue maps, as shipped by nilearn",
                     "licence": "permissive (MNI), copyright notice kept",
                     "attribution": "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
                                    "Montreal Neurological Institute, McGill University."},
}
LICENCE_NOTE = ("Trained in part on CC-BY-SA 4.0 data (MSD hippocampus): the attribution above travels with these weights; "
                "where the weights count as an adaptation of that data, they are shared under CC-BY-SA 4.0.")


@dataclass
class TrainConfig:
    """A training run; loaded from JSON (`configs/*.json`). Unknown keys are an error."""

    net: dict = field(default_factory=dict)
    episodes: dict = field(default_factory=dict)
    cache: str | None = None
    collection_weights: dict = field(default_factory=dict)
    seed: int = 0
    episodes_per_step: int = 2
    total_steps: int = 10000
    lr: float = 3e-4
    min_lr_fraction: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    click_loss_weight: float = 0.0  # extra BCE weight within the target's point prompts (clicks must count)
    self_prediction_fraction: float = 0.3
    # network passes over its own corrections in those episodes: after the first pass's clicks, each later
    # round predicts again with the clicks so far and adds one protocol click on that result (the
    # evaluation's loop), so the network learns from what its own corrections leave wrong
    click_rounds: int = 1
    validation_cases: int = 4
    validate_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 10
    workers: int = 0
    threads: int = 2
    device_synthetic_fraction: float = 0.0  # share of each step's episodes drawn on the training device (device_episodes)
    far_negative_weight: float = 0.0  # extra BCE weight on background farther than far_negative_voxels from the structure
    far_negative_voxels: int = 3  # (stray components far from the structure cost HD95 more than a rough border)
    anneal_within_minutes: bool = False  # one-shot runs (a lent GPU): warm up from the resumed step, decay by the clock to --minutes

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"training config not found: {path}")
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(f"{path.name} is not valid JSON: {error}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(document) - known - {"description"})
        if unknown:
            raise InputError(f"{path.name}: unknown training option(s) {', '.join(unknown)}")
        config = cls(**{key: value for key, value in document.items() if key in known})
        if not isinstance(config.click_rounds, int) or config.click_rounds < 1:
            raise InputError(f"{path.name}: click_rounds must be a whole number of at least 1, not {config.click_rounds!r}")
        return config


@dataclass
class TrainState:
    """Counters and curves that survive a resume (plain JSON)."""

    step: int = 0
    episodes: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)


class StepEpisodes:
    """Map-style dataset: item s is the list of episodes of training step s (a pure function of seed and s)."""

    def __init__(self, sampler, seed: int, per_step: int) -> None:
        self.sampler, self.seed, self.per_step = sampler, seed, per_step

    def __getitem__(self, step: int) -> PackedEpisodes:
        rng = np.random.default_rng([self.seed, int(step)])
        return pack_episodes([self.sampler.sample(rng) for _ in range(self.per_step)])


@dataclass
class PackedEpisodes:
    """A step's episodes for the trip from a DataLoader worker: their arrays in one torch tensor per dtype
    (torch hands tensors over in shared memory, while numpy arrays are pickled: 143 MB and about 0.7 s of
    pickling a step of 48 real episodes), the episodes themselves with their arrays taken out."""

    tensors: dict
    layout: list  # per episode: (field, dtype, offset, shape) of each array
    episodes: list


def pack_episodes(episodes: list) -> PackedEpisodes:
    import torch

    blocks, layout, bare = {}, [], []
    for episode in episodes:
        arrays = {name: value for name, value in vars(episode).items() if isinstance(value, np.ndarray)}
        placed = []
        for name, array in arrays.items():
            parts = blocks.setdefault(array.dtype.str, [])
            placed.append((name, array.dtype.str, sum(part.size for part in parts), array.shape))
            parts.append(np.ascontiguousarray(array).ravel())
        layout.append(placed)
        bare.append(replace(episode, **{name: None for name in arrays}))
    tensors = {dtype: torch.from_numpy(np.concatenate(parts)) for dtype, parts in blocks.items()}
    return PackedEpisodes(tensors, layout, bare)


def unpack_episodes(packed: PackedEpisodes) -> list:
    """The episodes of `pack_episodes`, their arrays views of the shared tensors."""
    flat = {dtype: tensor.numpy() for dtype, tensor in packed.tensors.items()}
    return [replace(episode, **{name: flat[dtype][offset:offset + math.prod(shape)].reshape(shape)
                                for name, dtype, offset, shape in placed})
            for episode, placed in zip(packed.episodes, packed.layout)]


def _unbatched(item):
    return item


def learning_rate(config: TrainConfig, step: int, time_fraction: float | None = None, first_step: int = 0) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_fraction * lr` at `total_steps`. A one-shot run
    (`anneal_within_minutes`) passes `time_fraction`, the share of its minutes spent: it warms up over its
    own first `warmup_steps` from `first_step` and decays with the clock instead."""
    warm = step - first_step if time_fraction is not None else step
    if warm < config.warmup_steps:
        return config.lr * (warm + 1) / config.warmup_steps
    if time_fraction is None:
        time_fraction = (step - config.warmup_steps) / max(config.total_steps - config.warmup_steps, 1)
    progress = min(max(time_fraction, 0.0), 1.0)
    floor = config.min_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def flatten_episodes(episodes: list, device: str) -> FlatBatch:
    """Numpy episodes as one FlatBatch on `device`; propagation reuses the target image as its reference."""
    import torch

    images, ref_index, ref_prompts, groups, target_index, target_prompts, masks = [], [], [], [], [], [], []
    for episode in episodes:
        offset = sum(len(block) for block in images)
        for index in range(episode.classes):
            ref_index += [offset + reference for reference in episode.references]
            groups += [len(target_index)] * len(episode.references)
            target_index.append(offset)
        images.append(episode.images)
        ref_prompts.append(episode.ref_prompts.reshape((-1,) + episode.ref_prompts.shape[2:]))
        target_prompts.append(episode.target_prompts)
        masks.append(episode.masks)

    def tensor(blocks: list[np.ndarray]):
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)).to(device)

    def indices(values: list[int]):
        return torch.tensor(values, dtype=torch.long, device=device)

    return FlatBatch(tensor(images)[:, None], indices(ref_index), tensor(ref_prompts), indices(groups), indices(target_index),
                     tensor(target_prompts), tensor(masks)[:, None])


def batch_logits(model, batch: FlatBatch):
    """Logits [N,1,D,H,W] of every class row of `batch`.

    All distinct images are encoded once; each (class, reference) pair gives tokens, averaged per class
    over its references; each class is decoded on its target's features.
    """
    import torch

    features = model.encode_image(batch.images)
    tokens = model.encode_task([f[batch.ref_index] for f in features], batch.ref_prompts).float()
    rows = batch.target_index.shape[0]
    summed = tokens.new_zeros((rows,) + tokens.shape[1:]).index_add_(0, batch.groups, tokens)
    tokens = summed / torch.bincount(batch.groups, minlength=rows).float()[:, None, None]
    return model.decode([f[batch.target_index] for f in features], tokens, batch.target_prompts).float()


def episode_logits(model, episodes: list, device: str):
    """Logits [N,1,D,H,W] and targets for every class of every episode, in one flattened batch."""
    batch = flatten_episodes(episodes, device)
    return batch_logits(model, batch), batch.masks


def segmentation_loss(logits, targets, dice_weight: float, bce_weight: float, voxel_weights=None):
    """(Soft Dice + BCE loss, hard Dice per class) averaged over classes; `voxel_weights` (like
    `targets`) weight the BCE, e.g. more where the user clicked."""
    import torch
    import torch.nn.functional as F

    probabilities = torch.sigmoid(logits).flatten(1)
    truth = targets.flatten(1)
    soft = 1 - (2 * (probabilities * truth).sum(1) + 1) / (probabilities.sum(1) + truth.sum(1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, targets, weight=voxel_weights)
    with torch.no_grad():
        hard = (logits.flatten(1) > 0).float()
        dice = (2 * (hard * truth).sum(1) + 1e-6) / (hard.sum(1) + truth.sum(1) + 1e-6)
    return dice_weight * soft.mean() + bce_weight * bce, dice


def click_weights(episodes: list | FlatBatch, weight: float, device: str):
    """BCE weights [N,1,D,H,W]: 1 + `weight` inside the target's positive/negative point spheres, so a
    click's neighbourhood ends up on the click's side; None when `weight` is 0."""
    from .episodes import POINT_CHANNELS

    if not weight:
        return None
    batch = episodes if isinstance(episodes, FlatBatch) else flatten_episodes(episodes, device)
    return 1.0 + weight * batch.target_prompts[:, POINT_CHANNELS].amax(dim=1, keepdim=True)


def far_negative_weights(masks, weight: float, distance_voxels: int):
    """BCE weights [N,1,D,H,W]: 1 + `weight` on background more than `distance_voxels` (chessboard) from
    the structure, so stray components far away cost more than a rough border; None when `weight` is 0."""
    import torch.nn.functional as F

    if not weight:
        return None
    near = F.max_pool3d(masks.float(), 2 * distance_voxels + 1, stride=1, padding=distance_voxels)
    return 1.0 + weight * (1.0 - near)


def loss_weights(batch: FlatBatch, config: TrainConfig, device: str):
    """The BCE's voxel weights of a step: click and far-background weights multiplied (None: uniform)."""
    weights = None
    for part in (click_weights(batch, config.click_loss_weight, device),
                 far_negative_weights(batch.masks, config.far_negative_weight, config.far_negative_voxels)):
        if part is not None:
            weights = part if weights is None else weights * part
    return weights


def split_by_class(array: np.ndarray, episodes: list) -> list[np.ndarray]:
    bounds = np.cumsum([0] + [episode.classes for episode in episodes])
    return [array[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def use_own_predictions(model, episodes: list, rng: np.random.Generator, fraction: float, episode_config, device: str, autocast,
                        rounds: int = 1) -> None:
    """Replace the corrupted-truth previous mask of some correction episodes by the model's own prediction,
    with clicks on it; then `rounds` - 1 times predict again with those clicks and add one on the new result."""
    import torch

    from .episodes import with_corrections, with_next_click

    chosen = [e for e in episodes if e.mode == "correction" and rng.random() < fraction]
    if not chosen:
        return
    for episode in chosen:
        episode.target_prompts = episode.base_prompts
    for round_ in range(rounds):
        with torch.no_grad(), autocast():
            logits, _ = episode_logits(model, chosen, device)
        for episode, block in zip(chosen, split_by_class(logits[:, 0].cpu().numpy() > 0, chosen)):
            if round_ == 0:
                with_corrections(episode, block, rng, episode_config)
            else:
                with_next_click(episode, block, episode_config)


class StepPhases:
    """Mean seconds per step of each part of a training step since the last log line, so a log says what
    bounds the episodes/s (on CUDA each lap waits for the device's queued work first)."""

    def __init__(self, device: str) -> None:
        self.synchronize = _cuda_synchronize if device == "cuda" else (lambda: None)
        self.last, self.totals, self.steps = time.monotonic(), {}, 0

    def lap(self, name: str | None) -> None:
        """Charge the time since the previous lap to `name` (None: to nothing)."""
        self.synchronize()
        now = time.monotonic()
        if name is not None:
            self.totals[name] = self.totals.get(name, 0.0) + now - self.last
            self.steps += name == "network step"
        self.last = now

    def means(self) -> dict[str, float]:
        """Seconds per step of each part since the previous call; starts a new window."""
        means = {name: round(total / max(self.steps, 1), 4) for name, total in self.totals.items()}
        self.totals, self.steps = {}, 0
        return means


def _cuda_synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def update_ema(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for averaged, current in zip(ema.state_dict().values(), model.state_dict().values()):
            if averaged.is_floating_point():
                averaged.lerp_(current, 1 - decay)
            else:
                averaged.copy_(current)


def validate(model, cases: list, device: str, autocast) -> dict:
    """Dice of propagation from 3 axial boxes (the evaluation's protocol) on each structure of `cases`."""
    import torch

    from ..evaluation.metrics import dice
    from ..preprocess import pad_to_multiple
    from .episodes import propagation_episode

    scores = {}
    for case in cases:
        image, recover = pad_to_multiple(case.image, model.config.downsampling, model.config.patch_size)
        labels, _ = pad_to_multiple(case.labels, model.config.downsampling, model.config.patch_size, mode="constant")
        for value in sorted(case.structures):
            episode = propagation_episode(image, labels, value, case.spacing_ijk, case.id)
            with torch.no_grad(), autocast():
                logits, _ = episode_logits(model, [episode], device)
            prediction = (logits[0, 0].cpu().numpy() > 0)[recover]
            scores[f"{case.id}/{value}"] = dice(prediction, episode.masks[0][recover])
    return {"dice": float(np.mean(list(scores.values()))) if scores else None, "structures": scores}


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path, path.suffix) as temporary:
        write(temporary)


def save_checkpoint(folder: Path, model, ema, optimizer, state: TrainState, config: TrainConfig) -> None:
    """Weights as safetensors, optimizer moments with torch.save (tensors only), counters as JSON (written last)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("model", model), ("ema", ema)):
        tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
        _write_atomic(folder / f"{name}.safetensors", lambda path, tensors=tensors: save_file(tensors, str(path)))
    _write_atomic(folder / "optimizer.pt", lambda path: torch.save(optimizer.state_dict(), path))
    document = {"state": asdict(state), "config": asdict(config)}
    _write_atomic(folder / "state.json", lambda path: path.write_text(json.dumps(document, indent=1) + "\n"))


def _architecture(net: dict) -> dict:
    """The parts of a network configuration that shape its parameters (`extra` holds inference settings
    such as the framing, which a continued run may change)."""
    return {key: value for key, value in net.items() if key != "extra"}


def checkpoint_folder(folder: Path) -> Path:
    """The checkpoint in `folder`: the folder itself, or a run's output folder's CHECKPOINT."""
    return folder / CHECKPOINT if (folder / CHECKPOINT / "state.json").is_file() else folder


def load_checkpoint(folder: Path, model, ema, optimizer, config: TrainConfig) -> TrainState:
    import torch
    from safetensors.torch import load_file

    folder = checkpoint_folder(folder)
    if not (folder / "state.json").is_file():
        raise InputError(f"no checkpoint to resume in {folder} (expected state.json)")
    document = json.loads((folder / "state.json").read_text())
    if _architecture(document["config"]["net"]) != _architecture(config.net):
        raise InputError("the checkpoint was trained with another network configuration than --config gives")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
    if (folder / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    else:  # the shipped checkpoint (model_weights/checkpoint) carries no optimizer moments
        print(f"{folder}: no optimizer.pt, AdamW moments start afresh", file=sys.stderr)
    return TrainState(**document["state"])


def plot_curves(path: Path, state: TrainState) -> bool:
    """Loss, training Dice and validation Dice against the step; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [entry["step"] for entry in state.history]
    left.plot(steps, [entry["loss"] for entry in state.history])
    left.set(xlabel="step", ylabel="Dice + BCE loss", title="training loss")
    right.plot(steps, [entry["dice"] for entry in state.history], label="training episodes")
    checked = [entry for entry in state.validation if entry["dice"] is not None]
    right.plot([e["step"] for e in checked], [e["dice"] for e in checked], "o-", label="validation (propagate, 3 boxes)")
    right.set(xlabel="step", ylabel="Dice", ylim=(0, 1), title="Dice")
    right.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def hardware(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_name() -> str:
    """The processor's model name where the system tells it (Linux), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def model_card(config: TrainConfig, state: TrainState, collections: list[str], device: str) -> dict:
    """What `save_weights` stores beside the weights (it adds architecture, parameter count and sha256)."""
    from .. import __version__

    sources = [DATA_SOURCES.get(name, {"name": name, "licence": "see the manifest's sources"}) | {"collection": name} for name in collections]
    last = state.validation[-1] if state.validation else {}
    return {
        "name": "WeakICLSegment WS-ICL network",
        "version": __version__,
        "weights": "exponential moving average of the training weights",
        "training": {
            "steps": state.step, "episodes": state.episodes, "wall_time_s": round(state.seconds, 1),
            "hardware": hardware(device), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": asdict(config),
        },
        "data": sources,
        "data_rules": "the manifest's unseen_labels are erased from the training labels and never a task; "
                      "validation-split cases are used only for validation",
        "licence_note": LICENCE_NOTE if "msd_hippocampus" in collections else "",
        "validation": {"protocol": "propagate from 3 axial boxes, MSD hippocampus validation split",
                       "step": last.get("step"), "dice": last.get("dice")},
    }


def training_collections(config: TrainConfig) -> list[str]:
    """What a run trains on, for its model card: synthetic tasks and the collections of its cache's training split."""
    from .data import read_index

    if not config.cache:
        return ["synthetic"]
    return ["synthetic"] + sorted({entry["collection"] for entry in read_index(config.cache)["cases"] if entry["split"] == "train"})


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """The EMA weights of a checkpoint (or a run's output folder) as weights and model card at `out`, so a run
    can be judged at any checkpointed step (it writes its own weights only at its end). The checkpoint does
    not record the hardware, so the card says so."""
    from safetensors.torch import load_file

    from ..network import NetConfig, WeakICLNet
    from ..weights import save_weights

    checkpoint = checkpoint_folder(checkpoint)
    if not (checkpoint / "state.json").is_file() or not (checkpoint / "ema.safetensors").is_file():
        raise InputError(f"no checkpoint in {checkpoint} (expected state.json and ema.safetensors)")
    document = json.loads((checkpoint / "state.json").read_text())
    config, state = TrainConfig(**document["config"]), TrainState(**document["state"])
    model = WeakICLNet(NetConfig(**config.net))
    model.load_state_dict(load_file(str(checkpoint / "ema.safetensors")))
    collections = training_collections(config) if not config.cache or Path(config.cache).is_dir() else ["synthetic", "see training.config.cache"]
    card = model_card(config, state, collections, "cpu")
    card["training"]["hardware"] = "not recorded in the checkpoint"
    card["weights"] += f", exported from the checkpoint of step {state.step}"
    return save_weights(model, out, card)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training configuration JSON (see configs/)")
    parser.add_argument("--out", help="output folder: checkpoints, curves, validation log, final weights")
    parser.add_argument("--minutes", type=float, help="stop (checkpoint and write weights) after this many minutes")
    parser.add_argument("--steps", type=int, help="override total_steps of the config (the length of the LR schedule)")
    parser.add_argument("--resume", help="checkpoint folder (or output folder) to continue from")
    parser.add_argument("--cache", help="preprocessed real-data cache (default: the config's `cache`)")
    parser.add_argument("--prepare", action="store_true", help="preprocess --manifest into --cache first")
    parser.add_argument("--manifest", help="data manifest.json for --prepare")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (CUDA when available)")


def run_train(args: argparse.Namespace) -> int:
    """Entry point of `weakicl train`; returns the exit code."""
    from .data import prepare_cache

    if args.prepare:
        if not args.manifest or not args.cache:
            raise InputError("--prepare needs --manifest and --cache")
        prepare_cache(args.manifest, args.cache)
        if not args.config:
            return 0
    if not args.config or not args.out:
        raise InputError("training needs --config and --out")
    config = TrainConfig.from_file(args.config)
    if args.steps is not None:
        config.total_steps = args.steps
    if args.cache:
        config.cache = args.cache
    train(config, Path(args.out), args.minutes, Path(args.resume) if args.resume else None, args.device)
    return 0


def train(config: TrainConfig, out: Path, minutes: float | None = None, resume: Path | None = None, device: str = "auto") -> TrainState:
    """Train until `total_steps` or `minutes`; checkpoint, validate, plot, and write the final EMA weights."""
    import contextlib
    import copy

    import torch

    from ..network import NetConfig, WeakICLNet
    from ..devices import resolve_device
    from ..weights import save_weights
    from .data import CachedSubjects, load_cases
    from .device_episodes import DeviceEpisodes, correct_own_predictions
    from .episodes import EpisodeConfig, EpisodeSampler

    started = time.monotonic()
    device = resolve_device(device)
    if device == "cpu":
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    try:
        net_config, episode_config = NetConfig(**config.net), EpisodeConfig(**config.episodes)
    except (TypeError, ValueError) as error:
        raise InputError(f"invalid training config: {error}") from None
    if not 0.0 <= config.device_synthetic_fraction <= 1.0:
        raise InputError("invalid training config: device_synthetic_fraction must lie in [0, 1]")
    real, validation_cases, collections = None, [], training_collections(config)
    if config.cache:
        real = CachedSubjects(load_cases(config.cache, "train"), net_config.patch_size, config.collection_weights,
                              episode_config.fit_fraction, episode_config.frame_fill)
        validation_cases = load_cases(config.cache, "validation", limit=config.validation_cases)
    sampler = EpisodeSampler(episode_config, net_config.patch_size, net_config.working_spacing_mm, config.seed, real)
    on_device = round(config.episodes_per_step * config.device_synthetic_fraction)
    device_episodes = DeviceEpisodes(episode_config, net_config.patch_size, net_config.working_spacing_mm, config.seed, device) if on_device else None

    model = WeakICLNet(net_config).to(device)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = load_checkpoint(resume, model, ema, optimizer, config) if resume else TrainState()

    def autocast():
        return torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    out.mkdir(parents=True, exist_ok=True)
    deadline = started + minutes * 60 if minutes else math.inf
    loader = torch.utils.data.DataLoader(
        StepEpisodes(sampler, config.seed, config.episodes_per_step - on_device), batch_size=None,
        sampler=range(state.step, config.total_steps), num_workers=config.workers, collate_fn=_unbatched)
    print(f"training on {hardware(device)}: step {state.step} -> {config.total_steps}"
          f"{f', at most {minutes:g} min' if minutes else ''}; real data: {config.cache or 'none (synthetic only)'}", flush=True)
    model.train()
    window, window_start, window_episodes = [], time.monotonic(), 0
    session_start_seconds, first_step = state.seconds, state.step
    phases = StepPhases(device)

    def checkpoint() -> None:
        state.seconds = session_start_seconds + time.monotonic() - started
        save_checkpoint(out / CHECKPOINT, model, ema, optimizer, state, config)
        (out / "validation.json").write_text(json.dumps(state.validation, indent=1) + "\n")
        plot_curves(out / "curves.png", state)

    for packed in loader:
        episodes = unpack_episodes(packed)
        phases.lap("waiting for CPU episodes")
        use_own_predictions(model, episodes, np.random.default_rng([config.seed, state.step, 1]),
                            config.self_prediction_fraction, episode_config, device, autocast, config.click_rounds)
        batch, count = (flatten_episodes(episodes, device) if episodes else None), len(episodes)
        phases.lap("CPU episodes' own predictions and upload")
        if device_episodes is not None:
            drawn = device_episodes.sample(state.step, on_device)
            correct_own_predictions(lambda part: batch_logits(model, part), drawn, np.random.default_rng([config.seed, state.step, 3]),
                                    config.self_prediction_fraction, autocast, config.click_rounds)
            batch = drawn.inputs if batch is None else batch.joined(drawn.inputs)
            count += len(drawn.modes)
            phases.lap("device episodes")
        time_fraction = (time.monotonic() - started) / (minutes * 60) if minutes and config.anneal_within_minutes else None
        rate_now = learning_rate(config, state.step, time_fraction, first_step)
        for group in optimizer.param_groups:
            group["lr"] = rate_now
        with autocast():
            logits = batch_logits(model, batch)
            loss, dice = segmentation_loss(logits, batch.masks, config.dice_weight, config.bce_weight, loss_weights(batch, config, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        update_ema(ema, model, min(config.ema_decay, (1 + state.step) / (10 + state.step)))
        state.step += 1
        state.episodes += count
        window.append((loss.item(), dice.mean().item()))
        window_episodes += count
        phases.lap("network step")
        if state.step % config.log_every == 0 or state.step == config.total_steps:
            rate = window_episodes / max(time.monotonic() - window_start, 1e-9)
            entry = {"step": state.step, "loss": float(np.mean([w[0] for w in window])), "dice": float(np.mean([w[1] for w in window])),
                     "lr": rate_now, "episodes_per_s": rate, "seconds_per_step": phases.means()}
            state.history.append(entry)
            print(f"step {state.step}: loss {entry['loss']:.4f}, dice {entry['dice']:.3f}, lr {entry['lr']:.2e}, {rate:.2f} episodes/s; "
                  + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in entry["seconds_per_step"].items()), flush=True)
            window, window_start, window_episodes = [], time.monotonic(), 0
        if validation_cases and state.step % config.validate_every == 0:
            state.validation.append({"step": state.step} | validate(ema, validation_cases, device, autocast))
            print(f"step {state.step}: validation Dice {state.validation[-1]['dice']:.3f}", flush=True)
        if state.step % config.checkpoint_every == 0:
            checkpoint()
        phases.lap(None)  # validation and checkpoints are not part of a step
        if time.monotonic() >= deadline or state.step >= config.total_steps:
            break
    if validation_cases and (not state.validation or state.validation[-1]["step"] != state.step):
        state.validation.append({"step": state.step} | validate(ema, validation_cases, device, autocast))
        print(f"step {state.step}: validation Dice {state.validation[-1]['dice']:.3f}", flush=True)
    checkpoint()
    weights = save_weights(ema.cpu(), out / WEIGHTS_NAME, model_card(config, state, collections, device))
    print(f"wrote {weights} after {state.step} steps ({state.episodes} episodes, {state.seconds / 60:.1f} min in all)", flush=True)
    return state
