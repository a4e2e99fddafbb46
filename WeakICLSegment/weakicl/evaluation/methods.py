"""The methods an evaluation can compare: the network (through the public Segmenter API) and the
model-free baselines, built by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..prompts import Point, PromptSet
from . import METHOD_NAMES
from .baselines import BASELINES
from .protocols import Method, Trial

MODEL = "model"


class ModelMethod(Method):
    """The network exactly as a user drives it: encode the context, segment the target, and for
    corrections segment again with the boxes plus the clicks so far and the previous mask."""

    name = MODEL

    def __init__(self, segmenter, weights: Path) -> None:
        self.segmenter = segmenter
        self.weights = weights

    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        task = self.segmenter.encode_context(trial.context, trial.structure.name)  # cached: encoded once per trial
        prompts = (trial.prompts or PromptSet()) + PromptSet(points=list(clicks))
        prediction = self.segmenter.segment(trial.volume, task, None if prompts.is_empty() else prompts, previous)
        return prediction.masks[0]

    def describe(self) -> dict:
        from ..weights import sha256_of

        return {"weights": str(self.weights), "weights_sha256": sha256_of(self.weights),
                "model_card": self.segmenter.card,
                "device": self.segmenter.device_name}


def build_methods(names: list[str], weights: str | None, device: str) -> list[Method]:
    """Methods in the order asked; InputError for unknown names. Loads the network only if asked for."""
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHOD_NAMES)})")
    methods: list[Method] = []
    for name in dict.fromkeys(names):
        if name == MODEL:
            from ..session import Segmenter
            from ..weights import default_weights_path

            path = Path(weights) if weights else default_weights_path()
            methods.append(ModelMethod(Segmenter(path, device), path))
        else:
            methods.append(BASELINES[name]())
    return methods
