"""Tensor subclasses that only restate what a tensor says, read as plain tensors during a capture.

Some published code wraps tensors in a subclass of torch.Tensor that changes nothing but how a
property reads: VSSD's `tTensor`, whose `shape` is a tuple of Python ints, wraps x, dt, A, B and C
before its SSD. torch.export cannot trace such a construction (`tTensor(x)` inside forward), so the
model could not be captured at all. A subclass defined in the model's code (not a library's) is
read as the plain tensor it wraps when its class adds nothing but properties (no methods, no
`__torch_function__` / `__torch_dispatch__`, no `__new__` / `__init__`), and each property, read on a
probe instance, equals what torch.Tensor's own attribute of that name gives (a shape of ints equals
the torch.Size it came from). Where the model's code names it (a global of the module that defines
one of its layers), the class is replaced, for the length of the capture, by a stand-in whose
construction returns its tensor argument; everything is put back afterwards, on error too.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch

_BOOKKEEPING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                "__firstlineno__", "__static_attributes__", "__parameters__", "__orig_bases__"}


@dataclass(frozen=True)
class Unwrapped:
    name: str        # module.Class
    properties: tuple

    def __str__(self) -> str:
        return f"{self.name} (a torch.Tensor subclass restating {', '.join(self.properties)}) read as a plain tensor"


class _Plain:
    """Stands in for a restating subclass: constructing it gives back the tensor it was given."""

    def __new__(cls, data=None, *args, **kwargs):
        if isinstance(data, torch.Tensor) and not args and not kwargs:
            return data
        raise TypeError("a restating Tensor subclass stand-in takes one tensor")


@contextlib.contextmanager
def plain_tensor_subclasses(model: torch.nn.Module):
    """Yields the Unwrapped subclasses; the globals naming them hold `_Plain` until the block ends."""
    undo, found = [], {}
    try:
        for namespace in _namespaces(model):
            for name, value in list(namespace.items()):
                if isinstance(value, type) and value is not _Plain and _restates(value):
                    found.setdefault(value, Unwrapped(f"{value.__module__}.{value.__qualname__}", _properties(value)))
                    namespace[name] = _Plain
                    undo.append((namespace, name, value))
        yield list(found.values())
    finally:
        for namespace, name, value in reversed(undo):
            namespace[name] = value


def _namespaces(model: torch.nn.Module) -> list:
    """The globals of the modules that define the model's layers (their forward code looks names up there)."""
    out, seen = [], set()
    for module in model.modules():
        for klass in type(module).__mro__:
            if _is_library(klass):
                continue
            for value in vars(klass).values():
                fn = getattr(value, "__func__", value)
                if isinstance(fn, types.FunctionType) and id(fn.__globals__) not in seen:
                    seen.add(id(fn.__globals__))
                    out.append(fn.__globals__)
    return out


def _is_library(klass: type) -> bool:
    root = (klass.__module__ or "").split(".")[0]
    return root in ("torch", "mambaprune", "builtins", "timm", "einops")


def _properties(klass: type) -> tuple:
    return tuple(name for name, value in vars(klass).items() if isinstance(value, property))


def _restates(klass: type) -> bool:
    """A user-defined Tensor subclass adding only properties that agree with torch.Tensor's on a probe."""
    if not issubclass(klass, torch.Tensor) or klass is torch.Tensor or _is_library(klass):
        return False
    own = {name: value for c in klass.__mro__[:klass.__mro__.index(torch.Tensor)] for name, value in vars(c).items()
           if name not in _BOOKKEEPING}
    if not own or any(not isinstance(value, property) for value in own.values()):
        return False
    try:
        probe = klass(torch.arange(24.0).reshape(2, 3, 4))
        base = torch.arange(24.0).reshape(2, 3, 4)
        return all(_same(getattr(probe, name), getattr(base, name)) for name in own)
    except Exception:  # noqa: BLE001 - a class that cannot be probed is not read as a plain tensor
        return False


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) in (int, float, bool, str, torch.dtype, torch.device) and a == b
