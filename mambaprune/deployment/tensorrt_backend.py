"""TensorRT through torch-tensorrt: ``backend="tensorrt"`` and ``export(..., format="tensorrt")``.

The pruned program is re-exported (dynamic batch) and compiled with
``torch_tensorrt.dynamo.compile(program, inputs=[Input(min, opt, max)], torch_executed_ops=...)``:
every ``mambaprune::`` custom op (the selective scan, the position-aware convs) is left to PyTorch
(our Triton kernel on the GPU) and everything between them becomes TensorRT engines. Ops that
torch-tensorrt cannot convert (e.g. the stable sort of the token selection) fall back to PyTorch
by its own partitioner.

Files: ``.ts`` is TorchScript (``torch_tensorrt.save(output_format="torchscript")``, load with
``torch.jit.load``); ``.engine`` (or ``format="tensorrt"`` with any other suffix) is torch-tensorrt's
ExportedProgram container (``torch_tensorrt.save`` default, load with ``torch_tensorrt.load(path).module()``).
Neither is a bare TensorRT engine: a bare engine cannot hold the ops that run in PyTorch (that
would need our ops as TensorRT plugins, QDP, TensorRT >= 10.7 -- not done).

Not verified on a machine with TensorRT when written (none available); ``benchmarks/tensorrt_check.py``
checks parity and speed where it is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import InvalidArgumentError, missing_dependency
from .export import example_inputs_for, reexport, register_format

PURPOSE = "TensorRT export / backend='tensorrt'"
DEFAULT_MAX_BATCH = 256


def import_torch_tensorrt():
    """torch_tensorrt, or MissingDependencyError naming the package."""
    try:
        import torch_tensorrt
    except ImportError as err:
        raise missing_dependency("torch-tensorrt", "tensorrt", PURPOSE) from err
    return torch_tensorrt


def torch_executed_ops(program) -> set:
    """The mambaprune:: custom ops present in the program (kept in PyTorch)."""
    graph = program.graph_module.graph if hasattr(program, "graph_module") else program.graph
    ops = set()
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
                target.namespace == "mambaprune":
            ops.add(target)
    return ops


def _check_device(pruned) -> torch.device:
    devices = {spec[2] for spec in pruned._input_spec if spec is not None}
    device = next(iter(devices)) if devices else torch.device("cpu")
    if device.type != "cuda":
        raise InvalidArgumentError("TensorRT needs a model compiled on a CUDA device: move the model and the example inputs "
                         f"to the GPU before compile_pruned (this one was compiled on {device})")
    return device


def compile_tensorrt(pruned, *, min_batch: int = 1, opt_batch: Optional[int] = None,
                     max_batch: int = DEFAULT_MAX_BATCH, enabled_precisions: Optional[set] = None, **trt_options):
    """torch-tensorrt compilation of the pruned program -> (trt graph module, example inputs at opt_batch)."""
    trt = import_torch_tensorrt()
    _check_device(pruned)
    opt_batch = opt_batch or min(max(min_batch, 32), max_batch)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InvalidArgumentError(f"need 1 <= min_batch <= opt_batch <= max_batch; got {min_batch}, {opt_batch}, {max_batch}")
    program = reexport(pruned)
    specs = [spec for spec in pruned._input_spec]
    inputs = [trt.Input(min_shape=(min_batch, *shape), opt_shape=(opt_batch, *shape), max_shape=(max_batch, *shape),
                        dtype=dtype) for shape, dtype, _ in specs]
    if enabled_precisions is None:
        enabled_precisions = {dtype for _, dtype, _ in specs if dtype.is_floating_point} or {torch.float32}
    trt_module = trt.dynamo.compile(program, inputs=inputs, enabled_precisions=enabled_precisions,
                                    torch_executed_ops=torch_executed_ops(program), **trt_options)
    return trt_module, example_inputs_for(pruned._input_spec, opt_batch)


class TensorRTModule(torch.nn.Module):
    """The torch-tensorrt compiled program behind the model's call signature."""

    def __init__(self, trt_module):
        super().__init__()
        self.trt_module = trt_module

    def forward(self, *args):
        return self.trt_module(*args)


def tensorrt_module(pruned, **options) -> TensorRTModule:
    trt_module, _ = compile_tensorrt(pruned, **options)
    return TensorRTModule(trt_module)


def save_tensorrt(pruned, path: str, suffix: str = ".engine", **options) -> None:
    """Compile and save; `.ts` -> TorchScript, anything else -> torch-tensorrt's ExportedProgram file."""
    trt = import_torch_tensorrt()
    trt_module, inputs = compile_tensorrt(pruned, **options)
    output_format = "torchscript" if suffix == ".ts" else "exported_program"
    trt.save(trt_module, path, output_format=output_format, inputs=list(inputs))


def write_tensorrt(pruned, tmp: str, path: str, **options) -> None:
    """``export(path, format="tensorrt")``: `save_tensorrt` in the form the path's suffix names."""
    save_tensorrt(pruned, tmp, suffix=Path(path).suffix.lower(), **options)


register_format("tensorrt", (".engine", ".ts"), write_tensorrt)
