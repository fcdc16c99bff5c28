"""Is this call a depthwise causal conv1d? Read its arguments by shape, compare it with torch's conv1d.

Mamba's mixers run a depthwise causal conv1d before the scan. Code that calls the compiled kernel
straight through (`causal_conv1d_cuda.causal_conv1d_fwd(x, weight, bias, ..., silu_activation)`, as
Mamba-R's vendored `MambaInnerFnCustom` does) hides it from the export as it hides the scan. A call is
*conv-shaped* when one tensor argument is x (batch, D, L), one the weight (D, width) or (D, 1, width),
at most one the bias (D,), and nothing else is a floating-point tensor. A reading (`ConvReading`) is
accepted when the callable's result equals ViM's form of the conv, `conv1d(x, weight, bias,
padding=width - 1, groups=D)[..., :L]` (then SiLU where the reading says so), on random probes of the
observed shapes and on the model's own call; the call is then computed in that form, which the
token analysis follows (analysis/tokens/convolutions.py). Nothing about the callable's name is used.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .scan_probe import PROBES, Slot, Verdict, tensor_slots, with_fresh_tensors

_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ConvReading:
    """Which argument of a call is x, the weight and the bias, and whether SiLU follows the conv."""

    x: Slot
    weight: Slot
    bias: Optional[Slot]
    silu: bool

    kind = "a depthwise causal conv1d"
    reference = "torch's conv1d (padding width - 1, cut to L)"

    def scan(self, args: tuple, kwargs: dict, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The call's value computed in ViM's form (the name matches Reading.scan: what a route calls)."""
        x, weight = self.x.get(args, kwargs), self.weight.get(args, kwargs)
        bias = None if self.bias is None else self.bias.get(args, kwargs)
        width = weight.shape[-1]
        y = F.conv1d(x, weight.reshape(weight.shape[0], 1, width), bias, padding=width - 1,
                     groups=x.shape[1])[..., :x.shape[-1]]
        y = F.silu(y) if self.silu else y
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)

    def __str__(self) -> str:
        bias = f", bias={self.bias}" if self.bias is not None else ""
        return f"x={self.x}, weight={self.weight}{bias}, then SiLU={self.silu}"


def conv_readings(args: tuple, kwargs: dict) -> list:
    """Every reading of the call's arguments as a depthwise conv1d's that the shapes allow."""
    slots = tensor_slots(args, kwargs)
    found = []
    for (x_slot, x), (w_slot, w) in itertools.permutations(slots, 2):
        if x.dim() != 3 or not (w.dim() == 2 or (w.dim() == 3 and w.shape[1] == 1)) or w.shape[0] != x.shape[1] \
                or not 1 < w.shape[-1] <= x.shape[-1]:
            continue
        vectors = [s for s, t in slots if s not in (x_slot, w_slot) and tuple(t.shape) == (x.shape[1],)]
        for bias in vectors + [None]:
            if {s for s, _ in slots} <= {x_slot, w_slot, bias}:
                found += [ConvReading(x_slot, w_slot, bias, silu) for silu in (True, False)]
    return found


def conv_probe(fn: Callable, args: tuple, kwargs: dict, observed, candidates: list) -> Verdict:
    """The reading under which fn agrees with the conv on probes and on the observed call, if any."""
    x = candidates[0].x.get(args, kwargs)
    if not isinstance(observed, torch.Tensor) or observed.shape != x.shape:
        return Verdict(None)
    g = torch.Generator().manual_seed(4321)
    fresh = lambda slot, t: torch.randn(t.shape, generator=g).to(device=t.device, dtype=t.dtype)  # noqa: E731
    probes = [with_fresh_tensors(args, kwargs, fresh) for _ in range(PROBES)]
    try:
        with torch.no_grad():
            outs = [fn(*p_args, **p_kwargs) for p_args, p_kwargs in probes]
    except Exception:  # noqa: BLE001 - a callable that cannot run on other values is left alone
        return Verdict(None)
    for reading in candidates:
        if all(_agrees(reading, call, out) for call, out in zip(probes + [(args, kwargs)], outs + [observed])):
            return Verdict(reading, observed.dtype)
    return Verdict(None)


def _agrees(reading: ConvReading, call: tuple, out) -> bool:
    if not isinstance(out, torch.Tensor):
        return False
    with torch.no_grad():
        ref = reading.scan(*call).float()
    if ref.shape != out.shape:
        return False
    return float((out.float() - ref).abs().max()) <= _TOLERANCE * max(1.0, float(ref.abs().max()))
