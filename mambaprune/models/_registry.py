"""timm-style model registry, ``create_model`` and local safetensors checkpoint loading.

No pretrained weights are available offline: every model is randomly initialised. Weights from the
original repositories can be converted to safetensors and loaded with ``load_checkpoint`` (parameter
names follow hustvl/Vim and ChenhongyiYang/PlainMamba where possible).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
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


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` (img_size, num_classes, depth, embed_dim, d_state,
    patch_size, ...) replace the published configuration."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](**overrides)


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Strictly load a local safetensors file into ``model`` (in place; returns it).

    Raises ValueError naming the missing keys, unexpected keys and shape mismatches.
    """
    from safetensors.torch import load_file

    state = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches: {mismatched}")
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(parts))
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
