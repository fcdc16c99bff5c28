"""Calibration images from a path: a folder of images, or a .pt / .safetensors file of one tensor."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import InvalidArgumentError
from .image_folder import image_folder

CALIBRATION_BATCH = 8


def load_calibration(path: str, size: Callable[[], tuple], mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None, model=None) -> list:
    """Batches of CALIBRATION_BATCH images: a folder of images (read at `size()`, the model's (H, W),
    normalised with `mean` / `std` or the model's pretrained_cfg) or a .pt / .safetensors file of one
    tensor (N, C, H, W)."""
    file = Path(path)
    if file.is_dir():
        return list(image_folder(file, size(), mean=mean, std=std, model=model, batch_size=CALIBRATION_BATCH))
    if not file.is_file():
        raise InvalidArgumentError(f"--calibration {path}: no such file or folder (a folder of images, or a .pt or "
                                   ".safetensors file of one tensor of input images, (N, C, H, W))")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = list(load_file(str(file)).values())
    else:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        tensors = [loaded] if isinstance(loaded, torch.Tensor) else []
    if len(tensors) != 1 or tensors[0].dim() < 2 or len(tensors[0]) == 0:
        raise InvalidArgumentError(f"--calibration {path} must hold exactly one non-empty tensor of input images "
                                   "(N, C, H, W), saved with torch.save(x, path) or safetensors' save_file({'x': x}, path)")
    return list(tensors[0].float().split(CALIBRATION_BATCH))
