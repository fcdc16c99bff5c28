"""timm-style model registry: ``register_model`` and the registered factories (``create_model``,
factory.py, builds them and loads a checkpoint).

No pretrained weights are available offline: every model is randomly initialised.
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


def build_model(name: str, **overrides) -> nn.Module:
    """The registered model `name` built with `overrides`, randomly initialised."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](**overrides)
