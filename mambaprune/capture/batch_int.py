"""Keep the batch symbolic through `int(...)`: the builtin routed, for the duration of a capture.

A model that derives the batch with float arithmetic and `int` (MambaVision's window_reverse:
``B = int(windows.shape[0] / (H * W / window_size / window_size))``) makes torch.export specialise
the batch: `int` of a SymFloat must return a Python int, so the export guards on the example's
value. During a capture, `int` in the modules that define the model's classes (the same homes as the
scan routing) is replaced by `batch_int`: for a symbolic float that is an affine function of the
batch with rational coefficients (``(s * 4) / 4.0``, ``s / 1.0`` ...) it returns the same integer
as a SymInt computed from the batch with integer arithmetic (``(p * batch + c) // q``), so the
graph stays valid for every batch; anything else goes to the builtin unchanged (and may still
specialise: the capture then falls back to the example batch, capture.py).

Before:  windows.shape[0] / 1.0 -> SymFloat -> int() guards "batch == 3", graph for batch 3 only
After:   windows.shape[0] / 1.0 -> SymFloat -> batch_int() -> batch (SymInt), graph for any batch
"""
from __future__ import annotations

import builtins
import contextlib
import sys
from typing import Optional

import sympy
import torch
from torch.utils._sympy.functions import FloatTrueDiv, IntTrueDiv, ToFloat


@contextlib.contextmanager
def symbolic_batch_int(model: torch.nn.Module):
    """Route `int` in the model's modules to a batch-preserving int while the model is traced."""
    state: dict = {}
    hook = model.register_forward_pre_hook(lambda _module, args: state.update(batch=_batch_of(args)))
    routed = _batch_int(state)
    undo = []
    try:
        for namespace in _model_namespaces(model):
            if "int" in vars(namespace):   # the module defines its own int: leave it alone
                continue
            namespace.int = routed
            undo.append(namespace)
        yield
    finally:
        hook.remove()
        for namespace in undo:
            del namespace.int


def _model_namespaces(model: torch.nn.Module) -> list:
    """The modules defining the classes of the model's layers (skipping torch's own)."""
    names = {klass.__module__ for module in model.modules() for klass in type(module).__mro__}
    return [sys.modules[n] for n in sorted(names) if n in sys.modules and not n.startswith(("torch.", "builtins"))
            and n != "torch"]


def _batch_of(args: tuple):
    return next((x.shape[0] for x in args if isinstance(x, torch.Tensor) and x.dim() > 0), None)


def _batch_int(state: dict):
    def batch_int(x=0, *args, **kwargs):
        if isinstance(x, torch.SymFloat) and not args and not kwargs:
            exact = affine_in_batch(x, state.get("batch"))
            if exact is not None:
                return exact
        return builtins.int(x, *args, **kwargs)
    return batch_int


def affine_in_batch(x: torch.SymFloat, batch) -> Optional[torch.SymInt]:
    """int(x) as a SymInt of `batch` when x is exactly (p * batch + c) / q with integers p > 0, q > 0
    and c >= -p (non-negative at every batch >= 1, where int's truncation is //'s floor); else None.
    The value is the exact one: where float rounding would make int() of the model's own float
    arithmetic one less (x / 3.0 * 3.0), the routed int is right and the model's was not."""
    if not isinstance(batch, torch.SymInt):
        return None
    symbol = batch.node.expr
    value = sympy.expand(_exact(x.node.expr))
    if not value.free_symbols <= {symbol} or not value.is_polynomial(symbol):
        return None
    poly = sympy.Poly(value, symbol)
    if poly.degree() > 1 or not all(c.is_rational for c in poly.all_coeffs()):
        return None
    slope, offset = sympy.Rational(poly.coeff_monomial(symbol)), sympy.Rational(poly.coeff_monomial(1))
    q = sympy.ilcm(slope.q, offset.q)
    p, c = builtins.int(slope * q), builtins.int(offset * q)
    if p <= 0:   # not the batch (a constant), or a decreasing one: the builtin
        return None
    if p + c < 0:   # negative at batch 1, where int() truncates towards zero and // floors
        return None
    result = batch * p + c if p != 1 or c else batch
    return result // q if q != 1 else result


def _exact(expr):
    """The sympy expression of a SymFloat with torch's float wrappers removed and floats made rational."""
    expr = expr.replace(ToFloat, lambda a: a)
    expr = expr.replace(FloatTrueDiv, lambda a, b: a / b).replace(IntTrueDiv, lambda a, b: a / b)
    return sympy.nsimplify(expr, rational=True)
