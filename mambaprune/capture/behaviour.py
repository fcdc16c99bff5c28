"""Scans found by behaviour: callables that compute a selective scan are routed wherever they live.

During a capture, every callable the model's code can reach and that could take a scan's inputs
(reachable.py: partials and functions on layers, methods, globals of the modules the code calls
into, closure cells, autograd Function classes) is replaced by a thin wrapper. The private copy
of the model then runs once, eagerly, on the example inputs (a *dry run*). A wrapper whose call
has the shapes of a scan (scan_probe.readings) compares the callable with
`mambaprune.selective_scan` on probe inputs (scan_probe.probe); if one reading of its arguments
agrees, every later call with the same argument structure, the export's included, is computed
with our op instead, so it becomes ONE graph node. Nothing is routed on the callable's name.
A compiled extension's `fwd` returns a tuple (out, the states its backward saves, out * silu(z)):
each element the op computes (the output, gated or not) is matched on the probes too and routed in
place, and the rest, which an inference graph does not use, comes back as None (the report says so;
a model that reads them fails to capture). A call with the arguments of a depthwise causal conv1d
(conv_probe.py: the compiled `causal_conv1d_fwd` such code calls beside the scan) that agrees with
torch's conv1d is computed in ViM's form of it; one that does not is left alone.

Mamba-2 (SSD) kernels are probed the same way against `mambaprune.ssd_scan` (ssd_probe.py); an
SSD-shaped callable that disagrees is left alone, not refused (a non-causal SSD has its shapes).
A scan-shaped callable that returns a (batch, D, L) tensor, disagrees with the op under every
reading, and does not itself run one of our scans or call another scan-shaped callable (which is
then the one to blame or route) is refused: the compiler would otherwise capture a recurrence it
does not know as plain ops. A callable that cannot be
probed (it raises on other values, returns something else) is left alone. The wrappers are removed
when the capture ends, on error too; only the private copy and, for that time, the module globals
and Function classes it refers to are patched.
"""
from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import UnsupportedModelError
from .conv_probe import conv_probe, conv_readings
from .reachable import Site, reachable_sites
from .routing import Route
from .scan_probe import PROBES, Verdict, probe, readings
from .ssd_probe import ssd_probe, ssd_readings

SCAN_PROBES = (probe, ssd_probe)


@dataclass
class Recognition:
    """One callable and argument structure, probed: the route it got or why it got none."""

    where: str
    callable_name: str
    verdict: Verdict
    runs_a_scan: bool            # its code ran one of mambaprune's scans or another scan-shaped callable
    route: Optional[Route] = None
    is_scan: bool = True         # probed as a scan (False: as the causal conv1d beside one)
    kind: str = "a selective scan"     # what its arguments were read as

    @property
    def reported(self) -> bool:
        """Worth a report line: routed and used by the captured graph, or scan-shaped and left alone."""
        return self.route.called if self.route is not None else self.verdict.error is not None

    def __str__(self) -> str:
        named = self.where if self.where == self.callable_name else f"{self.where} ({self.callable_name})"
        if self.verdict.agrees:
            reading = self.verdict.reading
            elements = "" if self.verdict.elements is None else \
                f"; its result is a tuple, routed element by element ({self.verdict.describe_elements()})"
            return (f"recognised by behaviour: {named} is {reading.kind}: it agrees with "
                    f"{reading.reference} on {PROBES} random probes and on the model's own inputs, its "
                    f"arguments read as {reading}{elements}")
        why = self.verdict.error or f"it differs from mambaprune.selective_scan (max difference " \
                                    f"{self.verdict.difference:.3g} of the output's magnitude)"
        return f"not routed: {named} has the arguments of {self.kind}, but {why}"


@dataclass
class _Session:
    dry_run: bool = True
    probing: int = 0             # >0 while probes run: their reference scans are not the callable's own
    scan_shaped_calls: int = 0   # calls with a scan's arguments so far (a callable making one is not blamed)
    recognitions: dict = field(default_factory=dict)     # (identity, structure) -> Recognition

    def wrapper(self, site: Site):
        original = site.original

        def routed(*args, **kwargs):
            callee, c_args, c_kwargs = _unpartial(original, args, kwargs)
            key = (_identity(callee), _structure(c_args, c_kwargs))
            found = self.recognitions.get(key)
            if found is not None and found.is_scan:
                self.scan_shaped_calls += 1
            if found is None and self.dry_run:
                for find, check in ((readings, probe), (ssd_readings, ssd_probe)):
                    candidates = find(c_args, c_kwargs)
                    if candidates:
                        return self._recognise(key, site, callee, c_args, c_kwargs, candidates, check)
                candidates = conv_readings(c_args, c_kwargs)     # the causal conv1d beside the scan
                if candidates:
                    return self._recognise(key, site, callee, c_args, c_kwargs, candidates, conv_probe)
            if found is not None and found.verdict.agrees:
                if not self.dry_run:
                    found.route.called = True
                return found.verdict.result(c_args, c_kwargs)
            return original(*args, **kwargs)

        if isinstance(original, (types.FunctionType, types.MethodType)):
            functools.update_wrapper(routed, original)
        return routed

    def _recognise(self, key, site: Site, callee, args, kwargs, candidates, check):
        is_scan = check in SCAN_PROBES
        if is_scan:
            self.scan_shaped_calls += 1
        before = self.scan_shaped_calls
        with _ScanCounter(self) as counter, torch.no_grad():
            out = callee(*args, **kwargs)
        inner = self.scan_shaped_calls > before
        self.probing += 1
        try:
            verdict = check(callee, args, kwargs, out, candidates)
        finally:
            self.probing -= 1
        found = Recognition(site.where, _name(callee), verdict, counter.count > 0 or inner, is_scan=is_scan,
                            kind=candidates[0].kind)
        self.recognitions[key] = found
        if not verdict.agrees:
            return out
        found.route = Route(site.where, f"recognised by behaviour: {_name(callee)}")
        # from now on this call is our op, the first one too: a caller probed around it sees one of our scans
        return verdict.result(args, kwargs)

    def refusals(self) -> list:
        return [r for r in self.recognitions.values()
                if not r.verdict.agrees and r.verdict.difference is not None and not r.runs_a_scan]


