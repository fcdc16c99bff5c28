"""mambaprune: token pruning for vision state-space models, as a graph compiler.

    >>> from mambaprune import compile_pruned, create_model
    >>> fast = compile_pruned(create_model("vim_t"), ratio=0.3)

The pipeline, one folder per stage: capture/ -> analysis/ -> planning/ -> rewrite/ -> search/ ->
api/, with runtime/ (ops, kernels, backends) as the leaf and models/, data/ beside.
"""
from .api import PrunedModel, compile_pruned, recover
from .capture import register_scan, unregister_scan
from .errors import (BatchSizeError, ExportPathError, FrozenArgumentError, ImageFolderError, InputMismatchError,
                     InvalidArgumentError, InvalidArgumentTypeError, MambapruneError, MissingDependencyError,
                     ServerError, TokenRuleError, UnreachableRatioError, UnsupportedModelError)
from .runtime import selective_scan, ssd_scan

__version__ = "0.1.0"


def create_model(name: str, **overrides):
    """Build a reference architecture by name (see mambaprune.models.list_models())."""
    from .models import create_model as _create
    return _create(name, **overrides)


__all__ = ["compile_pruned", "recover", "PrunedModel", "register_scan", "unregister_scan", "selective_scan", "create_model",
           "ssd_scan", "MambapruneError", "UnsupportedModelError", "UnreachableRatioError", "MissingDependencyError",
           "TokenRuleError", "BatchSizeError", "InvalidArgumentError", "InvalidArgumentTypeError", "InputMismatchError",
           "FrozenArgumentError", "ExportPathError", "ImageFolderError", "ServerError",
           "__version__"]
