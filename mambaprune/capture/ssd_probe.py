"""Is this call a Mamba-2 (SSD) scan? Read its arguments by shape, then compare it with our op on probes.

The SSD counterpart of scan_probe.py (same probes, same tolerance, same handling of tuple results).
A call is *SSD-shaped* when its tensor arguments can be read as the inputs of `mambaprune.ssd_scan`:

- **the scan** (mamba_ssm's `mamba_chunk_scan_combined` and the copies vision code vendors): x (and
  an optional gate z) (batch, L, heads, headdim), dt (batch, L, heads), A (heads,), B and C each
  (batch, L, groups, N) with groups dividing heads, optional D (heads,) or (heads, headdim) and
  dt_bias (heads,), dt_softplus as the call implies;
- **the discretised form** (`ssd_minimal_discrete(X, A, B, C, block_len)` of mamba_ssm's
  `modules/ssd_minimal.py`): X = x * dt, A = A * dt (batch, L, heads), B and C as above, nothing else;
  it is computed as ssd_adapters.discrete_ssd computes mamba_ssm's own (exact where A * dt < 0, as
  Mamba-2's A = -exp(A_log) and a positive dt make it).

Every reading the shapes allow is a hypothesis; one is accepted when the callable agrees with
`mambaprune.ssd_scan` under it on random probes and on the model's own arguments. A reading must
give every floating-point tensor argument a role. Nothing about the callable's name or code is used.
An SSD-shaped callable that disagrees under every reading is left alone, not refused: the
analysis then finds no scan there and says so (a non-causal SSD, which sums over every token, has
these shapes too and is no recurrence).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..runtime import ssd_scan
from .scan_probe import Slot, Verdict, probe, tensor_slots
from .ssd_adapters import discrete_ssd


@dataclass(frozen=True)
class SSDReading:
    """Which argument of a call is which input of `mambaprune.ssd_scan` (discrete: ssd_minimal's
    form, whose `A` is A * dt per token and whose `x` is x * dt)."""

    x: Slot
    dt: Optional[Slot]
    A: Slot
    B: Slot
    C: Slot
    D: Optional[Slot] = None
    z: Optional[Slot] = None
    dt_bias: Optional[Slot] = None
    softplus: bool = False
    discrete: bool = False

    kind = "a Mamba-2 (SSD) scan"
    reference = "mambaprune.ssd_scan"

    @property
    def u(self) -> Slot:
        """The input whose shape the output has (scan_probe compares outputs by it)."""
        return self.x

    @property
    def probe_key(self) -> tuple:
        if self.discrete:
            return ((self.A, "rate_times_step"),)
        return ((self.dt, "step"), (self.A, "rate"))

    def scan(self, args: tuple, kwargs: dict, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The call's value computed with `mambaprune.ssd_scan`."""
        def get(slot):
            return None if slot is None else slot.get(args, kwargs)

        x, A, B, C = get(self.x), get(self.A), get(self.B), get(self.C)
        if self.discrete:
            y = discrete_ssd(x, A, B, C)
        else:
            y = ssd_scan(x, get(self.dt), A, B, C, get(self.D), get(self.z), get(self.dt_bias), self.softplus)
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)

    def __str__(self) -> str:
        roles = [("x", self.x), ("dt", self.dt), ("A * dt" if self.discrete else "A", self.A), ("B", self.B),
                 ("C", self.C), ("D", self.D), ("z", self.z), ("dt_bias", self.dt_bias)]
        read = ", ".join(f"{role}={slot}" for role, slot in roles if slot is not None)
        return f"{read} (x * dt, discretised)" if self.discrete else f"{read}, dt_softplus={self.softplus}"


def ssd_readings(args: tuple, kwargs: dict) -> list:
    """Every reading of the call's arguments as SSD inputs that the shapes allow (argument order first)."""
    slots = tensor_slots(args, kwargs)
    everything = {s for s, _ in slots}
    flags = [v for v in list(args) + list(kwargs.values()) if isinstance(v, bool)]
    softplus_options = list(dict.fromkeys(flags[:1] + [True, False]))
    found = []
    for x_slot, x in slots:
        if x.dim() != 4:
            continue
        batch, length, heads, headdim = x.shape
        steps = [s for s, t in slots if tuple(t.shape) == (batch, length, heads)]
        projections = [(s, t) for s, t in slots if s != x_slot and t.dim() == 4
                       and tuple(t.shape[:2]) == (batch, length) and t.shape[2] > 0 and heads % t.shape[2] == 0]
        pairs = [(b, c) for (b, tb), (c, tc) in itertools.permutations(projections, 2) if tb.shape == tc.shape]
        gates = [s for s, t in slots if s != x_slot and t.shape == x.shape]
        vectors = [s for s, t in slots if tuple(t.shape) == (heads,)]
        skips = vectors + [s for s, t in slots if tuple(t.shape) == (heads, headdim)]
        for (b_slot, c_slot), a_slot in itertools.product(pairs, steps):      # ssd_minimal's form
            if everything == {x_slot, a_slot, b_slot, c_slot}:
                found.append(SSDReading(x_slot, None, a_slot, b_slot, c_slot, discrete=True))
        for dt_slot, a_slot, (b_slot, c_slot) in itertools.product(steps, vectors, pairs):
            for z_slot in [g for g in gates if g not in (b_slot, c_slot)][:1] + [None]:
                for d_slot in [s for s in skips if s != a_slot] + [None]:
                    for bias in [s for s in vectors if s not in (a_slot, d_slot)] + [None]:
                        if not everything <= {x_slot, dt_slot, a_slot, b_slot, c_slot, z_slot, d_slot, bias}:
                            continue    # a tensor the reading leaves unused: the call computes something else
                        for softplus in softplus_options:
                            found.append(SSDReading(x_slot, dt_slot, a_slot, b_slot, c_slot, d_slot, z_slot,
                                                    bias, softplus))
    return found


def ssd_probe(fn: Callable, args: tuple, kwargs: dict, observed, candidates: list) -> Verdict:
    """scan_probe.probe against `mambaprune.ssd_scan`; a disagreement under every reading leaves the
    callable alone (an error, not a difference: see the module's docstring)."""
    verdict = probe(fn, args, kwargs, observed, candidates)
    if verdict.agrees or verdict.difference is None:
        return verdict
    return Verdict(None, error=f"it differs from mambaprune.ssd_scan under every reading of its arguments "
                               f"(max difference {verdict.difference:.3g} of the output's magnitude)")
