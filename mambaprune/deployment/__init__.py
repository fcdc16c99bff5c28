"""Deployment of a pruned model: export formats, engines and serving, above the api.

- ``export.py``: ``PrunedModel.export`` (format from the suffix or ``format=``, atomic writes), the
  re-exported program (torch.export, dynamic batch) every format starts from, and the format
  registry (``register_format``).
- ``aoti.py``: AOTInductor packages (``format="aoti"``), loadable with only the op library imported.
- ``onnx_ops.py``: ONNX translations of the ``mambaprune::`` custom ops (onnxscript).
- ``onnxruntime_backend.py``: ONNX export and ``backend="onnxruntime"``.
- ``tensorrt_backend.py``: torch-tensorrt compilation and ``backend="tensorrt"``.
- ``triton/``: NVIDIA Triton Inference Server: model repositories, ``serve``, its client.

The api reaches this layer only through its registry (``mambaprune.api.engines``), which importing
this package fills. A subpackage (e.g. ``deployment/triton/``) adds a format with
``register_format(name, suffixes, write)`` and an engine with ``register_engine(backend, require,
runner)`` in its own ``__init__``, and is imported below.

Optional dependencies (onnx, onnxscript, onnxruntime, torch-tensorrt) are imported only when used;
a missing one raises ``mambaprune.errors.MissingDependencyError`` naming the package.
"""

from ..api.engines import register_engine, register_exporter
from ..settings import Backend
from . import aoti, onnxruntime_backend, tensorrt_backend  # noqa: F401  register formats "aoti", "onnx", "tensorrt"
from .export import (atomic_write, export_pruned, exportable_graph_module, formats, is_folder_format, reexport,
                     register_format, resolve_format, suffixes)


def _onnxruntime_runner(pruned):
    from .onnxruntime_backend import onnxruntime_module
    return onnxruntime_module(pruned)


def _require_onnxruntime():
    from .onnxruntime_backend import require_onnxruntime
    require_onnxruntime()


def _write_triton(pruned, path, **options) -> None:
    from .triton.repository import write_model_repository
    write_model_repository(pruned, path, **options)


def _tensorrt_runner(pruned):
    from .tensorrt_backend import tensorrt_module
    return tensorrt_module(pruned)


def _require_tensorrt():
    from .tensorrt_backend import import_torch_tensorrt
    import_torch_tensorrt()


register_format("triton", (), _write_triton, folder=True)   # a model repository (deployment/triton/)
register_exporter(export_pruned)
register_engine(Backend.ONNXRUNTIME, _require_onnxruntime, _onnxruntime_runner)
register_engine(Backend.TENSORRT, _require_tensorrt, _tensorrt_runner)

__all__ = ["atomic_write", "export_pruned", "exportable_graph_module", "formats", "reexport", "suffixes",
           "register_format", "resolve_format", "is_folder_format"]
