"""Cluttered digits: real handwritten digits pasted onto real photographs, built offline from a seed.

The digits are scikit-learn's ``load_digits`` (1797 scans of 8x8 handwritten digits); the clutter is
random crops of the photographs shipped inside scikit-image (``skimage.data``). Each image is a
background crop resized to ``img_size`` with one digit (label = the digit) or two digits far apart
(label = (a + b) mod 10, so the answer needs information from two distant places along the scan)
pasted at a random position and scale, in a colour that contrasts with what lies beneath it. As in
natural images, only a few tokens carry the answer.

With ``masks=True`` each image also gets a per-pixel label map for semantic segmentation: the pasted
digit's class (0-9) where its ink covers the pixel (the upscaled glyph's alpha >= INK_THRESHOLD, the
same alpha that painted it; a later digit over an earlier one wins, as it does in the image) and
BACKGROUND (10) elsewhere.

Splits use disjoint digit scans (60 / 20 / 20 % of the 1797, fixed by ``SPLIT_SEED``); backgrounds
are shared. Everything is a deterministic function of (split, size, variant, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import missing_dependency

SPLITS = ("train", "val", "test")
VARIANTS = ("one", "two")
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
DIGIT_SIDE = (0.35, 0.5)  # a digit's side as a fraction of the image side
CLUTTER_CONTRAST = 0.6  # the photographs' contrast is scaled by this around their mean
INK_THRESHOLD = 0.5  # a pixel belongs to a digit's mask where the digit's alpha is at least this
BACKGROUND = 10  # the segmentation class of pixels no digit covers
SEG_CLASSES = 11  # digits 0-9 and the background
# Model inputs are (image - MEAN) / STD with the image in [0, 1].
MEAN, STD = 0.5, 0.25
# Photographs in skimage.data that ship with the wheel (no download), colour and grey.
BACKGROUNDS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "camera", "brick", "grass", "gravel", "moon", "coins", "page", "text", "clock",
)


@dataclass
class DigitImages:
    """A generated split: ``inputs`` (n, 3, S, S) normalised model inputs, ``labels`` (n,),
    ``digits`` (n, k) the pasted digits, ``boxes`` (n, k, 4) their (top, left, height, width) and
    ``scans`` (n, k) their indices into ``load_digits``; ``masks`` (n, S, S) int64 per-pixel classes
    (0-9 digit ink, BACKGROUND elsewhere) when asked for, else None."""

    inputs: torch.Tensor
    labels: torch.Tensor
    digits: torch.Tensor
    boxes: torch.Tensor
    scans: torch.Tensor
    masks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.labels)

    def pictures(self) -> torch.Tensor:
        """The images in [0, 1], (n, S, S, 3), for plotting."""
        return (self.inputs * STD + MEAN).clamp(0, 1).permute(0, 2, 3, 1)

    def mask_batches(self, batch_size: int):
        """(inputs, masks) in order, ``batch_size`` at a time (needs ``masks=True``)."""
        if self.masks is None:
            raise ValueError("these images were made without masks: make_cluttered_digits(..., masks=True)")
        for start in range(0, len(self), batch_size):
            yield self.inputs[start:start + batch_size], self.masks[start:start + batch_size]

    def batches(self, batch_size: int):
        """(inputs, labels) in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.inputs[start:start + batch_size], self.labels[start:start + batch_size]


