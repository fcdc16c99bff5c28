"""Is this call a selective scan? Read its arguments by shape, then compare it with our op on probes.

A call is *scan-shaped* when its tensor arguments can be read as the inputs of a Mamba-1 scan:
u, delta (and an optional gate z) of one shape (batch, D, L), A (D, N), B and C each (batch, N, L),
grouped (batch, G, N, L) with G dividing D, or time-invariant (D, N), optional D and delta_bias (D,).
The positions of those arguments differ between codebases (mamba_ssm: u, delta, A, B, C, D, z,
delta_bias, softplus; VMamba: u, delta, A, B, C, D, delta_bias, softplus, ...), so every reading
the shapes allow is a hypothesis (`Reading`). A hypothesis is accepted when the callable's result
equals `mambaprune.selective_scan` under that reading on several random probe inputs of the
observed shapes and on the model's own arguments; nothing about the callable's name or code is
used. A reading must give every floating-point tensor argument a role: a callable that ignores one
(a scan without its D skip, a gate it drops) computes something else and is not recognised.
Probe inputs keep the scan numerically tame (A < 0, a positive delta), so a disagreement is a
difference in the math, not an overflow.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..runtime import selective_scan

PROBES = 3
_FP32_TOLERANCE = 1e-5       # of the reference's magnitude (at least 1)
_HALF_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Slot:
    """One argument of a call: positional index or keyword name."""

    index: Optional[int] = None
    name: Optional[str] = None

    def get(self, args: tuple, kwargs: dict):
        return args[self.index] if self.name is None else kwargs[self.name]

    def __str__(self) -> str:
        return f"argument {self.index}" if self.name is None else f"{self.name}="


@dataclass(frozen=True)
class Reading:
    """Which argument of a call is which scan input (softplus: the value the call implies)."""

    u: Slot
    delta: Slot
    A: Slot
    B: Slot
    C: Slot
    D: Optional[Slot]
    z: Optional[Slot]
    delta_bias: Optional[Slot]
    softplus: bool

    kind = "a selective scan"
    reference = "mambaprune.selective_scan"

    @property
    def probe_key(self) -> tuple:
        """What the probe inputs depend on: (slot, what its values must be) pairs (PROBE_VALUES)."""
        return ((self.delta, "step"),)

    def scan(self, args: tuple, kwargs: dict, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The call's value computed with `mambaprune.selective_scan`."""
        def get(slot):
            return None if slot is None else slot.get(args, kwargs)

        u, A = get(self.u), get(self.A)
        B, C = _per_group(get(self.B), get(self.C), u)
        y = selective_scan(u, get(self.delta), A, B, C, get(self.D), get(self.z), get(self.delta_bias),
                           self.softplus)
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)

    def __str__(self) -> str:
        roles = [("u", self.u), ("delta", self.delta), ("A", self.A), ("B", self.B), ("C", self.C),
                 ("D", self.D), ("z", self.z), ("delta_bias", self.delta_bias)]
        read = ", ".join(f"{role}={slot}" for role, slot in roles if slot is not None)
        return f"{read}, delta_softplus={self.softplus}"


def _per_group(B: torch.Tensor, C: torch.Tensor, u: torch.Tensor):
    """B and C in one layout the op takes: a time-invariant (D, N) matrix becomes per-channel groups."""
    if B.dim() == C.dim() == 3 or (B.dim() == C.dim() == 4 and B.shape[1] == C.shape[1]):
        return B, C
    return _per_channel(B, u), _per_channel(C, u)


