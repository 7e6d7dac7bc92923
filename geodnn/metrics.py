"""Segmentation metrics from a confusion matrix: IoU per class, F1 per class, pixel accuracy.

Pixel accuracy is reported but is nearly useless here (positives are 2-3 % of pixels); the IoU of
the positive class is the figure that matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts, rows = truth, columns = prediction; ignored pixels skipped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target != IGNORE_INDEX) & (target >= 0) & (target < classes)
    index = target[keep] * classes + pred[keep]
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


@dataclass
class SegmentationScores:
    """Scores derived from one confusion matrix."""

    confusion: torch.Tensor

    @property
    def iou(self) -> list[float]:
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        return [float(v) for v in torch.where(union > 0, tp / union.clamp(min=1), 0.0)]

    @property
    def f1(self) -> list[float]:
        c = self.confusion.double()
        tp = c.diag()
        denom = c.sum(0) + c.sum(1)
        return [float(v) for v in torch.where(denom > 0, 2 * tp / denom.clamp(min=1), 0.0)]

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.confusion.diag().sum() / total) if total > 0 else 0.0

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.iou))]
        return {
            "iou": dict(zip(names, self.iou)),
            "f1": dict(zip(names, self.f1)),
            "pixel_accuracy": self.pixel_accuracy,
            "mean_iou": sum(self.iou) / len(self.iou),
            "pixels": self.pixels,
        }


def scores(pred: torch.Tensor, target: torch.Tensor, classes: int) -> SegmentationScores:
    return SegmentationScores(confusion_matrix(pred, target, classes))
