"""Semantic-segmentation scores from a confusion matrix summed over a whole set of images.

mIoU is the mean over classes of TP / (TP + FP + FN), each count summed over every pixel of every
image (not averaged per image), over the classes that occur in the targets or the predictions; pixel
accuracy is the fraction of pixels labelled right.
"""

from __future__ import annotations

import torch


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts: row = target class, column = predicted class, over every pixel."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    pairs = target.reshape(-1).long() * classes + predicted.reshape(-1).long()
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per class IoU (nan for a class absent from both the targets and the predictions)."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean IoU over the classes present (in the targets or the predictions)."""
    return float(class_iou(confusion).nanmean())


def pixel_accuracy(confusion: torch.Tensor) -> float:
    return float(confusion.diagonal().sum() / confusion.sum())
