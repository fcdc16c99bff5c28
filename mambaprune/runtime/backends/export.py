"""``PrunedModel.export``: format dispatch, the re-exported program, and atomic writes.

Formats (from the path's suffix, or ``format=``):

- ``"pt2"`` (``.pt2``): ``torch.export.save`` of the pruned program re-exported with a dynamic batch
  (``torch.export.load(path).module()(x)`` runs it; our custom ops must be registered, i.e.
  ``import mambaprune`` first).
- ``"onnx"`` (``.onnx``): ``torch.onnx.export(dynamo=True)`` with our ops translated to standard ONNX
  (``onnx_ops``), dynamic batch, checked with ``onnx.checker.check_model``.
- ``"tensorrt"`` (``.engine``, ``.ts``): torch-tensorrt with our ops left to PyTorch
  (``tensorrt_backend``).

Every format is written to a temporary file in the target folder and moved into place with
``os.replace``: an existing file is only ever replaced by a complete new one.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx as fx


FORMATS = ("onnx", "pt2", "tensorrt")
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".engine": "tensorrt", ".ts": "tensorrt"}
EXPORT_BATCH = 2
MAX_BATCH = 1 << 16


def resolve_format(path, format: Optional[str]) -> str:
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS} "
                             f"(or a path ending in one of {tuple(SUFFIXES)})")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot tell the export format from {str(path)!r}: the suffix must be one of "
                         f"{tuple(SUFFIXES)} ({', '.join(f'{s} -> {f}' for s, f in SUFFIXES.items())}), "
                         f"or pass format= one of {FORMATS}")
    return SUFFIXES[suffix]


class ExportFolderError(ValueError, FileNotFoundError):
    """The folder an export should be written to does not exist."""


def atomic_write(path, write: Callable[[str], None]) -> str:
    """Call write(tmp_path) for a temporary file next to `path`, then os.replace it onto `path`.

    On any error the temporary file is removed and `path` (if it existed) is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportFolderError(f"cannot export to {path!r}: the folder {folder!r} does not exist "
                                "(create it first)")
    suffix = Path(path).suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).stem}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    return path


# ----------------------------------------------------------------------------- the re-exported program


def exportable_graph_module(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the pruned graph ready for re-export: no `_guards_fn` call (the re-export makes its
    own)."""
    gm = copy.deepcopy(graph_module)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def example_inputs_for(input_spec, batch: int = EXPORT_BATCH) -> tuple:
    inputs = []
    generator = torch.Generator().manual_seed(0)
    for spec in input_spec:
        if spec is None:
            raise ValueError("export needs tensor inputs; the model was compiled with a non-tensor input")
        shape, dtype, device = spec
        if dtype.is_floating_point:
            x = torch.randn((batch, *shape), generator=generator).to(dtype)
        else:
            x = torch.zeros((batch, *shape), dtype=dtype)
        inputs.append(x.to(device))
    return tuple(inputs)


def reexport(pruned, batch: int = EXPORT_BATCH) -> torch.export.ExportedProgram:
    """torch.export (non-strict, dynamic batch in [1, 65536]) of the pruned graph module."""
    inputs = example_inputs_for(pruned._input_spec, batch)
    dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    gm = exportable_graph_module(pruned.graph_module)
    with torch.no_grad():
        return torch.export.export(gm, inputs, dynamic_shapes=tuple({0: dim} for _ in inputs), strict=False)


# ----------------------------------------------------------------------------- formats


def export_pruned(pruned, path, format: Optional[str] = None, **options) -> str:
    """Write `pruned` to `path` in `format` (default: from the suffix); returns the path."""
    fmt = resolve_format(path, format)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):  # fail before the (slow) export
        raise ExportFolderError(f"cannot export to {os.fspath(path)!r}: the folder {folder!r} does not exist "
                                "(create it first)")
    if fmt == "pt2":
        _no_options("pt2", options)
        program = reexport(pruned)
        return atomic_write(path, lambda tmp: torch.export.save(program, tmp))
    if fmt == "onnx":
        from .onnxruntime_backend import onnx_program
        program = onnx_program(pruned, **options)
        return atomic_write(path, lambda tmp: _save_onnx(program, tmp))
    from .tensorrt_backend import save_tensorrt
    return atomic_write(path, lambda tmp: save_tensorrt(pruned, tmp, suffix=Path(path).suffix.lower(), **options))


def _save_onnx(program, tmp: str) -> None:
    program.save(tmp, external_data=False)


def _no_options(fmt: str, options: dict) -> None:
    if options:
        raise TypeError(f"{fmt} export takes no options; got {sorted(options)}")
