"""One place that defines the ``mambaprune`` custom ops: schema, kernel, fake kernel, autograd.

The ops are defined with ``torch.library.Library`` rather than the ``torch.library.custom_op``
decorator. Both give the same op to the dispatcher, torch.export, torch.compile and FlopCounterMode,
but the decorator wraps every call in more Python (an aliasing check, a dynamo guard): at ViM-T's
batch-1 shapes on the project's CPU VM, 57 against 51 us per pos_conv1d call and 38 against 25 us
per path_order call (``python benchmarks/op_overhead.py``), paid 2-3 times per Mamba block, where the
ops' arithmetic itself takes tens of microseconds.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

NAMESPACE = "mambaprune"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(
    name: str,
    schema: str,
    kernel: Callable,
    fake: Callable,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
) -> torch._ops.OpOverload:
    """Define ``mambaprune::name`` (``schema`` is its signature, e.g. "(Tensor x, int k) -> Tensor") with
    ``kernel`` for every device, ``fake`` for tracing and, when given, ``backward`` / ``setup_context``
    as in ``torch.library.register_autograd``. Returns the op's default overload."""
    _LIBRARY.define(f"{name}{schema}")
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIBRARY)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
