"""`recover`'s augmentation: "function matching" (Beyer et al., "Knowledge distillation: a good teacher is
patient and consistent", CVPR 2022). The teacher and the student see the SAME augmented images, so the
student matches the teacher's function on many more inputs than the few unlabelled images given.

``augment`` is one of `AUGMENTS` (or a bool: True = "mixup+shift", False = "none"):

- "shift": every image translated by its own whole number of pixels in [-m, m] along each axis,
  m = max(1, round(min(H, W) / 8)), the border pixels repeated into the space it leaves;
- "mixup": every image replaced by lambda x_i + (1 - lambda) x_j, with j a seeded permutation of the
  batch and lambda ~ U(0, 1) per image (Beta(1, 1)); no labels are mixed: the teacher labels the mix;
- "mixup+shift": the shift, then the mixup.

`augment_batch` is a pure function of (batch, augment, seed, step): a new tensor, same shape, dtype and
device; the batch passed in is never modified. It is applied to each GLOBAL batch before it is shared
between the processes, so torch.distributed trains on the same images as one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError

AUGMENTS = ("none", "shift", "mixup", "mixup+shift")
SHIFT_FRACTION = 1 / 8      # of the image's shorter side: the largest translation


def check_augment(augment) -> str:
    """``augment`` as one of `AUGMENTS` (True -> "mixup+shift", False -> "none"), or InvalidArgumentError."""
    if isinstance(augment, bool):
        return "mixup+shift" if augment else "none"
    if not isinstance(augment, str) or augment not in AUGMENTS:
        raise InvalidArgumentError(f"recover: augment must be one of {', '.join(map(repr, AUGMENTS))} (or True / False); "
                                   f"got {augment!r}")
    return augment


def augment_batch(batch: torch.Tensor, augment: str, seed: int, step: int) -> torch.Tensor:
    """``batch`` augmented as ``augment`` says, from random numbers drawn from (seed, step) only."""
    if augment == "none":
        return batch
    if not batch.is_floating_point():
        raise InvalidArgumentError(f"recover: augment={augment!r} needs floating-point images; got {batch.dtype}")
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % 2**63)
    out = batch
    if "shift" in augment:
        out = shifted(out, generator)
    if "mixup" in augment:
        out = mixed(out, generator)
    return out


def shifted(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of (N, C, H, W) translated by its own (dy, dx) in [-m, m]^2, edges repeated."""
    if batch.dim() != 4:
        raise InvalidArgumentError(f"recover: augment 'shift' needs images (N, C, H, W); got shape {tuple(batch.shape)}: "
                                   "use augment='mixup' or 'none'")
    n, _, h, w = batch.shape
    m = max(1, round(min(h, w) * SHIFT_FRACTION))
    offsets = torch.randint(0, 2 * m + 1, (n, 2), generator=generator).tolist()
    padded = F.pad(batch, (m, m, m, m), mode="replicate")
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def mixed(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """lambda_i x_i + (1 - lambda_i) x_partner(i): a seeded permutation of the batch, lambda_i ~ U(0, 1)."""
    partner = torch.randperm(len(batch), generator=generator)
    lam = torch.rand(len(batch), generator=generator).to(batch.device, batch.dtype).view(-1, *[1] * (batch.dim() - 1))
    return lam * batch + (1 - lam) * batch[partner.to(batch.device)]

