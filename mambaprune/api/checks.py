"""Checks of what the user hands `compile_pruned`, made before (or on) the example run.

- wrapped models: ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and modules
  already passed through ``torch.compile`` (``._orig_mod``) are unwrapped (the wrapper is not
  touched); a model in train() mode is captured in eval mode, with a warning.
- calibration: a list (or iterable) of batches, each like the example inputs (shape after the
  batch axis, dtype, a batch of at least one).
- a callable metric: on the example run it must return a floating (B, L) tensor of finite values.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.fx as fx

from ..errors import InvalidArgumentError, InvalidArgumentTypeError

CAPTURED_IN_EVAL = ("mambaprune: the model is in train() mode; it is captured in eval() mode (dropout off, "
                    "batch-norm running statistics), as inference runs it. Call model.eval() to silence this.")


def unwrap_model(model) -> torch.nn.Module:
    """The module to capture: `model`, or the module inside a DataParallel / DDP / torch.compile wrapper."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentTypeError(f"compile_pruned expects a torch.nn.Module; got {type(model).__name__}")
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            break
    if model.training:
        warnings.warn(CAPTURED_IN_EVAL, UserWarning, stacklevel=3)
    return model


def calibration_batches(calibration: Optional[Iterable], example_inputs: Optional[tuple]) -> Optional[list]:
    """`calibration` as a list of batches of model inputs, each checked against the example inputs."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        raise InvalidArgumentError(
            f"calibration is a single tensor of shape {tuple(calibration.shape)}; it takes a list of batches "
            "(what you would pass as model(*batch)): e.g. calibration=[x] or list(x.split(8))")
    if _is_numpy(calibration):
        raise InvalidArgumentError("calibration is a numpy array; it takes a list of batches of torch tensors: "
                                   "convert with torch.from_numpy(array) and pass [tensor] or list(tensor.split(8))")
    if isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        raise InvalidArgumentError(f"calibration takes a list of batches of model inputs; got {type(calibration).__name__}")
    batches = list(calibration)
    for index, batch in enumerate(batches):
        inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        for position, x in enumerate(inputs):
            _check_calibration_input(index, position, x, example_inputs)
    return batches


def _check_calibration_input(index: int, position: int, x, example_inputs: Optional[tuple]) -> None:
    where = f"calibration batch {index}" + (f", input {position}," if position else "")
    if _is_numpy(x):
        raise InvalidArgumentError(f"{where} is a numpy array: convert it with torch.from_numpy(array)")
    if not isinstance(x, torch.Tensor):
        return   # calibration_inputs says what the batch should be
    if x.dim() == 0 or x.shape[0] == 0:
        raise InvalidArgumentError(f"{where} has shape {tuple(x.shape)}: every batch needs at least one sample")
    if example_inputs is None or position >= len(example_inputs) or not isinstance(example_inputs[position], torch.Tensor):
        return
    example = example_inputs[position]
    if x.shape[1:] != example.shape[1:] or x.dtype != example.dtype:
        raise InvalidArgumentError(
            f"{where} has shape {tuple(x.shape)} and dtype {x.dtype}; the example inputs have "
            f"(batch, {', '.join(map(str, example.shape[1:]))}) and {example.dtype}: calibration batches must be "
            "like the example inputs (the token counts are compiled in)")


def _is_numpy(x) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "shape")


def check_metric(graph_module: fx.GraphModule, flat: list, metric) -> None:
    """Run the rewritten graph on the example and check every call of a callable `metric`."""
    if not callable(metric):
        return

    problems = []

    class MetricChecker(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.op == "call_function" and getattr(node.target, "__name__", "") == "user_metric":
                y, token_dim = (self.env[a] if isinstance(a, fx.Node) else a for a in node.args[:2])
                problem = _scores_problem(metric, value, y, token_dim)
                if problem is not None:
                    problems.append(problem)
                    raise _Stop
            return value

    try:
        with torch.no_grad():
            MetricChecker(graph_module).run(*flat)
    except _Stop:
        pass
    if problems:   # raised here: fx.Interpreter would append its node dump to the message
        raise InvalidArgumentError(problems[0])


class _Stop(Exception):
    pass


def _scores_problem(metric, scores, y: torch.Tensor, token_dim: int) -> Optional[str]:
    name = getattr(metric, "__name__", type(metric).__name__)
    expected = (y.shape[0], y.shape[token_dim])
    if not isinstance(scores, torch.Tensor):
        got = f"a {type(scores).__name__}"
    elif not scores.is_floating_point():
        got = f"a tensor of dtype {scores.dtype}"
    elif tuple(scores.shape) != expected:
        got = f"a tensor of shape {tuple(scores.shape)}"
    elif not torch.isfinite(scores).all():
        got = "scores that are not all finite (NaN or inf)"
    else:
        return None
    return (f"metric {name} returned {got} on the example inputs; a metric (y, token_dim) -> scores must return a "
            f"floating tensor of shape (batch, tokens) = {expected} of finite values (y had shape {tuple(y.shape)}, "
            f"token_dim={token_dim})")
