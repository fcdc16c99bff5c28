"""Routing: known scan entry points are replaced, for the duration of an export, by their adapters.

Where the model's code looks a scan function up (a method of a layer's class, a function stored
on a layer, a global of a module defining the model's classes, the function's own module), the
entry is temporarily replaced by an adapter that computes the same value with
`mambaprune::selective_scan`, and restored on exit, on error too. Each replacement records
whether it was called, so the report lists only the entry points the model actually used.
"""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass

import torch

from .scan_registry import ScanEntry, known_entries


@dataclass
class Route:
    """One replaced entry point: where it was, and whether the traced model called it."""

    where: str
    origin: str
    called: bool = False

    def __str__(self) -> str:
        return f"{self.where} ({self.origin})"


@contextlib.contextmanager
def route_scans(model: torch.nn.Module):
    """Replace known scan functions where the model's code looks them up; yields the Routes."""
    undo, routes = [], []
    try:
        for entry in known_entries():
            _route_methods(model, entry, undo, routes)
            _route_globals(model, entry, undo, routes)
        yield routes
    finally:
        for restore in reversed(undo):
            restore()


def _recording(adapter, route: Route):
    def routed(*args, **kwargs):
        route.called = True
        return adapter(*args, **kwargs)
    routed.__name__ = getattr(adapter, "__name__", "routed_scan")
    return routed


class _FunctionStandIn:
    """Takes the place of an autograd Function class (VMamba's CrossScanF ...): `.apply` is the adapter."""

    def __init__(self, apply, name: str):
        self.apply = apply
        self.__name__ = name


def _replacement(entry: ScanEntry, route: Route):
    recorded = _recording(entry.adapter, route)
    return _FunctionStandIn(recorded, entry.fn.__name__) if entry.autograd_function else recorded


def _route_methods(model, entry: ScanEntry, undo: list, routes: list) -> None:
    for name, module in model.named_modules():
        owner = name or type(module).__name__
        for attr, kind in ([] if entry.autograd_function else _class_attributes_holding(type(module), entry.fn)):
            route = Route(f"{owner}.{attr}", entry.origin)
            adapter = _recording(entry.adapter, route)
            bound = adapter if kind is staticmethod else types.MethodType(adapter, module)
            object.__setattr__(module, attr, bound)
            undo.append(lambda m=module, a=attr: m.__dict__.pop(a, None))
            routes.append(route)
        for attr, value in list(vars(module).items()):
            if value is entry.fn:  # e.g. `self.scan_fn = selective_scan_fn` stored on the instance
                route = Route(f"{owner}.{attr}", entry.origin)
                object.__setattr__(module, attr, _replacement(entry, route))
                undo.append(lambda m=module, a=attr, v=value: object.__setattr__(m, a, v))
                routes.append(route)


def _class_attributes_holding(cls, fn) -> list:
    """(name, kind) of class attributes that are `fn`: a plain method or a staticmethod wrapping it."""
    found, names = [], set()
    for klass in cls.__mro__:
        for attr, value in vars(klass).items():
            kind = type(value) if isinstance(value, (staticmethod, classmethod)) else None
            inner = value.__func__ if kind else value
            if inner is fn and attr not in names and kind is not classmethod:
                found.append((attr, kind))
                names.add(attr)
    return found


def _route_globals(model, entry: ScanEntry, undo: list, routes: list) -> None:
    """Globals of the modules defining the model's classes, and the scan's own module attribute."""
    seen = set()
    homes = [klass.__module__ for module in model.modules() for klass in type(module).__mro__]
    for home in homes + [getattr(entry.fn, "__module__", None)]:
        namespace = sys.modules.get(home) if home else None
        if namespace is None or id(namespace) in seen:
            continue
        seen.add(id(namespace))
        for attr, value in list(vars(namespace).items()):
            if value is entry.fn:
                route = Route(f"{namespace.__name__}.{attr}", entry.origin)
                setattr(namespace, attr, _replacement(entry, route))
                undo.append(lambda ns=namespace, a=attr, v=value: setattr(ns, a, v))
                routes.append(route)