def _per_channel(M: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(D, N) | (batch, N, L) | (batch, G, N, L) -> (batch, D, N, L), channel d its own group."""
    batch, dim, length = u.shape
    if M.dim() == 2:
        return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
    if M.dim() == 3:
        return M[:, None].expand(batch, dim, *M.shape[1:])
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def tensor_slots(args: tuple, kwargs: dict) -> list:
    """(slot, tensor) of every floating-point tensor argument, positional first."""
    found = [(Slot(index=i), a) for i, a in enumerate(args)]
    found += [(Slot(name=k), v) for k, v in kwargs.items()]
    return [(s, t) for s, t in found if isinstance(t, torch.Tensor) and t.is_floating_point()]


def readings(args: tuple, kwargs: dict) -> list:
    """Every reading of the call's arguments as scan inputs that the shapes allow (mamba_ssm's order first)."""
    slots = tensor_slots(args, kwargs)
    flags = [v for v in list(args) + list(kwargs.values()) if isinstance(v, bool)]
    softplus_options = list(dict.fromkeys(flags[:1] + [True, False]))
    everything = {s for s, _ in slots}
    found = []
    for a_slot, A in slots:
        if A.dim() != 2:
            continue
        dim, dstate = A.shape
        seqs = [(s, t) for s, t in slots if t.dim() == 3 and t.shape[1] == dim]
        for (u_slot, u), (d_slot, delta) in itertools.permutations(seqs, 2):
            if delta.shape != u.shape:
                continue
            batch, _, length = u.shape
            rest = [s for s, t in seqs if t.shape == u.shape and s not in (u_slot, d_slot)]
            io = [s for s, t in slots if s not in (a_slot, u_slot, d_slot)
                  and _is_projection(t, batch, dim, dstate, length)]
            vectors = [s for s, t in slots if tuple(t.shape) == (dim,)]
            for (b_slot, c_slot), z_slot in itertools.product(itertools.permutations(io, 2), rest[:1] + [None]):
                if z_slot in (b_slot, c_slot):
                    continue
                for d_vec, bias in _optional_pairs(vectors):
                    used = {u_slot, d_slot, a_slot, b_slot, c_slot, d_vec, z_slot, bias}
                    if not everything <= used:
                        continue    # a tensor the reading leaves unused: the call computes something else
                    for softplus in softplus_options:
                        found.append(Reading(u_slot, d_slot, a_slot, b_slot, c_slot, d_vec, z_slot, bias, softplus))
    return found


def _is_projection(t: torch.Tensor, batch, dim, dstate, length) -> bool:
    if t.dim() == 2:
        return tuple(t.shape) == (dim, dstate)
    if t.dim() == 3:
        return tuple(t.shape) == (batch, dstate, length)
    return t.dim() == 4 and t.shape[1] > 0 and dim % t.shape[1] == 0 and \
        (t.shape[0], t.shape[2], t.shape[3]) == (batch, dstate, length)


def _optional_pairs(vectors: list) -> list:
    """(D, delta_bias) choices: both in argument order first, then one of them, then none."""
    pairs = list(itertools.permutations(vectors, 2))
    pairs += [(v, None) for v in vectors] + [(None, v) for v in vectors] + [(None, None)]
    return pairs


GATED, PLAIN = "the gated output", "the output before the gate"


@dataclass
class Verdict:
    """What probing a scan-shaped call found: the reading it agrees with, or why none."""

    reading: Optional[Reading]
    out_dtype: Optional[torch.dtype] = None
    difference: Optional[float] = None     # smallest max difference over the readings (disagreement)
    error: Optional[str] = None            # the callable raised on a probe
    # a tuple result (a compiled extension's `fwd`: out, the states its backward saves, out * silu(z)):
    # per element GATED or PLAIN where it is a scan output, None where the scan does not define it
    elements: Optional[tuple] = None

    @property
    def agrees(self) -> bool:
        return self.reading is not None

    def result(self, args: tuple, kwargs: dict):
        """The call's value computed with `mambaprune.selective_scan`: the scan's output, or the tuple with
        the scan outputs at their places and None where the scan defines nothing (states saved for a
        backward pass, which an inference graph does not run)."""
        if self.elements is None:
            return self.reading.scan(args, kwargs, self.out_dtype)
        refs = _references(self.reading, args, kwargs, self.out_dtype, whole=False)
        return tuple(None if kind is None else refs[kind] for kind in self.elements)

    def describe_elements(self) -> str:
        return ", ".join(f"{i}: {kind or 'not computed (given as None)'}" for i, kind in enumerate(self.elements))


def probe(fn: Callable, args: tuple, kwargs: dict, observed, candidates: list) -> Verdict:
    """Compare fn with the reference under each reading, on probes and on the observed call's result."""
    u = candidates[0].u.get(args, kwargs)
    pieces = list(observed) if isinstance(observed, (tuple, list)) else [observed]
    like_u = [p for p in pieces if isinstance(p, torch.Tensor) and p.shape == u.shape]
    if not like_u:
        return Verdict(None, error=f"its result is not a tensor shaped like its input {candidates[0].u} "
                                   f"{tuple(u.shape)}, nor a tuple holding one")
    best = float("inf")
    by_key: dict = {}
    for reading in candidates:
        by_key.setdefault(reading.probe_key, []).append(reading)
    for key, group in by_key.items():
        try:
            probes = [_probe_inputs(args, kwargs, dict(key), seed) for seed in range(PROBES)]
            with torch.no_grad():
                outs = [fn(*p_args, **p_kwargs) for p_args, p_kwargs in probes]
        except Exception as err:  # a callable that cannot run on other values is not recognised
            return Verdict(None, error=f"it raised {type(err).__name__} on a probe input: {err}")
        for reading in group:
            worst, elements = _worst(reading, probes + [(args, kwargs)], outs + [observed])
            if worst is None:
                return Verdict(reading, like_u[0].dtype, elements=elements)
            best = min(best, worst)
    return Verdict(None, difference=best)


