"""timm-style model registry, ``create_model`` and local safetensors checkpoint loading.

No pretrained weights are available offline: every model is randomly initialised. The files the
original repositories release load as they are with ``create_model(name, checkpoint=path)`` or
``load_checkpoint`` (parameter names follow hustvl/Vim and ChenhongyiYang/PlainMamba).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers ``fn`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS)


def create_model(name: str, checkpoint=None, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` (img_size, num_classes, depth, embed_dim, d_state,
    patch_size, ...) replace the published configuration; ``checkpoint`` (a path: safetensors or
    a PyTorch file as the authors release it, or a state dict) is loaded into it (load_checkpoint)."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    model = _MODELS[name](**overrides)
    return load_checkpoint(model, checkpoint) if checkpoint is not None else model


def load_checkpoint(model: nn.Module, checkpoint) -> nn.Module:
    """Strictly load a checkpoint into ``model`` (in place; returns it): see models/checkpoints.py."""
    from .checkpoints import load_checkpoint as _load
    return _load(model, checkpoint)
