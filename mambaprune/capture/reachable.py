"""Callables the model's code can reach, and how to replace each one for the length of a capture.

A scan the routing cannot name (scan_registry) may still be reached: a function stored on a layer
(`self.scan = partial(kernel, ...)` in __init__), a method, a global of the module defining a
layer or of a function it calls (a vendored copy of a kernel under another module name), a closure
cell of a method, an autograd Function class (`SelectiveScan.apply`, also one bound into a
partial, and what its forward calls), or a compiled extension's function reached through its module
(`selective_scan_cuda.fwd`). `reachable_sites` lists every such place holding a callable that could
take the five tensors of a scan; a `Site` replaces the callable there and puts it back (`undo`). Library code
(torch, mambaprune, ...) is never a candidate.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch

_LIBRARIES = {"torch", "mambaprune", "numpy", "einops", "functools", "builtins", "typing", "collections", "math",
              "copy", "inspect", "timm", "triton", "contextlib", "warnings", "abc", "operator", "itertools"}
_MIN_ARGUMENTS = 5      # u, delta, A, B, C
_DEPTH = 4              # how far calls are followed from a layer's methods


@dataclass
class Site:
    """A place holding a callable: `install(replacement)` puts another there, `undo()` the original back."""

    where: str
    original: Callable       # what a call through this place calls (a bound method for methods)
    install: Callable
    undo: Callable


def reachable_sites(model: torch.nn.Module) -> list:
    finder = _Finder()
    for name, module in model.named_modules():
        owner = name or type(module).__name__
        finder.module_methods(module, owner, is_root=not name)
        finder.instance_attributes(module, owner, is_root=not name)
    return finder.sites


class _Finder:
    def __init__(self):
        self.sites: list = []
        self.seen: set = set()          # ids of explored objects
        self.places: set = set()        # (id(container), key) already made sites
        self.functions: set = set()     # autograd Function classes already made sites

    # -- where a layer keeps callables --------------------------------------------------------------
    def module_methods(self, module, owner: str, is_root: bool) -> None:
        for klass in type(module).__mro__:
            if _is_library(klass):
                continue
            for attr, value in vars(klass).items():
                fn = value.__func__ if isinstance(value, staticmethod) else value
                if not isinstance(fn, types.FunctionType) or attr.startswith("__"):
                    continue
                self.explore(fn, 0)
                if (is_root and attr == "forward") or attr in vars(module) or \
                        not _takes_scan_arguments(fn, skip=0 if isinstance(value, staticmethod) else 1):
                    continue
                bound = fn if isinstance(value, staticmethod) else types.MethodType(fn, module)
                self._add(module.__dict__, attr, f"{owner}.{attr}", bound,
                          lambda new, m=module, a=attr: object.__setattr__(m, a, new),
                          lambda m=module, a=attr: m.__dict__.pop(a, None))

    def instance_attributes(self, module, owner: str, is_root: bool) -> None:
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") and attr.endswith("_") or isinstance(value, (torch.nn.Module, torch.Tensor)) or \
                    (is_root and attr == "forward"):
                continue
            self.value(value, module.__dict__, attr, f"{owner}.{attr}",
                       lambda new, m=module, a=attr: object.__setattr__(m, a, new),
                       lambda m=module, a=attr, v=value: object.__setattr__(m, a, v), 0)

    # -- following what a function refers to ------------------------------------------------------
    def explore(self, fn, depth: int) -> None:
        if id(fn) in self.seen or depth > _DEPTH or _is_library(fn):
            return
        self.seen.add(id(fn))
        code, namespace = fn.__code__, fn.__globals__
        names = _names(code)
        for name in names:
            value = namespace.get(name)
            if isinstance(value, types.ModuleType):
                self.module_attributes(value, names, depth + 1)
            elif value is not None:
                where = f"{namespace.get('__name__', '?')}.{name}"
                self.value(value, namespace, name, where, lambda new, ns=namespace, n=name: ns.__setitem__(n, new),
                           lambda ns=namespace, n=name, v=value: ns.__setitem__(n, v), depth + 1)
        for var, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            where = f"{fn.__qualname__}.<closure {var}>"
            self.value(value, cell, "cell_contents", where,
                       lambda new, c=cell: setattr(c, "cell_contents", new),
                       lambda c=cell, v=value: setattr(c, "cell_contents", v), depth + 1)

    def module_attributes(self, module: types.ModuleType, names: set, depth: int) -> None:
        """`kernels.scan(...)` through an imported module (not a library): the module's attribute is the place."""
        if _is_library_module(module.__name__):
            return
        for name in sorted(names & set(vars(module))):
            value = vars(module)[name]
            self.value(value, module.__dict__, name, f"{module.__name__}.{name}",
                       lambda new, m=module, n=name: setattr(m, n, new),
                       lambda m=module, n=name, v=value: setattr(m, n, v), depth)

    def value(self, value, container, key, where: str, install, undo, depth: int) -> None:
        """A callable found in a container: explore it, and make the place a site if it may be a scan."""
        if _is_function_class(value):
            self._function_class(value, depth)
            return
        if isinstance(value, functools.partial):
            for inner in list(value.args) + list(value.keywords.values()):
                if _is_function_class(inner):
                    self._function_class(inner, depth)
            self.value(value.func, None, None, where, None, None, depth)
        elif isinstance(value, types.MethodType) and not isinstance(value.__self__, type):
            self.explore(value.__func__, depth)
        elif isinstance(value, types.FunctionType):
            self.explore(value, depth)
        elif not isinstance(value, types.BuiltinFunctionType):   # a compiled extension's function: a leaf
            return
        target = value.func if isinstance(value, functools.partial) else value
        if container is not None and not _is_library(value) and _takes_scan_arguments(target, skip=0):
            self._add(container, key, where, value, install, undo)

    def _add(self, container, key, where, original, install, undo) -> None:
        place = (id(container), key)
        if place not in self.places:
            self.places.add(place)
            self.sites.append(Site(where, original, install, undo))

    def _function_class(self, cls, depth: int) -> None:
        """`Cls.apply(...)` reaches the class wherever it is referred to: its `apply` is the site, and what its
        forward calls is explored (a compiled extension's fwd inside: Mamba-R's MambaInnerFnCustom)."""
        if cls in self.functions or _is_library(cls):
            return
        forward = vars(cls).get("forward")
        forward = forward.__func__ if isinstance(forward, staticmethod) else forward
        if isinstance(forward, types.FunctionType):
            self.explore(forward, depth)
        if not _takes_scan_arguments(cls.forward, skip=1):
            return
        self.functions.add(cls)
        had = "apply" in vars(cls)
        previous = vars(cls).get("apply")

        def undo(c=cls):
            if had:
                setattr(c, "apply", previous)
            else:
                delattr(c, "apply")
        self.sites.append(Site(f"{cls.__module__}.{cls.__qualname__}.apply", cls.apply,
                               lambda new, c=cls: setattr(c, "apply", staticmethod(new)), undo))


def _names(code) -> set:
    """Global names a code object (and the functions, lambdas, comprehensions inside it) looks up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _is_function_class(value) -> bool:
    return isinstance(value, type) and issubclass(value, torch.autograd.Function)


def _is_library(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    if isinstance(obj, functools.partial):
        module = getattr(obj.func, "__module__", None) or ""
    return _is_library_module(module)


def _is_library_module(name: str) -> bool:
    return name.split(".", 1)[0] in _LIBRARIES


def _takes_scan_arguments(fn, skip: int) -> bool:
    """Whether fn can take at least u, delta, A, B, C (`skip`: leading self / ctx parameters)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):  # no signature: a compiled extension's function may take them (probed if so)
        return isinstance(fn, types.BuiltinFunctionType)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    return sum(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters) >= _MIN_ARGUMENTS
