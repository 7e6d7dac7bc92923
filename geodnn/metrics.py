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
    def seen(self) -> list[bool]:
        """Per class: present in the truth or the prediction (else it has no IoU or F1)."""
        c = self.confusion
        return ((c.sum(0) + c.sum(1)) > 0).tolist()

    @property
    def mean_iou(self) -> float:
        """Mean IoU over the classes present in truth or prediction (a class absent from both
        has no IoU; counting it as 0 would understate the others)."""
        ious = [v for v, s in zip(self.iou, self.seen) if s]
        return sum(ious) / len(ious) if ious else 0.0

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.confusion.diag().sum() / total) if total > 0 else 0.0

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    @property
    def labeled(self) -> list[int]:
        """Per class: the scored pixels labeled it (a class scoring 0 with none was only
        over-called; with some, missed)."""
        return [int(n) for n in self.confusion.sum(1)]

    @property
    def predicted(self) -> list[int]:
        """Per class: the scored pixels predicted as it."""
        return [int(n) for n in self.confusion.sum(0)]

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        """Scores by class name; a class absent from truth and prediction scores None (JSON
        null), as mean_iou leaves it out."""
        names = class_names or [str(i) for i in range(len(self.iou))]
        seen = self.seen
        return {
            "iou": {n: v if s else None for n, v, s in zip(names, self.iou, seen)},
            "f1": {n: v if s else None for n, v, s in zip(names, self.f1, seen)},
            "pixel_accuracy": self.pixel_accuracy,
            "mean_iou": self.mean_iou,
            "pixels": self.pixels,
            "labeled_pixels": dict(zip(names, self.labeled)),
            "predicted_pixels": dict(zip(names, self.predicted)),
        }


def scores(pred: torch.Tensor, target: torch.Tensor, classes: int) -> SegmentationScores:
    return SegmentationScores(confusion_matrix(pred, target, classes))


def best_iou_threshold(score: torch.Tensor, positive: torch.Tensor) -> float:
    """The class-1 probability threshold with the highest IoU of class 1 on these pixels
    (pixels scoring above it are called class 1): midway between the lowest score called and
    the next lower one, so tied scores are called or not together (when calling every pixel is
    best, half the lowest score: a pixel at exactly 0 stays uncalled). 0.5 (the argmax of two
    classes) when there is no positive pixel.

    A class-weighted loss moves the model's probabilities towards the rare class, so its argmax
    over-calls it (both solvers called 12-13 % of a validation region roads where 2 % were);
    a threshold fitted on the training region's pixels corrects that without validation labels.
    """
    score, positive = score.reshape(-1), positive.reshape(-1)
    if not bool(positive.any()):
        return 0.5
    order = torch.argsort(score, descending=True, stable=True)
    ranked, hits = score[order], positive[order].double()
    tp = hits.cumsum(0)
    called = torch.arange(1, hits.numel() + 1, dtype=torch.float64, device=score.device)
    iou = tp / (called + hits.sum() - tp)
    inside_tie = torch.zeros_like(iou, dtype=torch.bool)
    inside_tie[:-1] = ranked[:-1] == ranked[1:]  # a cut there would split equal scores
    k = int(torch.argmax(iou.masked_fill(inside_tie, -1.0)))
    below = float(ranked[k + 1]) if k + 1 < ranked.numel() else 0.0
    return (float(ranked[k]) + below) / 2


def threshold_scale(threshold: float) -> list[float]:
    """Per-class factors on two classes' probabilities whose argmax calls class 1 exactly where
    its probability exceeds `threshold` (p1 (1 - t) > p0 t  <=>  p1 > t)."""
    return [float(threshold), 1.0 - float(threshold)]
