"""The network inputs of a training step, flattened: where episodes drawn on the CPU (`loop`) and on
the training device (`device_episodes`) meet, so one network pass serves both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class FlatBatch:
    """The network inputs of a step's episodes, flattened: every distinct image once, one row per class.

    `ref_index`/`groups` give each (class, reference) pair its image and its class row; `target_index`
    gives each class row its target image. Episodes drawn on the CPU (`flatten_episodes`) and on the
    device (`device_episodes`) meet here, so one network pass serves both.
    """

    images: Any  # [M, 1, D, H, W]
    ref_index: Any  # [P] long
    ref_prompts: Any  # [P, 5, D, H, W]
    groups: Any  # [P] long: the class row of each pair
    target_index: Any  # [N] long
    target_prompts: Any  # [N, 5, D, H, W]
    masks: Any  # [N, 1, D, H, W] float

    def joined(self, other: FlatBatch) -> FlatBatch:
        """Both batches in one (indices of `other` shifted past this one's images and rows)."""
        import torch

        images, rows = self.images.shape[0], self.target_index.shape[0]
        return FlatBatch(torch.cat([self.images, other.images]), torch.cat([self.ref_index, other.ref_index + images]),
                         torch.cat([self.ref_prompts, other.ref_prompts]), torch.cat([self.groups, other.groups + rows]),
                         torch.cat([self.target_index, other.target_index + images]),
                         torch.cat([self.target_prompts, other.target_prompts]), torch.cat([self.masks, other.masks]))

    def select(self, rows) -> FlatBatch:
        """The class rows `rows` (long tensor) alone, with only the images they use."""
        import torch

        pairs = torch.isin(self.groups, rows)
        row_map = torch.full((self.target_index.shape[0],), -1, dtype=torch.long, device=rows.device)
        row_map[rows] = torch.arange(rows.shape[0], device=rows.device)
        used = torch.unique(torch.cat([self.target_index[rows], self.ref_index[pairs]]))
        image_map = torch.full((self.images.shape[0],), -1, dtype=torch.long, device=rows.device)
        image_map[used] = torch.arange(used.shape[0], device=rows.device)
        return FlatBatch(self.images[used], image_map[self.ref_index[pairs]], self.ref_prompts[pairs], row_map[self.groups[pairs]],
                         image_map[self.target_index[rows]], self.target_prompts[rows], self.masks[rows])
