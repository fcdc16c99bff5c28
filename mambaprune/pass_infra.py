"""torch.fx's pass infrastructure, as the pipeline uses it.

Every stage after capture is a `GraphPass` (torch.fx's `PassBase`: `requires -> call -> ensures`)
and runs under torch.fx's `PassManager`, so a broken invariant names the pass that broke it. Two
adjustments, both small:
- `PassBase.__call__` checks `ensures` on the pass's input; a pass that returns a new module
  (the rewrite never edits its input) must check the module it returns, so `GraphPass` does.
- `PassManager` wraps every exception in a plain `Exception` naming the pass; `run_passes` lets
  the library's own errors (a refusal the user must read) through unwrapped, and keeps the
  wrapped form, with the pass's name, for everything else (a bug, a broken invariant).

torch.fx keeps the generated source of every GraphModule it ever compiled (`_loader.eval_cache`
and linecache), and a pipeline recompiles often (the PassManager after every pass): without
`generated_code_released` every compile would leave about a megabyte behind for good.
"""
from __future__ import annotations

import contextlib
import linecache
import weakref
from typing import Sequence

import torch.fx as fx
import torch.fx.graph_module as fx_graph_module
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from .errors import MambapruneError

__all__ = ["GraphPass", "PassResult", "InvariantError", "generated_code_released", "run_passes"]


class InvariantError(AssertionError):
    """A pass's precondition or postcondition does not hold (a bug in mambaprune)."""


class GraphPass(PassBase):
    """A pass whose `ensures` sees the module it returns."""

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    @property
    def __name__(self) -> str:  # PassManager names passes by __name__ or type name
        return type(self).__name__


def run_passes(passes: Sequence, graph_module: fx.GraphModule) -> PassResult:
    """Run `passes` once, in order, under torch.fx's PassManager."""
    try:
        return PassManager(list(passes))(graph_module)
    except Exception as err:
        cause = err.__cause__
        if isinstance(cause, MambapruneError):
            raise cause.with_traceback(cause.__traceback__) from None
        raise


def _code_key(gm: fx.GraphModule):
    forward = getattr(type(gm), "forward", None)
    code = getattr(forward, "__code__", None)
    return code.co_filename if code is not None else None


def _forget(key: str) -> None:
    loader = getattr(fx_graph_module, "_loader", None)
    if loader is not None:
        loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)


@contextlib.contextmanager
def generated_code_released():
    """Drop the generated source of the GraphModules compiled inside the block, but for the ones
    passed to the yielded `keep(gm)`: theirs is dropped when they are garbage collected."""
    loader = getattr(fx_graph_module, "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    if not isinstance(cache, dict):      # another torch: nothing to release
        yield lambda gm: gm
        return
    before, kept = set(cache), []

    def keep(gm: fx.GraphModule) -> fx.GraphModule:
        kept.append(gm)
        return gm

    try:
        yield keep
    finally:
        keys = {_code_key(gm): gm for gm in kept}
        for key in set(cache) - before:
            if key in keys:
                weakref.finalize(keys[key], _forget, key)
            else:
                _forget(key)
