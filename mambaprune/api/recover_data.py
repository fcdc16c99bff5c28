"""`recover`'s data plumbing: a tensor, an iterable of batches or a folder -> an endless stream of global
batches (the same on every rank), and the shard of each one that a rank trains on.

A tensor (N, C, H, W) is cut into batches of ``batch_size`` from successive seeded permutations (every
batch full, batches cross epoch boundaries). An iterable is used batch by batch as it comes (each item
one global batch) and started again when it ends. A folder is read with `mambaprune.data.image_folder`
(shuffled per pass from the seed), sized for the pruned model and normalised from the teacher's config.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..data import image_folder
from ..errors import InvalidArgumentError, InvalidArgumentTypeError


def global_batches(data, batch_size: int, seed: int, image_shape: tuple, teacher) -> Iterator[torch.Tensor]:
    """The stream of global batches ``recover`` trains on (see the module's docstring)."""
    if isinstance(data, (str, Path)):
        data = image_folder(data, tuple(image_shape[-2:]), batch_size=batch_size, model=teacher, shuffle=True,
                            seed=seed)
    if isinstance(data, torch.Tensor):
        return _tensor_batches(data, batch_size, seed)
    if not isinstance(data, Iterable):
        raise InvalidArgumentTypeError(f"recover: data must be a tensor (N, C, H, W), an iterable of image batches or a folder "
                        f"path; got {type(data).__name__}")
    return _repeat(data)


def _tensor_batches(images: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    if images.dim() < 1 or len(images) == 0:
        raise InvalidArgumentError(f"recover: a data tensor must be (N, C, H, W) with N >= 1; got shape {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(len(images), generator=generator)])
        chosen, pending = pending[:batch_size], pending[batch_size:]
        yield images[chosen.to(images.device)]


def _repeat(batches: Iterable) -> Iterator[torch.Tensor]:
    passes = 0
    while True:
        seen = 0
        for batch in batches:
            if not isinstance(batch, torch.Tensor):
                raise InvalidArgumentTypeError(f"recover: batch {seen} of data is a {type(batch).__name__}, not a tensor of images: "
                                 "recover is label-free, pass the images only, e.g. (images for images, _ in loader)")
            seen += 1
            yield batch
        if seen == 0:
            raise InvalidArgumentError("recover: data yielded no batch" + (" on its second pass: pass a re-iterable (a list, "
                             "a DataLoader), not an iterator, or fewer steps" if passes else ""))
        passes += 1


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global batch: contiguous, in order, sizes differing by at most one."""
    if len(batch) < world:
        raise InvalidArgumentError(f"recover: a batch of {len(batch)} image(s) cannot be shared by {world} processes: "
                         f"use batches of at least {world}")
    return torch.tensor_split(batch, world)[rank] if world > 1 else batch
