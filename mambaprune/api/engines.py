"""The api's door to deployment/: the export function and the engines behind ``backend=``.

deployment/ (export formats, ONNX Runtime, TensorRT, serving) sits above the api: it needs the
PrunedModel. The api still offers ``PrunedModel.export`` and ``compile_pruned(backend=...)``, so it
reaches deployment through this registry, which ``mambaprune.deployment`` fills when it is imported
(dependency inversion: no api module names a deployment module, imports go only downward).
``mambaprune``'s public names import deployment with the api; a program that imported only
``mambaprune.api`` gets it loaded on the first lookup (``_load_deployment``).

Why a registry rather than function-level imports of deployment in the api: a new engine or format
(deployment/triton/, ...) registers itself without touching the api, and the layering test keeps
refusing every import of a layer above.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import InvalidArgumentError
from ..settings import Backend


@dataclass(frozen=True)
class Engine:
    """How a ``backend=`` choice runs: ``require()`` fails fast when its package is missing,
    ``runner(pruned)`` returns the callable that runs the pruned model."""

    require: Callable[[], None]
    runner: Callable


_ENGINES: dict = {}
_EXPORTER: list = []      # the one export function: (pruned, path, format, **options) -> path
DEPLOYMENT_PACKAGE = "mambaprune.deployment"


def register_engine(backend, require: Callable[[], None], runner: Callable) -> None:
    """Register (or replace) the engine that runs ``backend`` (a Backend or its string)."""
    _ENGINES[Backend.parse(backend, "backend")] = Engine(require, runner)


def register_exporter(export: Callable) -> None:
    """Register the function behind ``PrunedModel.export`` (deployment/export.py's export_pruned)."""
    _EXPORTER[:] = [export]


def engine_for(backend: Backend) -> Optional[Engine]:
    """The registered engine of ``backend``; None for the in-process backends (eager, inductor)."""
    if backend in (Backend.EAGER, Backend.INDUCTOR):
        return None
    if backend not in _ENGINES:
        _load_deployment()
    if backend not in _ENGINES:
        raise InvalidArgumentError(f"no engine is registered for backend={backend.value!r}: {DEPLOYMENT_PACKAGE} "
                                   f"registers {sorted(b.value for b in _ENGINES)}")
    return _ENGINES[backend]


def exporter() -> Callable:
    if not _EXPORTER:
        _load_deployment()
    return _EXPORTER[0]


def _load_deployment() -> None:
    """Import deployment/ by name, once: it registers its engines and exporter on import. The only
    place the api refers to the layer above, and only by name (a plug-in lookup, not an import)."""
    importlib.import_module(DEPLOYMENT_PACKAGE)