def _require(package: str, module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise missing_dependency(package, "data", "the cluttered-digits data") from err


@lru_cache(maxsize=1)
def _digit_scans() -> Tuple[np.ndarray, np.ndarray]:
    datasets = _require("scikit-learn", "sklearn.datasets")
    digits = datasets.load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits`` of the scans that ``split`` may use (disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    count = len(_digit_scans()[1])
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    ends = np.cumsum([round(f * count) for f in SPLIT_FRACTIONS])
    ends[-1] = count
    start = 0 if split == "train" else ends[SPLITS.index(split) - 1]
    return np.sort(order[start:ends[SPLITS.index(split)]])


@lru_cache(maxsize=1)
def _backgrounds() -> List[torch.Tensor]:
    data = _require("scikit-image", "skimage.data")
    pictures = []
    for name in BACKGROUNDS:
        picture = np.asarray(getattr(data, name)(), dtype=np.float32)
        if picture.max() > 1:
            picture = picture / 255.0
        if picture.ndim == 2:
            picture = np.repeat(picture[..., None], 3, axis=-1)
        pictures.append(torch.from_numpy(np.ascontiguousarray(picture[..., :3])).permute(2, 0, 1))
    return pictures


def _background(rng: np.random.Generator, img_size: int) -> torch.Tensor:
    picture = _backgrounds()[rng.integers(len(BACKGROUNDS))]
    height, width = picture.shape[1:]
    crop = int(rng.integers(min(96, height, width), min(height, width) + 1))
    top, left = rng.integers(height - crop + 1), rng.integers(width - crop + 1)
    patch = picture[:, top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        patch = patch.flip(-1)
    patch = F.interpolate(patch[None], size=(img_size, img_size), mode="bilinear", align_corners=False)[0]
    return patch.mean() + CLUTTER_CONTRAST * (patch - patch.mean())


def _far_apart_positions(rng, img_size: int, sizes: List[int]) -> List[Tuple[int, int]]:
    """Top-left corners; two digits sit at least half the image apart (centre to centre)."""
    while True:
        corners = [(int(rng.integers(img_size - s + 1)), int(rng.integers(img_size - s + 1))) for s in sizes]
        if len(sizes) == 1:
            return corners
        centres = [(t + s / 2, l + s / 2) for (t, l), s in zip(corners, sizes)]
        if np.hypot(centres[0][0] - centres[1][0], centres[0][1] - centres[1][1]) >= img_size / 2:
            return corners


def glyph_alpha(scan: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size) opacity of a digit scan pasted at side ``size``."""
    alpha = F.interpolate(torch.from_numpy(scan)[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return (1.5 * alpha).clamp(0, 1)  # solid strokes: the scans' grey levels fade out when upscaled


def _paste(image: torch.Tensor, scan: np.ndarray, top: int, left: int, size: int, rng) -> None:
    alpha = glyph_alpha(scan, size)
    beneath = image[:, top:top + size, left:left + size]
    # Contrast with the local background: light ink on dark ground, dark ink on light ground.
    tint = torch.from_numpy(rng.uniform(0.0, 0.25, size=3).astype(np.float32))[:, None, None]
    ink = (1.0 - tint) if beneath.mean() < 0.5 else tint
    image[:, top:top + size, left:left + size] = (1 - alpha) * beneath + alpha * ink


def make_cluttered_digits(split: str, size: int, variant: str = "one", img_size: int = 112, seed: int = 0,
                          masks: bool = False) -> DigitImages:
    """``size`` images of ``split`` (train/val/test) for ``variant`` (one/two digits), from ``seed``;
    ``masks=True`` adds the per-pixel segmentation labels (the images are the same either way).

    Digits are 0.35-0.5 of the image side (DIGIT_SIDE). Raises ValueError for an unknown split or variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if size < 1 or img_size < 32:
        raise ValueError(f"need size >= 1 and img_size >= 32; got size={size}, img_size={img_size}")
    scans, targets = _digit_scans()
    pool = split_indices(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), VARIANTS.index(variant), img_size])
    count = 1 if variant == "one" else 2
    inputs = torch.empty(size, 3, img_size, img_size)
    digits = torch.empty(size, count, dtype=torch.long)
    boxes = torch.empty(size, count, 4, dtype=torch.long)
    scan_ids = torch.empty(size, count, dtype=torch.long)
    labels_map = torch.full((size, img_size, img_size), BACKGROUND, dtype=torch.long) if masks else None
    for i in range(size):
        image = _background(rng, img_size)
        chosen = rng.choice(pool, size=count, replace=False)
        sides = [int(rng.integers(round(DIGIT_SIDE[0] * img_size), round(DIGIT_SIDE[1] * img_size) + 1))
                 for _ in range(count)]
        for k, (index, side, (top, left)) in enumerate(zip(chosen, sides, _far_apart_positions(rng, img_size, sides))):
            _paste(image, scans[index], top, left, side, rng)
            digits[i, k], scan_ids[i, k] = int(targets[index]), int(index)
            boxes[i, k] = torch.tensor([top, left, side, side])
            if masks:
                ink = glyph_alpha(scans[index], side)[0] >= INK_THRESHOLD
                labels_map[i, top:top + side, left:left + side][ink] = digits[i, k]
        inputs[i] = (image - MEAN) / STD
    labels = digits.sum(1) % 10
    return DigitImages(inputs, labels, digits, boxes, scan_ids, labels_map)
