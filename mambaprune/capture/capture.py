"""Capture: torch.export (non-strict, dynamic batch) of a private copy of the user's model.

Known scan entry points (scan_registry) that the model's code refers to are routed to
`mambaprune::selective_scan` for the duration of the export (routing.py); other callables the code
reaches that compute a selective scan are found by behaviour and routed too (behaviour.py). The
user's model itself is never touched: a deep copy is exported. A scan written as a Python loop
over the tokens, unrolled by the export, is lifted into one scan node afterwards (token_loops.py).
A Tensor subclass of the model's code that only restates a tensor's properties (VSSD's `tTensor`)
is read as the plain tensor it wraps (tensor_subclasses.py).

A model whose code turns the batch into a Python int (MambaVision's `window_reverse`:
``int(windows.shape[0] / (H * W / ws / ws))``) would fix the batch under torch.export; during the
capture `int` in the model's modules is routed to one that keeps an affine function of the batch
symbolic (batch_int.py), so such a model is captured, and pruned, for every batch. A model that
fixes the batch some other way is captured with the example inputs' batch (`Capture.static_batch`),
and the pruned model accepts only that batch (a `BatchSizeError` at call time names it).
Re-capturing per batch size was not chosen: a capture and its analysis cost seconds, which a call
must not hide.

A capture runs under the compile lock (pass_infra.exclusive_compile: torch.export and the routing
touch process-wide state), restores the backend switches torch.export flips, and releases the
ShapeEnv caches that would keep every finished export alive.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError
from ..pass_infra import backend_switches_preserved, exclusive_compile, release_shape_env_caches
from .batch_int import symbolic_batch_int
from .behaviour import route_by_behaviour
from .routing import route_scans
from .lattice_fills import functionalize_lattice_fills
from .loop_modules import at_batch, loops_replayed
from .slice_fills import functionalize_slice_fills
from .tensor_subclasses import plain_tensor_subclasses
from .token_loops import lift_token_loops, outputs_agree

MAX_BATCH = 1 << 16


@dataclass
class Capture:
    program: torch.export.ExportedProgram
    gm: fx.GraphModule
    example_inputs: tuple
    routed: list          # "where (origin)" of every scan entry point the traced model called
    recognised: list = field(default_factory=list)   # behaviour.Recognition: callables probed as scans
    static_batch: Optional[int] = None   # the only batch the graph runs (the model's code fixed it)
    unwrapped: list = field(default_factory=list)    # tensor_subclasses.Unwrapped: read as plain tensors


def capture(model: torch.nn.Module, example_inputs: tuple) -> Capture:
    with exclusive_compile(), backend_switches_preserved():
        try:
            captured = _capture(model, example_inputs)
        finally:
            release_shape_env_caches()
        _release_dispatch_cache(captured.gm)
        return captured


def _release_dispatch_cache(gm: fx.GraphModule) -> None:
    """Empty the fake-tensor dispatch cache of the export's ShapeEnv: keyed by the export's own
    symbols, it is never hit again, and torch.export keeps every ShapeEnv alive (its SymNodes are
    held from C++: a bare torch.export.export of a two-layer model does it too)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        shape_env = getattr(getattr(node.meta.get("val"), "fake_mode", None), "shape_env", None)
        cache = getattr(shape_env, "fake_tensor_cache", None)
        if isinstance(cache, dict):
            cache.clear()
            return


def _capture(model: torch.nn.Module, example_inputs: tuple) -> Capture:
    private = copy.deepcopy(model).eval()
    export_inputs = tuple(_at_least_two(x) for x in example_inputs)
    with route_scans(private) as routes, symbolic_batch_int(private), plain_tensor_subclasses(private) as unwrapped, \
            route_by_behaviour(private, tuple(example_inputs), routes) as recognised:
        program, static_batch, replayed = _export_lifting_loop_modules(private, tuple(example_inputs), export_inputs)
    routes = routes + [r.route for r in recognised if r.route is not None and r.is_scan]
    gm, loops = lift_token_loops(functionalize_lattice_fills(functionalize_slice_fills(program.module())),
                                 tuple(example_inputs) if static_batch else export_inputs)
    return Capture(program, gm, tuple(example_inputs),
                   [str(r) for r in routes if r.called] + [str(x) for x in replayed + loops],
                   static_batch=static_batch, recognised=recognised, unwrapped=unwrapped)


def _export_lifting_loop_modules(private: torch.nn.Module, example_inputs: tuple, export_inputs: tuple) -> tuple:
    """(program, static batch, LiftedLoops): exported with every loop module's loop lifted before the
    export (loop_modules.py), or, when that is not possible or its program does not compute what the
    model computes at two batch sizes, exported as written (its loops are lifted afterwards)."""
    replayed = []
    try:
        with loops_replayed(private, example_inputs) as replayed:
            program, static_batch = _export(private, example_inputs, export_inputs)
    except Exception:
        if not replayed:
            raise
    else:
        if not replayed or _reproduces(program, private, example_inputs, static_batch):
            return program, static_batch, replayed
    program, static_batch = _export(private, example_inputs, export_inputs)
    return program, static_batch, []


def _export(private: torch.nn.Module, example_inputs: tuple, export_inputs: tuple) -> tuple:
    """(program, static batch): with a dynamic batch, or the example batch when the model's code fixes it."""
    try:
        program = torch.export.export(private, export_inputs, dynamic_shapes=_dynamic_batch(export_inputs),
                                      strict=False)
        return program, None
    except UnsupportedModelError:
        raise
    except Exception as err:  # torch.export's own errors are long; keep the first lines and chain the rest
        if not _specialises_the_batch(err):
            raise _capture_error(err, "with a dynamic batch size") from err
        static_batch = _batch_of(example_inputs)
        try:
            return torch.export.export(private, tuple(example_inputs), strict=False), static_batch
        except UnsupportedModelError:
            raise
        except Exception as again:
            raise _capture_error(again, f"even with the example batch ({static_batch}) fixed") from again


def _reproduces(program, private: torch.nn.Module, example_inputs: tuple, static_batch: Optional[int]) -> bool:
    """Whether the program computes the model's outputs on the example inputs at the example batch and at 3."""
    exported = program.module()
    for batch in ((static_batch,) if static_batch else (_batch_of(example_inputs), 3)):
        inputs = tuple(at_batch(x, batch) for x in example_inputs)
        try:
            with torch.no_grad():
                if not outputs_agree(private(*inputs), exported(*inputs)):
                    return False
        except Exception:      # noqa: BLE001 - what cannot be checked is not used
            return False
    return True


def _specialises_the_batch(err: Exception) -> bool:
    """torch.export's answer when the model's code turns the batch into a constant (e.g. int(B))."""
    text = str(err)
    return "Constraints violated (batch)" in text or ("batch" in text and "specialized" in text)


def _batch_of(inputs: tuple) -> int:
    return next(int(x.shape[0]) for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0)


def _capture_error(err: Exception, how: str) -> UnsupportedModelError:
    summary = " ".join(str(err).strip().splitlines()[:3])[:600]
    return UnsupportedModelError(
        f"torch.export could not capture the model {how} ({type(err).__name__}: {summary}). mambaprune needs a "
        "model that torch.export.export(model, inputs, strict=False) can trace.")


def _at_least_two(x):
    """torch.export specialises a batch of 1; export with 2 samples, run with any batch."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return at_batch(x, 2)
    return x


def _dynamic_batch(inputs: tuple):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
