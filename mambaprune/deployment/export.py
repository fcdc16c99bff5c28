"""``PrunedModel.export``: format dispatch, the re-exported program, and atomic writes.

Formats (from the path's suffix, or ``format=``):

- ``"pt2"`` (``.pt2``): ``torch.export.save`` of the pruned program re-exported with a dynamic batch
  (``torch.export.load(path).module()(x)`` runs it; our custom ops must be registered, i.e.
  ``import mambaprune.runtime.op_library`` first).
- ``"aoti"`` (``format="aoti"``, a ``.pt2`` path): an AOTInductor package, compiled ahead of time
  (``aoti.py``); a plain ``.pt2`` path stays ``"pt2"``: the two formats share torch's suffix.
- ``"onnx"`` (``.onnx``): ``torch.onnx.export(dynamo=True)`` with our ops translated to standard ONNX
  (``onnx_ops``), dynamic batch, checked with ``onnx.checker.check_model``.
- ``"tensorrt"`` (``.engine``, ``.ts``): torch-tensorrt with our ops left to PyTorch
  (``tensorrt_backend``).
- ``"triton"`` (``format="triton"``, a folder): a Triton Inference Server model repository
  (``triton/repository.py``: config.pbtxt, the model's .pt2 and the python backend's model.py).

A file format is written to a temporary file in the target folder and moved into place with
``os.replace``; a folder format (``folder=True``: the Triton repository) writes its own folder, as
atomically as a folder can be replaced (a complete new one renamed into place).

An existing file is only ever replaced by a complete new one. The temporary file is
made before the conversion runs (a missing or read-only folder fails at once, naming the folder),
and the written file gets the mode a plain ``open(path, "w")`` would give it (0666 & ~umask), or
keeps the mode of the file it replaces.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..errors import ExportPathError, InvalidArgumentError, InvalidArgumentTypeError
from ..runtime.torch_logs import torch_logs_held


EXPORT_BATCH = 2
MAX_BATCH = 1 << 16


@dataclass(frozen=True)
class Format:
    """An export format: ``write(pruned, tmp, path, **options)`` writes the file ``tmp`` (moved onto
    ``path`` afterwards); ``suffixes`` mean this format when ``format=`` is left out; ``accepts``
    are further suffixes it may be written to with ``format=`` (an AOTInductor package is a .pt2).
    A ``folder`` format writes a folder: ``write(pruned, path, **options)`` makes it, atomically."""

    name: str
    suffixes: tuple
    write: Callable
    accepts: tuple = ()
    folder: bool = False


_FORMATS: dict = {}


def register_format(name: str, suffixes: tuple, write: Callable, accepts: tuple = (), folder: bool = False) -> None:
    """Add (or replace) an export format; a deployment subpackage calls it when imported."""
    _FORMATS[name] = Format(name, tuple(s.lower() for s in suffixes), write, tuple(s.lower() for s in accepts),
                            folder)


def is_folder_format(name: str) -> bool:
    return _FORMATS[name].folder


def formats() -> tuple:
    return tuple(sorted(_FORMATS))


def suffixes() -> dict:
    """{suffix: the format it means}."""
    return {suffix: f.name for f in _FORMATS.values() for suffix in f.suffixes}


def resolve_format(path, format: Optional[str]) -> str:
    suffix, by_suffix = Path(path).suffix.lower(), suffixes()
    if format is not None:
        if format not in _FORMATS:
            raise InvalidArgumentError(f"unknown export format {format!r}; expected one of {formats()} "
                                       f"(or a path ending in one of {tuple(by_suffix)})")
        if suffix in by_suffix and by_suffix[suffix] != format and suffix not in _FORMATS[format].accepts:
            raise InvalidArgumentError(
                f"export format {format!r} disagrees with the path {str(path)!r}, whose suffix {suffix} means "
                f"{by_suffix[suffix]!r}: give the path a suffix of that format or leave format= out")
        return format
    if suffix not in by_suffix:
        raise InvalidArgumentError(f"cannot tell the export format from {str(path)!r}: the suffix must be one of "
                         f"{tuple(by_suffix)} ({', '.join(f'{s} -> {f}' for s, f in by_suffix.items())}), "
                         f"or pass format= one of {formats()}")
    return by_suffix[suffix]


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
    fmt = _FORMATS[resolve_format(path, format)]
    if fmt.folder:
        fmt.write(pruned, path, **options)
        return os.fspath(path)
    tmp = reserve_temporary(path)  # fail before the (slow) conversion
    try:
        return atomic_write(path, lambda tmp: fmt.write(pruned, tmp, os.fspath(path), **options), tmp)
    finally:
        discard_temporary(tmp)


def _write_pt2(pruned, tmp: str, path: str, **options) -> None:
    _no_options("pt2", options)
    program = reexport(pruned)
    torch.export.save(program, tmp)


def _no_options(fmt: str, options: dict) -> None:
    if options:
        raise InvalidArgumentTypeError(f"{fmt} export takes no options; got {sorted(options)}")


register_format("pt2", (".pt2",), _write_pt2)     # the others register themselves: aoti.py, onnxruntime_backend.py,
#                                                   tensorrt_backend.py, triton/ (imported by the package)
