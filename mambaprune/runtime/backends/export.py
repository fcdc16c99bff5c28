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
``os.replace``: an existing file is only ever replaced by a complete new one. The temporary file is
made before the conversion runs (a missing or read-only folder fails at once, naming the folder),
and the written file gets the mode a plain ``open(path, "w")`` would give it (0666 & ~umask), or
keeps the mode of the file it replaces.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx as fx

from ...errors import ExportPathError, InvalidArgumentError, InvalidArgumentTypeError
from ..torch_logs import torch_logs_held


FORMATS = ("onnx", "pt2", "tensorrt")
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".engine": "tensorrt", ".ts": "tensorrt"}
EXPORT_BATCH = 2
MAX_BATCH = 1 << 16


def resolve_format(path, format: Optional[str]) -> str:
    suffix = Path(path).suffix.lower()
    if format is not None:
        if format not in FORMATS:
            raise InvalidArgumentError(f"unknown export format {format!r}; expected one of {FORMATS} "
                                       f"(or a path ending in one of {tuple(SUFFIXES)})")
        if suffix in SUFFIXES and SUFFIXES[suffix] != format:
            raise InvalidArgumentError(
                f"export format {format!r} disagrees with the path {str(path)!r}, whose suffix {suffix} means "
                f"{SUFFIXES[suffix]!r}: give the path a suffix of that format or leave format= out")
        return format
    if suffix not in SUFFIXES:
        raise InvalidArgumentError(f"cannot tell the export format from {str(path)!r}: the suffix must be one of "
                         f"{tuple(SUFFIXES)} ({', '.join(f'{s} -> {f}' for s, f in SUFFIXES.items())}), "
                         f"or pass format= one of {FORMATS}")
    return SUFFIXES[suffix]


class ExportFolderError(ExportPathError, InvalidArgumentError, FileNotFoundError):
    """The folder an export should be written to does not exist."""


def reserve_temporary(path) -> str:
    """A new empty temporary file next to `path` (made before the slow conversion): ExportPathError
    naming the folder when it is missing or cannot be written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportFolderError(f"cannot export to {path!r}: the folder {folder!r} does not exist "
                                "(create it first)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).stem}.", suffix=f".tmp{Path(path).suffix}", dir=folder)
    except OSError as err:
        raise ExportPathError(f"cannot export to {path!r}: the folder {folder!r} cannot be written "
                              f"({err.strerror or err}): choose a folder you can write to") from None
    os.close(fd)
    return tmp


def atomic_write(path, write: Callable[[str], None], tmp: Optional[str] = None) -> str:
    """Call write(tmp) for a temporary file next to `path` (`tmp` from `reserve_temporary`, or a new
    one), then os.replace it onto `path` with the mode of the file it replaces, or 0666 & ~umask.

    On any error the temporary file is removed and `path` (if it existed) is left untouched.
    """
    path = os.fspath(path)
    tmp = tmp or reserve_temporary(path)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        discard_temporary(tmp)
        raise
    return path


def discard_temporary(tmp: str) -> None:
    for leftover in (tmp, tmp + ".data"):
        if os.path.exists(leftover):
            os.remove(leftover)


def _mode_for(path: str) -> int:
    """The permission bits of the file at `path`, or those a new file gets (0666 & ~umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


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
            raise InvalidArgumentError("export needs tensor inputs; the model was compiled with a non-tensor input")
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
    with torch.no_grad(), torch_logs_held():
        return torch.export.export(gm, inputs, dynamic_shapes=tuple({0: dim} for _ in inputs), strict=False)


# ----------------------------------------------------------------------------- formats


def export_pruned(pruned, path, format: Optional[str] = None, **options) -> str:
    """Write `pruned` to `path` in `format` (default: from the suffix); returns the path."""
    fmt = resolve_format(path, format)
    if fmt == "pt2":
        _no_options("pt2", options)
    tmp = reserve_temporary(path)  # fail before the (slow) conversion
    try:
        if fmt == "pt2":
            program = reexport(pruned)
            return atomic_write(path, lambda tmp: torch.export.save(program, tmp), tmp)
        if fmt == "onnx":
            from .onnxruntime_backend import onnx_program
            with torch_logs_held():
                program = onnx_program(pruned, **options)
            return atomic_write(path, lambda tmp: _save_onnx(program, tmp), tmp)
        from .tensorrt_backend import save_tensorrt
        suffix = Path(path).suffix.lower()
        return atomic_write(path, lambda tmp: save_tensorrt(pruned, tmp, suffix=suffix, **options), tmp)
    finally:
        discard_temporary(tmp)


def _save_onnx(program, tmp: str) -> None:
    program.save(tmp, external_data=False)


def _no_options(fmt: str, options: dict) -> None:
    if options:
        raise InvalidArgumentTypeError(f"{fmt} export takes no options; got {sorted(options)}")
