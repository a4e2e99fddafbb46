"""Model weights as safetensors plus a JSON model card; never unpickles anything.

The card sits beside the weights (`name.safetensors` -> `name.json`) and holds the architecture
(NetConfig), training facts, measured quality and the sha256 of the weights file, checked at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import atomic_path
from .errors import WeightsError

WEIGHTS_ENV = "WEAKICL_WEIGHTS"
SHIPPED_NAME = "weakicl-0.1.safetensors"
PACKAGED_FOLDER = "_weights"  # inside the installed package; filled by setup.py, never in git


def card_path(weights_path: str | os.PathLike) -> Path:
    return Path(weights_path).with_suffix(".json")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_folders() -> list[Path]:
    """Where shipped weights may sit, in lookup order: inside an installed wheel (`_weights`, copied
    there by setup.py at build time), then the checkout's or the Slicer extension's `model_weights/`."""
    package = Path(__file__).resolve().parent
    return [package / PACKAGED_FOLDER, package.parent.parent / "model_weights", package.parent / "model_weights"]


def default_weights_path() -> Path:
    """$WEAKICL_WEIGHTS, else the first of `weights_folders()` that holds the shipped weights."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    folders = weights_folders()
    for folder in folders:
        if (folder / SHIPPED_NAME).is_file():
            return folder / SHIPPED_NAME
    return folders[1] / SHIPPED_NAME


def save_weights(model, path: str | os.PathLike, card: dict) -> Path:
    """Write weights and card atomically; the card gains the architecture, parameter count and sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path, ".safetensors") as temporary:
        save_file(tensors, str(temporary))
    card = dict(card)
    card["architecture"] = model.config.to_dict()
    card["parameters"] = int(sum(t.numel() for t in model.parameters()))
    card["sha256"] = sha256_of(path)
    card_path(path).write_text(json.dumps(card, indent=2) + "\n")
    return path


def read_card(path: str | os.PathLike) -> dict:
    """The model card of the weights at `path`, as a dict holding the sha256 they are checked against:
    the card is the only record of it (`save_weights` writes it there), so a card without one is refused
    rather than loading weights nobody can check."""
    card_file = card_path(path)
    if not card_file.is_file():
        raise WeightsError(f"model card missing: {card_file} (it must sit beside the weights)")
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"model card {card_file.name} is not valid JSON: {error}") from None
    if not isinstance(card, dict):
        raise WeightsError(f"model card {card_file.name} is not a JSON object (it holds a {type(card).__name__})")
    if not isinstance(card.get("sha256"), str):
        raise WeightsError(f"model card {card_file.name} has no sha256, so {Path(path).name} cannot be checked; "
                           "use the card written with the weights")
    return card


def load_weights(path: str | os.PathLike | None = None, device: str = "cpu"):
    """(model, card) from safetensors weights whose sha256 matches the card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .network import NetConfig, WeakICLNet

    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise WeightsError(f"weights not found: {path} (set --weights or ${WEIGHTS_ENV})")
    if path.suffix.lower() == ".json":
        raise WeightsError(f"{path.name} is a model card: give the .safetensors weights file beside it")
    card = read_card(path)
    if card["sha256"] != sha256_of(path):
        raise WeightsError(f"{path.name} is corrupt or was replaced: its sha256 does not match the model card")
    try:
        config = NetConfig(**card["architecture"])
        model = WeakICLNet(config)
        state = load_file(str(path), device="cpu")
        expected = model.state_dict()
        misfit = [f"{name} {tuple(tensor.shape)} where the network has {tuple(expected[name].shape)}"
                  for name, tensor in state.items() if name in expected and expected[name].shape != tensor.shape]
        if misfit:
            raise WeightsError(f"{path.name} does not fit the network its card describes: {misfit[0]}"
                               + (f" (and {len(misfit) - 1} more tensors)" if len(misfit) > 1 else ""))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"model card of {path.name} does not describe a WeakICL network: {error}") from None
    except (SafetensorError, RuntimeError, OSError) as error:
        raise WeightsError(f"cannot load {path.name}: {str(error).splitlines()[0]}") from None
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise WeightsError(f"{path.name}: {len(broken)} of {len(state)} tensors hold NaN or infinite values ({broken[0]} first; a diverged "
                           "training run?); the network would give empty masks")
    return model.to(device).eval(), card
