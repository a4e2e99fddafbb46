"""In-context tuning (Iris' idea): task tokens that find their structure without prompts or a prior.

The task encoder summarises a reference in its prompts' frame; the decoder then reads the tokens next to
target prompts or a registered prior. A whole volume segmented without a registered context
(`Segmenter.segment(..., align_context=False)`, `weakicl segment --no-align`) has neither, and there the
tokens as encoded find little (hippocampus validation, another subject's 3 slice boxes: 0.574). Offsets of
the tokens are fitted by a few Adam steps so that the decoder, shown the reference image without any
prompt, labels what the reference's annotation says for sure: the centres of its slice boxes and clicks
foreground, just outside its boxes background (`adaptation.appearance_labels`), or every voxel of a dense
mask. Chosen on training tasks (20 tuning hippocampi from another subject's boxes, tokens alone: 0.581 ->
0.706). With the registered prior the tuned tokens changed nothing on those hippocampi (0.790 -> 0.788)
and lost across modalities (the abdominal CT <-> MR, 3 boxes 0.298 -> 0.239, dense 0.346 -> 0.251): the
tuned tokens take look-alikes far from the prior. So a prior keeps the tokens as encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .progress import ProgressCallback, silent

if TYPE_CHECKING:
    import torch

SEARCH_TUNING_STEPS = 40  # 20: 0.692, 60: 0.707 on the tuning hippocampi (at 2/3 of the rate below)
SEARCH_TUNING_RATE = 0.0075  # Adam's step as a share of the tokens' mean norm (0.02 for 10 steps: 0.637)
SEARCH_TUNING_MAX_SIDE = 64  # voxels a side of the crop tuned on, a coarser frame beyond (bounds a step's time)


@dataclass
class SearchReference:
    """What tuning needs of one reference, kept by its task until a whole volume without a prior asks
    for it: the normalised crop [k, j, i] (padded for the network), labels of the same shape (int8: 1
    structure, 0 background, -1 unknown), the reference's tokens as encoded [1, T, E] (CPU) and, once
    computed, their tuned version."""

    image: np.ndarray
    labels: np.ndarray
    tokens: "torch.Tensor"
    tuned: "torch.Tensor | None" = field(default=None, repr=False)


def search_tokens(model, reference: SearchReference, device, progress: ProgressCallback | None = None) -> "torch.Tensor":
    """The reference's tokens tuned to find its structure without prompts ([1, T, E] on the CPU; tuned
    once, then kept by the reference). The foreground and the background each weigh half of the loss (a
    few box centres face a band around the boxes many times their size). Without both kinds of label
    the tokens stay as encoded."""
    import torch
    import torch.nn.functional as F

    progress = progress or silent
    if reference.tuned is not None:
        return reference.tuned
    labels = torch.from_numpy(np.asarray(reference.labels, dtype=np.int8)[None, None]).to(device)
    foreground, background = labels == 1, labels == 0
    if not foreground.any() or not background.any() or SEARCH_TUNING_STEPS < 1:
        return reference.tokens
    weight = foreground.float() * (0.5 / foreground.sum()) + background.float() * (0.5 / background.sum())
    target = foreground.float()
    tokens = reference.tokens.to(device)
    image = torch.from_numpy(np.asarray(reference.image, dtype=np.float32)[None, None]).to(device)
    trainable = [parameter.requires_grad for parameter in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with torch.inference_mode():
            features = model.encode_image(image)
        features = [level.clone() for level in features]  # inference tensors cannot enter autograd
        offset = torch.zeros_like(tokens, requires_grad=True)
        optimiser = torch.optim.Adam([offset], lr=SEARCH_TUNING_RATE * float(tokens.norm(dim=-1).mean()))
        with torch.enable_grad():
            for step in range(SEARCH_TUNING_STEPS):
                progress(step / SEARCH_TUNING_STEPS, f"tuning the task to find the structure alone ({step + 1}/{SEARCH_TUNING_STEPS})")
                logits = model.decode(features, tokens + offset, None).float()
                loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    finally:
        for parameter, flag in zip(model.parameters(), trainable):
            parameter.requires_grad_(flag)
    progress(1.0, "task tuned")
    reference.tuned = (tokens + offset).detach().cpu()
    return reference.tuned
