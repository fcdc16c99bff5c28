"""Model inputs as the captured graph sees them: flattening, running a graph, inferring examples."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..errors import InvalidArgumentError


def flat_inputs(inputs: tuple) -> list:
    """Positional model inputs -> the captured graph's placeholders, in order."""
    flat, _ = torch.utils._pytree.tree_flatten((tuple(inputs), {}))
    return flat


def run_graph(gm: fx.GraphModule, flat: list) -> list:
    """Run a captured (or rewritten) graph on flat inputs; its tensor outputs as a list."""
    out = fx.Interpreter(gm).run(*flat)
    leaves = out if isinstance(out, (list, tuple)) else [out]
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def first_sample(inputs: tuple) -> tuple:
    """The first sample of every batched tensor input (per-image FLOPs and checks)."""
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)


def infer_example_inputs(model: torch.nn.Module) -> tuple:
    """(1, C, H, W) noise from the input size the model declares, or a clear error asking for inputs."""
    size = _declared_input_size(model)
    if size is None:
        raise InvalidArgumentError(
            "example_inputs were not given and the model does not say its input size (looked for "
            "model.patch_embed.img_size, model.img_size and model.default_cfg['input_size']). "
            "Pass example_inputs=(torch.randn(1, 3, H, W),).")
    channels, height, width = size
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, channels, height, width, generator=generator).to(device=device, dtype=dtype),)


def _declared_input_size(model) -> Optional[tuple]:
    channels = _input_channels(model)
    candidates = [getattr(getattr(model, "patch_embed", None), "img_size", None), getattr(model, "img_size", None)]
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        c, h, w = cfg["input_size"]
        return int(c), int(h), int(w)
    for value in candidates:
        if isinstance(value, int):
            return channels, value, value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return channels, int(value[0]), int(value[1])
    return None


def _input_channels(model) -> int:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return 3
