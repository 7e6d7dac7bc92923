"""What solvers train on: indexable batches of image crops and label crops.

`geodnn` never reads rasters; `pipelines` adapts the tile store to this protocol.
Images are float32 (B, bands, h, w) with NaN for nodata; labels are int64 (B, h, w) with
`IGNORE_INDEX` (255) for unlabeled or nodata pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from .metrics import IGNORE_INDEX


class Batches(Protocol):
    """A finite, indexable set of (image crop, label crop) pairs of one size."""

    def __len__(self) -> int: ...

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]: ...


class TensorBatches:
    """In-memory crops, for tests, notebooks and benchmarks."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError("images must be (N, bands, h, w) and labels (N, h, w)")
        self.images = images.float()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return self.images[index], self.labels[index]


def class_weights(labels: torch.Tensor, classes: int, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency class weights (softened by `power`), normalized to mean 1."""
    valid = labels[(labels != IGNORE_INDEX) & (labels >= 0)]
    return weights_from_counts(torch.bincount(valid.reshape(-1), minlength=classes), power)


def weights_from_counts(counts, power: float = 0.5, max_ratio: float = math.inf) -> torch.Tensor:
    """Class weights (total / count) ** power from labeled-pixel counts, capped at `max_ratio`
    x the smallest, normalized to mean 1 over the classes present. A class without training
    pixels gets 0: it has no pixel to weigh, and a huge weight for it would shrink every other
    class's weight in the normalization. The cap keeps a class of a few pixels from making
    every other class's weight negligible."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = (counts.sum() / counts[present]) ** power
    if not present.any():
        return weights.float() + 1
    weights[present] = weights[present].clamp(max=max_ratio * weights[present].min())
    return (weights / weights[present].mean()).float()
