"""``create_model``: a registered model (_registry.py), with a checkpoint loaded into it (checkpoints.py).

The files the original repositories release load as they are with ``create_model(name, checkpoint=path)``
or ``load_checkpoint`` (parameter names follow hustvl/Vim and ChenhongyiYang/PlainMamba).
"""
from __future__ import annotations

import torch.nn as nn

from ._registry import build_model
from .checkpoints import load_checkpoint


def create_model(name: str, checkpoint=None, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` (img_size, num_classes, depth, embed_dim, d_state,
    patch_size, ...) replace the published configuration; ``checkpoint`` (a path: safetensors or
    a PyTorch file as the authors release it, or a state dict) is loaded into it (load_checkpoint)."""
    model = build_model(name, **overrides)
    return load_checkpoint(model, checkpoint) if checkpoint is not None else model
