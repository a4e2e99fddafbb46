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

MODEL, UNALIGNED, NETWORK_ONLY = "model", "model-unaligned", "model-network-only"


class ModelMethod(Method):
    """The network exactly as a user drives it: encode the context, segment the target, and for
    corrections segment again with the boxes plus the clicks so far, the previous mask, and the
    newest click marked as new (only its neighbourhood is recomputed).
    `align_context=False` is the ablation without the atlas prior (task tokens alone), `network_only=True`
    the network's output alone (clicks not seeded, no appearance probe, no geodesic competition)."""

    def __init__(self, segmenter, weights: Path, name: str = MODEL) -> None:
        self.segmenter = segmenter
        self.weights = weights
        self.align_context = name != UNALIGNED
        self.network_only = name == NETWORK_ONLY
        self.name = name

    def segment(self, trial: Trial, clicks: list[Point], previous: np.ndarray | None) -> np.ndarray:
        task = self.segmenter.encode_context(trial.context, trial.structure.name)  # cached: encoded once per trial
        prompts = (trial.prompts or PromptSet()) + PromptSet(points=list(clicks))
        new = PromptSet(points=list(clicks[-1:])) if clicks and previous is not None else None
        prediction = self.segmenter.segment(trial.volume, task, None if prompts.is_empty() else prompts, previous,
                                            new_prompts=new, align_context=self.align_context,
                                            network_only=self.network_only)
        return prediction.masks[0]

    def describe(self) -> dict:
        from ..weights import sha256_of

        return {"weights": str(self.weights), "weights_sha256": sha256_of(self.weights),
                "model_card": self.segmenter.card, "align_context": self.align_context, "network_only": self.network_only,
                "device": self.segmenter.device_name}


def build_methods(names: list[str], weights: str | None, device: str) -> list[Method]:
    """Methods in the order asked; InputError for unknown names. Loads the network only if asked for."""
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHOD_NAMES)})")
    methods: list[Method] = []
    segmenter = None
    for name in dict.fromkeys(names):
        if name in (MODEL, UNALIGNED, NETWORK_ONLY):
            from ..session import Segmenter
            from ..weights import default_weights_path

            path = Path(weights) if weights else default_weights_path()
            segmenter = segmenter or Segmenter(path, device)  # one network and its caches for both variants
            methods.append(ModelMethod(segmenter, path, name))
        else:
            methods.append(BASELINES[name]())
    return methods
