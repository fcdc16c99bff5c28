"""Capture: torch.export (non-strict, dynamic batch) of a private copy of the user's model.

Known scan entry points (scan_registry) that the model's code refers to are routed to
`mambaprune::selective_scan` for the duration of the export (routing.py). The user's model itself
is never touched: a deep copy is exported.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from .routing import route_scans

MAX_BATCH = 1 << 16


@dataclass
class Capture:
    program: torch.export.ExportedProgram
    gm: fx.GraphModule
    example_inputs: tuple
    routed: list          # "where (origin)" of every scan entry point the traced model called


def capture(model: torch.nn.Module, example_inputs: tuple) -> Capture:
    private = copy.deepcopy(model).eval()
    export_inputs = tuple(_at_least_two(x) for x in example_inputs)
    with route_scans(private) as routes:
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
    return Capture(program, program.module(), tuple(example_inputs), [str(r) for r in routes if r.called])


def _at_least_two(x):
    """torch.export specialises a batch of 1; export with 2 samples, run with any batch."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return torch.cat([x, x], dim=0)
    return x


def _dynamic_batch(inputs: tuple):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
