"""mambaprune: token pruning for vision state-space models, as a graph compiler.

    >>> from mambaprune import compile_pruned, create_model
    >>> fast = compile_pruned(create_model("vim_t"), ratio=0.3)

The pipeline, one folder per stage: capture/ -> analysis/ -> planning/ -> rewrite/ -> search/ ->
api/ -> deployment/ (export formats, engines), with runtime/ (ops, kernels) as the leaf and models/,
data/ beside.

Importing the package is light: it loads the errors and the runtime ops (``mambaprune::`` custom
ops and their CPU kernels: all a deployed AOTInductor package or .pt2 program needs). The compiler
(api/ and the layers below it) and deployment/ load on first use of a public name
(``mambaprune.compile_pruned`` ...), PEP 562.
"""
import importlib

from .errors import (BatchSizeError, ExportPathError, FrozenArgumentError, ImageFolderError, InputMismatchError,
                     InvalidArgumentError, InvalidArgumentTypeError, MambapruneError, MissingDependencyError,
                     ServerError, TokenRuleError, UnreachableRatioError, UnsupportedModelError)
from .runtime import selective_scan, ssd_scan

__version__ = "0.1.0"

# public name -> the module that defines it (loaded on first access, with deployment/)
_LAZY = {"compile_pruned": "api", "recover": "api", "PrunedModel": "api",
         "register_scan": "capture", "unregister_scan": "capture"}
_SUBPACKAGES = {"analysis", "api", "capture", "data", "deployment", "models", "planning", "rewrite", "search",
                "visualize", "pass_infra", "settings", "meta_keys"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        importlib.import_module(".deployment", __name__)   # fills the api's engine registry
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_model(name: str, **overrides):
    """Build a reference architecture by name (see mambaprune.models.list_models())."""
    from .models import create_model as _create
    return _create(name, **overrides)


__all__ = ["compile_pruned", "recover", "PrunedModel", "register_scan", "unregister_scan", "selective_scan", "create_model",
           "ssd_scan", "MambapruneError", "UnsupportedModelError", "UnreachableRatioError", "MissingDependencyError",
           "TokenRuleError", "BatchSizeError", "InvalidArgumentError", "InvalidArgumentTypeError", "InputMismatchError",
           "FrozenArgumentError", "ExportPathError", "ImageFolderError", "ServerError",
           "__version__"]
