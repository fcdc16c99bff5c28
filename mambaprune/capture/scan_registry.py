"""Scan entry points the compiler can see, and `register_scan` for the ones it cannot.

Before export, every known scan function referred to by the model's code (a global of the module
that defines a layer, or a method of a layer's class) is temporarily replaced by an adapter that
computes the same thing through `mambaprune::selective_scan` (Mamba-2 / SSD entry points:
`mambaprune::ssd_scan`, ssd_adapters.py), so each scan becomes ONE graph node.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import sys

from ..errors import InvalidArgumentTypeError
from . import scan_adapters, ssd_adapters, vmamba_adapters


@dataclass(frozen=True)
class ScanEntry:
    fn: Callable
    adapter: Callable
    origin: str
    autograd_function: bool = False   # fn is a torch.autograd.Function class: its `.apply` is routed


_USER_ENTRIES: list = []


def register_scan(fn: Callable, adapter: Callable) -> Callable:
    """Declare a scan function the compiler should route to `mambaprune::selective_scan`.

    `adapter` takes exactly the arguments `fn` takes (for a method: the module first, like `self`)
    and returns the same value, computed with `mambaprune.selective_scan`. Returns `fn`, so this
    works as `register_scan(MyMixer.scan, my_adapter)`. Registering the same function again replaces
    its adapter.

    Example::

        def loop_scan(u, delta, A, B, C, D):          # (batch, L, D) layout, a Python loop
            ...
        def adapter(u, delta, A, B, C, D):
            y = mambaprune.selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A,
                                          B.transpose(1, 2), C.transpose(1, 2), D)
            return y.transpose(1, 2)
        mambaprune.register_scan(loop_scan, adapter)
    """
    if not callable(fn) or not callable(adapter):
        raise InvalidArgumentTypeError("register_scan(fn, adapter) needs two callables: the model's scan and its adapter")
    unregister_scan(fn)
    _USER_ENTRIES.append(ScanEntry(fn, adapter, "register_scan"))
    return fn


def unregister_scan(fn: Callable) -> None:
    _USER_ENTRIES[:] = [e for e in _USER_ENTRIES if e.fn is not fn]


def known_entries() -> list:
    """Built-in entries for the libraries that are importable here, then the user's."""
    return builtin_entries() + list(_USER_ENTRIES)


def builtin_entries() -> list:
    entries = []
    for module_name, attr, adapter in scan_adapters.BUILTIN + ssd_adapters.BUILTIN:
        fn = _resolve(module_name, attr)
        if fn is not None:
            entries.append(ScanEntry(fn, adapter, f"{module_name}.{attr}"))
    return entries + _entries_by_module_tail()


def _entries_by_module_tail() -> list:
    """VMamba's csms6s / csm_triton entry points, in every imported module of that name (any package)."""
    tails = {tail for tail, *_ in vmamba_adapters.BY_MODULE_TAIL}
    entries = []
    for name, module in list(sys.modules.items()):
        tail = name.rsplit(".", 1)[-1]
        if tail not in tails or module is None:
            continue
        for want, attr, adapter, is_function in vmamba_adapters.BY_MODULE_TAIL:
            fn = vars(module).get(attr) if want == tail else None
            if fn is not None and getattr(fn, "__module__", None) == name:
                entries.append(ScanEntry(fn, adapter, f"{name}.{attr}", is_function))
    return entries


def _resolve(module_name: str, attr: str):
    try:
        obj = importlib.import_module(module_name)
    except Exception:  # an optional library missing or broken (mamba_ssm's CUDA imports) is simply absent
        return None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
