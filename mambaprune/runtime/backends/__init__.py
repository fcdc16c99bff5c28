"""Deployment backends of a pruned model: export formats (.pt2, ONNX, TensorRT) and runtime wrappers.

- ``export.py``: ``PrunedModel.export`` (format from the suffix or ``format=``, atomic writes), the
  re-exported program (torch.export, dynamic batch) every format starts from.
- ``onnx_ops.py``: ONNX translations of the ``mambaprune::`` custom ops (onnxscript).
- ``onnxruntime_backend.py``: ONNX export and ``backend="onnxruntime"``.
- ``tensorrt_backend.py``: torch-tensorrt compilation and ``backend="tensorrt"``.

Optional dependencies (onnx, onnxscript, onnxruntime, torch-tensorrt) are imported only when used;
a missing one raises ``mambaprune.errors.MissingDependencyError`` naming the package.
"""

from .export import FORMATS, SUFFIXES, atomic_write, export_pruned, exportable_graph_module, reexport, resolve_format

__all__ = ["FORMATS", "SUFFIXES", "atomic_write", "export_pruned", "exportable_graph_module", "reexport",
           "resolve_format"]
