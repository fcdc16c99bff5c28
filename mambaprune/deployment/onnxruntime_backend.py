"""ONNX export of a pruned model and ``backend="onnxruntime"``: an InferenceSession behind an nn.Module."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from ..errors import InputMismatchError, missing_dependency
from ..runtime.torch_logs import torch_logs_held
from .export import reexport, register_format


def require_package(package: str, module: str, purpose: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise missing_dependency(package, "onnx", purpose) from err


def require_onnxruntime() -> None:
    """MissingDependencyError unless onnx, onnxscript and onnxruntime are installed."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        require_package(package, package, 'compile_pruned(backend="onnxruntime")')


def onnx_program(pruned, scan_form: Optional[str] = None, opset_version: Optional[int] = None,
                 optimize: bool = True, check: bool = True):
    """torch.onnx.export(dynamo=True) of the re-exported pruned program -> torch.onnx.ONNXProgram.

    scan_form: how the selective scan is written in ONNX ("scan" or "doubling", see onnx_ops).
    """
    require_package("onnx", "onnx", "ONNX export")
    require_package("onnxscript", "onnxscript", "ONNX export")
    from .onnx_ops import DEFAULT_SCAN_FORM, ONNX_OPSET, custom_translation_table
    program = reexport(pruned)
    table = custom_translation_table(scan_form or DEFAULT_SCAN_FORM)
    onnx_prog = torch.onnx.export(program, dynamo=True, custom_translation_table=table,
                                  opset_version=opset_version or ONNX_OPSET, optimize=optimize,
                                  external_data=False, verbose=False)
    if check:
        import onnx
        onnx.checker.check_model(onnx_prog.model_proto, full_check=True)
    return onnx_prog


def default_providers() -> list:
    ort = require_package("onnxruntime", "onnxruntime", "backend='onnxruntime'")
    available = ort.get_available_providers()
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in preferred if p in available]
    return chosen or list(available)


class OnnxRuntimeModule(torch.nn.Module):
    """Runs an ONNX file (or serialized model bytes) with onnxruntime; call it like the model.

    Inputs are torch tensors (any device: they are copied to the host), outputs are torch tensors
    on the first input's device; a single output is returned as a tensor, several as a tuple.
    """

    def __init__(self, model, providers: Optional[list] = None, session_options=None, out_spec=None):
        super().__init__()
        self.out_spec = out_spec  # pytree spec of the model's outputs (None: tensor or tuple)
        ort = require_package("onnxruntime", "onnxruntime", "backend='onnxruntime'")
        self.providers = list(providers) if providers is not None else default_providers()
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
        self.session = ort.InferenceSession(source, sess_options=session_options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *args):
        if len(args) != len(self.input_names):
            raise InputMismatchError(f"the ONNX model takes {len(self.input_names)} input(s); got {len(args)}")
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
        feeds = {name: (a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else a)
                 for name, a in zip(self.input_names, args)}
        outputs = [torch.from_numpy(o).to(device) for o in self.session.run(self.output_names, feeds)]
        if self.out_spec is not None and self.out_spec.num_leaves == len(outputs):
            return torch.utils._pytree.tree_unflatten(outputs, self.out_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def onnxruntime_module(pruned, providers: Optional[list] = None, **options) -> OnnxRuntimeModule:
    """Export `pruned` to ONNX (in a temporary folder) and open it with onnxruntime."""
    program = onnx_program(pruned, **options)
    with tempfile.TemporaryDirectory(prefix="mambaprune-onnx-") as folder:
        path = os.path.join(folder, "model.onnx")
        program.save(path, external_data=False)
        exported = getattr(program, "exported_program", None)
        out_spec = exported.call_spec.out_spec if exported is not None else None
        return OnnxRuntimeModule(path, providers=providers, out_spec=out_spec)


def write_onnx(pruned, tmp: str, path: str, **options) -> None:
    """``export(path, format="onnx")``: the ONNX program of `pruned` (options as `onnx_program` takes them)."""
    with torch_logs_held():
        program = onnx_program(pruned, **options)
    program.save(tmp, external_data=False)


register_format("onnx", (".onnx",), write_onnx)
