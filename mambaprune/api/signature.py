"""The pruned model's call signature: the original forward's, with non-tensor arguments frozen.

torch.export captures the tensors among the example inputs as graph inputs and every other
argument (``scale=2.0``, ``return_features=False``, a default left out) as a constant of the graph.
`CallSignature` binds a call's positional and keyword arguments to the original forward's
parameters (``inspect.signature``), returns the captured positional inputs, and refuses a frozen
argument given another value than the one it was compiled with (`FrozenArgumentError`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import FrozenArgumentError, InputMismatchError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass
class CallSignature:
    names: Optional[tuple]                        # parameter names of the captured inputs; None: positional only
    frozen: dict = field(default_factory=dict)   # name -> the value the graph was compiled with
    defaults: dict = field(default_factory=dict)  # name -> default, for parameters after the captured ones
    arity: int = 0

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """The captured positional inputs of a call (its other arguments checked against their frozen values)."""
        if self.names is None:
            if kwargs:
                raise InputMismatchError(f"the pruned model takes positional inputs only; got keyword(s) {sorted(kwargs)}")
            return args
        allowed = self.names + tuple(self.defaults)
        if len(args) > len(allowed):
            raise InputMismatchError(f"the pruned model takes {len(allowed)} input(s); got {len(args)} "
                                     f"(its arguments: {', '.join(allowed)})")
        given = dict(zip(allowed, args))
        for name, value in kwargs.items():
            if name not in allowed:
                raise InputMismatchError(f"the pruned model got an unexpected keyword argument {name!r}; its "
                                         f"arguments are ({', '.join(allowed)})")
            if name in given:
                raise InputMismatchError(f"the pruned model got argument {name!r} twice (by position and by keyword)")
            given[name] = value
        for name, compiled in {**self.defaults, **self.frozen}.items():
            if name in given and not same_value(given[name], compiled):
                raise FrozenArgumentError(
                    f"argument {name!r} was frozen at its compiled value {compiled!r} (torch.export makes non-tensor "
                    f"arguments constants of the graph); got {given[name]!r}. Compile again with {name}={given[name]!r} "
                    "in example_inputs for that value.")
        missing = [name for name in self.names if name not in given and name not in self.frozen]
        if missing:
            raise InputMismatchError(f"the pruned model takes {len(self.names)} input(s); got "
                                     f"{len(self.names) - len(missing)} (missing: {', '.join(missing)})")
        return tuple(given.get(name, self.frozen.get(name)) for name in self.names)

    def frozen_arguments(self) -> dict:
        """{name: compiled value} of every argument the graph holds as a constant (for the report)."""
        return {**self.frozen, **self.defaults}


def call_signature(model: torch.nn.Module, example_inputs: tuple) -> CallSignature:
    """The CallSignature of `model.forward` called with `example_inputs` (positional)."""
    frozen_positional = {f"input {i}": x for i, x in enumerate(example_inputs) if not isinstance(x, torch.Tensor)}
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return CallSignature(None, frozen_positional, arity=len(example_inputs))
    if len(parameters) < len(example_inputs) or any(p.kind not in _POSITIONAL for p in parameters[:len(example_inputs)]):
        return CallSignature(None, frozen_positional, arity=len(example_inputs))
    captured = parameters[:len(example_inputs)]
    names = tuple(p.name for p in captured)
    frozen = {p.name: x for p, x in zip(captured, example_inputs) if not isinstance(x, torch.Tensor)}
    defaults = {p.name: p.default for p in parameters[len(example_inputs):]
                if p.kind in _POSITIONAL + (inspect.Parameter.KEYWORD_ONLY,) and p.default is not inspect.Parameter.empty}
    return CallSignature(names, frozen, defaults, arity=len(example_inputs))


def same_value(given, compiled) -> bool:
    """The value a frozen argument may take: the compiled one (NaN equals NaN; no tensors)."""
    if given is compiled:
        return True
    if isinstance(given, torch.Tensor) or isinstance(compiled, torch.Tensor):
        return False
    if isinstance(given, float) and isinstance(compiled, float) and math.isnan(given) and math.isnan(compiled):
        return True
    try:
        return type(given) is type(compiled) and bool(given == compiled) or (
            isinstance(given, (int, float)) and isinstance(compiled, (int, float))
            and not isinstance(given, bool) and not isinstance(compiled, bool) and given == compiled)
    except Exception:   # a value whose == does not give a bool
        return False