@contextlib.contextmanager
def route_by_behaviour(model: torch.nn.Module, example_inputs: tuple, known_routes: list):
    """Wrap the reachable callables of `model` (a private copy), dry-run it, and yield the
    Recognitions; agreeing callables stay routed to `mambaprune::selective_scan` until exit."""
    session = _Session()
    installed = []
    try:
        for site in reachable_sites(model):
            site.install(session.wrapper(site))
            installed.append(site)
        if installed:
            _dry_run(model, example_inputs, session)
            for route in known_routes:   # the export says which entry points the graph calls
                route.called = False
        session.dry_run = False
        refused = session.refusals()
        if refused:
            raise UnsupportedModelError(_refusal_message(refused))
        yield list(session.recognitions.values())
    finally:
        for site in reversed(installed):
            site.undo()


def _dry_run(model, example_inputs: tuple, session: _Session) -> None:
    """Run the private copy once; a model that fails here fails the export too, with its own message,
    unless a routed tuple gave None for what the scan does not compute: then that is the reason."""
    try:
        with torch.no_grad():
            model(*example_inputs)
    except UnsupportedModelError:
        raise
    except Exception as err:
        partial_routes = [r for r in session.recognitions.values()
                          if r.verdict.agrees and r.verdict.elements is not None and None in r.verdict.elements]
        if partial_routes:
            first = partial_routes[0]
            raise UnsupportedModelError(
                f"the model failed ({type(err).__name__}: {err}) after {first.callable_name} was routed to "
                f"{first.verdict.reading.reference} by its behaviour; its result is a tuple whose elements "
                f"({first.verdict.describe_elements()}) the op computes only in part, and the model reads one it "
                "does not. Declare the scan with mambaprune.register_scan(fn, adapter), the adapter computing "
                "everything the model reads") from err


def _refusal_message(refused: list) -> str:
    first = refused[0]
    more = "; ".join(str(r) for r in refused[1:3])
    return (f"{first}. mambaprune does not know what it computes, so it can neither route it to "
            "mambaprune.selective_scan nor prune through it. If it is a scan variant, declare it with "
            "mambaprune.register_scan(fn, adapter), the adapter computing the same value with "
            "mambaprune.selective_scan" + (f". Also: {more}" if more else ""))


class _ScanCounter(TorchDispatchMode):
    """Counts calls of mambaprune's scan ops (a callable that already runs one needs no routing)."""

    def __init__(self, session: _Session):
        super().__init__()
        self.session, self.count = session, 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if func.namespace == "mambaprune" and "scan" in func.__name__ and not self.session.probing:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _unpartial(fn, args: tuple, kwargs: dict):
    """A partial's function and the arguments it is finally called with (bound tensors included)."""
    while isinstance(fn, functools.partial):
        args, kwargs, fn = fn.args + tuple(args), {**fn.keywords, **kwargs}, fn.func
    return fn, tuple(args), kwargs


def _identity(fn):
    if isinstance(fn, types.MethodType):
        owner = fn.__self__ if isinstance(fn.__self__, type) else type(fn.__self__)
        return id(fn.__func__), id(owner)
    return id(fn), None


def _structure(args: tuple, kwargs: dict) -> tuple:
    """What a reading depends on: tensor ranks and the non-tensor values (ints by type: sizes vary)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dim(), v.is_floating_point())
        if isinstance(v, bool) or v is None or isinstance(v, (str, float)):
            return v
        if isinstance(v, (int, torch.SymInt)):
            return "int"
        return type(v).__name__
    return tuple(one(a) for a in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))


def _name(fn) -> str:
    target = fn.__func__ if isinstance(fn, types.MethodType) else fn
    if isinstance(fn, types.MethodType) and isinstance(fn.__self__, type):
        return f"{fn.__self__.__module__}.{fn.__self__.__qualname__}.{fn.__name__}"
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(target).__name__)}"