def _references(reading: Reading, args: tuple, kwargs: dict, out_dtype=None, whole: bool = True) -> dict:
    """What the reading computes: {GATED or PLAIN: the scan} for a call returning one tensor (`whole`);
    for a tuple, one scan without the gate (PLAIN) and, when the reading has z, GATED = PLAIN * silu(z):
    one scan node whichever elements the model reads."""
    if whole or reading.z is None:
        return {(GATED if whole and reading.z is not None else PLAIN): reading.scan(args, kwargs, out_dtype)}
    plain = dataclasses.replace(reading, z=None).scan(args, kwargs, out_dtype)
    z = reading.z.get(args, kwargs)
    return {PLAIN: plain, GATED: (plain.float() * F.silu(z.float())).to(plain.dtype)}


def _worst(reading: Reading, calls: list, outs: list) -> tuple:
    """(None, elements) when every output agrees with the reference (elements: what each element of a
    tuple result is, None for a tensor result), else (the first max difference (relative), None). A tuple
    must give the same elements on every call, and the gated output where the reading has a gate z."""
    labels = None
    with torch.no_grad():
        for (p_args, p_kwargs), out in zip(calls, outs):
            try:
                refs = _references(reading, p_args, p_kwargs, whole=isinstance(out, torch.Tensor))
            except ValueError:  # the reading breaks one of the op's own shape checks
                return float("inf"), None
            pieces = list(out) if isinstance(out, (tuple, list)) else [out]
            found = []
            for piece in pieces:
                if not isinstance(piece, torch.Tensor) or piece.shape != reading.u.get(p_args, p_kwargs).shape:
                    found.append(None)
                    continue
                diffs = {kind: _difference(piece, ref) for kind, ref in refs.items()}
                kind = min(diffs, key=diffs.get)
                tolerance = _FP32_TOLERANCE if piece.dtype in (torch.float32, torch.float64) else _HALF_TOLERANCE
                if not diffs[kind] <= tolerance:
                    return diffs[kind], None
                found.append(kind)
            if not any(found) or (labels is not None and found != labels) or \
                    (reading.z is not None and GATED not in found):
                return float("inf"), None
            labels = found
    return None, (None if isinstance(outs[0], torch.Tensor) else tuple(labels))


def _difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((out.float() - ref).abs().max()) / max(1.0, float(ref.abs().max()))


# the values a slot named in a reading's probe_key gets: a step size (positive and small), a decay
# rate (negative), a discretised decay rate * step (negative and small)
PROBE_VALUES = {
    "step": lambda shape, g: 0.05 + 0.45 * torch.rand(shape, generator=g),
    "rate": lambda shape, g: -torch.exp(0.5 * torch.randn(shape, generator=g)),
    "rate_times_step": lambda shape, g: -(0.05 + 0.45 * torch.rand(shape, generator=g)),
}


def _probe_inputs(args: tuple, kwargs: dict, roles: dict, seed: int):
    """Fresh random values of the call's tensor shapes: the slots in `roles` as PROBE_VALUES says, other
    A-like (D, N) matrices negative, (D,) vectors positive, everything else standard normal."""
    g = torch.Generator().manual_seed(1234 + seed)

    def fresh(slot, t):
        if slot in roles:
            value = PROBE_VALUES[roles[slot]](t.shape, g)
        elif t.dim() == 2:
            value = PROBE_VALUES["rate"](t.shape, g)
        elif t.dim() == 1:
            value = 0.1 + 0.5 * torch.rand(t.shape, generator=g)
        else:
            value = torch.randn(t.shape, generator=g)
        return value.to(device=t.device, dtype=t.dtype)

    return with_fresh_tensors(args, kwargs, fresh)


def with_fresh_tensors(args: tuple, kwargs: dict, fresh: Callable) -> tuple:
    """(args, kwargs) with every floating-point tensor argument replaced by fresh(slot, tensor)."""
    p_args, p_kwargs = list(args), dict(kwargs)
    for slot, t in tensor_slots(args, kwargs):
        if slot.name is None:
            p_args[slot.index] = fresh(slot, t)
        else:
            p_kwargs[slot.name] = fresh(slot, t)
    return tuple(p_args), p_kwargs
