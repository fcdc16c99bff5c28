"""Capture: torch.export (non-strict, dynamic batch) of a private copy of the user's model.

Known scan entry points (scan_registry) that the model's code refers to are routed to
`mambaprune::selective_scan` for the duration of the export and restored afterwards, on error too.
The user's model itself is never touched: the copy is exported.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from .scan_registry import known_entries

MAX_BATCH = 1 << 16


@dataclass
class Capture:
    program: torch.export.ExportedProgram
    gm: fx.GraphModule
    example_inputs: tuple
    routed: list          # names of the scan entry points that were routed


def capture(model: torch.nn.Module, example_inputs: tuple) -> Capture:
    private = copy.deepcopy(model).eval()
    export_inputs = tuple(_at_least_two(x) for x in example_inputs)
    with route_scans(private) as routed:
        try:
            program = torch.export.export(private, export_inputs, dynamic_shapes=_dynamic_batch(export_inputs),
                                          strict=False)
        except UnsupportedModelError:
            raise
        except Exception as err:  # torch.export's own errors are long; keep the first lines and chain the rest
            summary = " ".join(str(err).strip().splitlines()[:3])[:600]
            raise UnsupportedModelError(
                f"torch.export could not capture the model ({type(err).__name__}: {summary}). mambaprune needs a "
                "model that torch.export.export(model, inputs, strict=False) can trace with a dynamic batch size."
            ) from err
    return Capture(program, program.module(), tuple(example_inputs), routed)


def flat_inputs(inputs: tuple) -> list:
    """Positional model inputs -> the captured graph's placeholders, in order."""
    flat, _ = torch.utils._pytree.tree_flatten((tuple(inputs), {}))
    return flat


def run_graph(gm: fx.GraphModule, flat: list) -> list:
    """Run a captured (or rewritten) graph on flat inputs; its tensor outputs as a list."""
    out = fx.Interpreter(gm).run(*flat)
    leaves = out if isinstance(out, (list, tuple)) else [out]
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def infer_example_inputs(model: torch.nn.Module) -> tuple:
    """(1, C, H, W) zeros from the input size the model declares, or a clear error asking for inputs."""
    size = _declared_input_size(model)
    if size is None:
        raise ValueError(
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


def _at_least_two(x):
    """torch.export specialises a batch of 1; export with 2 samples, run with any batch."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return torch.cat([x, x], dim=0)
    return x


def _dynamic_batch(inputs: tuple):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)


@contextlib.contextmanager
def route_scans(model: torch.nn.Module):
    """Replace known scan functions where the model's code looks them up; restore on exit."""
    undo, routed = [], []
    try:
        for entry in known_entries():
            _route_methods(model, entry, undo, routed)
            _route_globals(model, entry, undo, routed)
        yield routed
    finally:
        for restore in reversed(undo):
            restore()


def _route_methods(model, entry, undo, routed) -> None:
    for name, module in model.named_modules():
        for attr, kind in _class_attributes_holding(type(module), entry.fn):
            bound = entry.adapter if kind is staticmethod else types.MethodType(entry.adapter, module)
            object.__setattr__(module, attr, bound)
            undo.append(lambda m=module, a=attr: m.__dict__.pop(a, None))
            routed.append(f"{name or type(module).__name__}.{attr} ({entry.origin})")
        for attr, value in list(vars(module).items()):
            if value is entry.fn:  # e.g. `self.scan_fn = selective_scan_fn` stored on the instance
                object.__setattr__(module, attr, entry.adapter)
                undo.append(lambda m=module, a=attr, v=value: object.__setattr__(m, a, v))
                routed.append(f"{name or type(module).__name__}.{attr} ({entry.origin})")


def _class_attributes_holding(cls, fn) -> list:
    """(name, kind) of class attributes that are `fn`: a plain method or a staticmethod wrapping it."""
    found, names = [], set()
    for klass in cls.__mro__:
        for attr, value in vars(klass).items():
            kind = type(value) if isinstance(value, (staticmethod, classmethod)) else None
            inner = value.__func__ if kind else value
            if inner is fn and attr not in names and kind is not classmethod:
                found.append((attr, kind))
                names.add(attr)
    return found


def _route_globals(model, entry, undo, routed) -> None:
    """Globals of the modules defining the model's classes, and the scan's own module attribute."""
    seen = set()
    homes = [klass.__module__ for module in model.modules() for klass in type(module).__mro__]
    for home in homes + [getattr(entry.fn, "__module__", None)]:
        namespace = sys.modules.get(home) if home else None
        if namespace is None or id(namespace) in seen:
            continue
        seen.add(id(namespace))
        for attr, value in list(vars(namespace).items()):
            if value is entry.fn:
                setattr(namespace, attr, entry.adapter)
                undo.append(lambda ns=namespace, a=attr, v=value: setattr(ns, a, v))
                routed.append(f"{namespace.__name__}.{attr} ({entry.origin})")
