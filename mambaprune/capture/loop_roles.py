"""Which scan a parsed token-loop step (loop_steps.Step) computes, and with which tensors in which roles.

Two recurrences are recognised from the dims each factor runs over, never from names:

- **Mamba-1** (`mambaprune::selective_scan`): a state h (batch, d, n); exp(delta * A) with A over
  (d, n) and delta over (batch, d, tokens); the update delta * B * u with B over (batch, n, tokens)
  and u over (batch, d, tokens); C over (batch, n, tokens); a skip D over (d,).
- **Mamba-2 / SSD** (`mambaprune::ssd_scan`): a state h (batch, heads, headdim, n) whose decay is one
  scalar per head: exp(dt * A) with A over (heads,) and dt over (batch, heads, tokens); the update
  dt * x * B with x over (batch, heads, headdim, tokens) and B over (batch, n, tokens) (one group, shared
  by the heads) or (batch, heads, n, tokens) (a group per head); C read the same way as B; a skip D
  over (heads,) or (heads, headdim).

A `ScanReading` says, per argument of the op, the Term it comes from and the order of roles the op
wants (None: a size-1 dim to insert), and the roles of the op's output dims. The dims of the state
are named by their index (0 .. rank-1) and the token axis by "l", as in loop_steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .graph_edit import shape_of
from .loop_steps import Step

SELECTIVE_SCAN = torch.ops.mambaprune.selective_scan.default
SSD_SCAN = torch.ops.mambaprune.ssd_scan.default


@dataclass(frozen=True)
class ScanReading:
    op: object           # the OpOverload the loop is lifted into
    names: tuple         # the op's leading positional arguments, in order
    parts: dict          # argument name -> (Term, the roles its dims take, in the op's order)
    output: tuple        # the roles of the op output's dims


def read_scan(step: Step) -> Optional[ScanReading]:
    """The scan `step` is a step of, or None when its factors are not one of the two recurrences."""
    if step.readout is None or len(step.decay) != 2:
        return None
    rank = len(shape_of(step.state))
    a_terms = [term for term in step.decay if "l" not in term.roles]
    delta_terms = [term for term in step.decay if "l" in term.roles]
    if len(a_terms) != 1 or len(delta_terms) != 1:
        return None
    read = {3: _selective, 4: _ssd}.get(rank)
    return read(step, a_terms[0], delta_terms[0]) if read is not None else None


def dims(term) -> set:
    return {r for r in term.roles if r is not None}


def _selective(step: Step, a, delta) -> Optional[ScanReading]:
    n, rank = step.contracted, 3
    a_dims = dims(a)
    others = [x for x in range(rank) if x not in a_dims]
    if len(a_dims) != 2 or n not in a_dims or len(others) != 1:
        return None
    b = others[0]
    d = next(x for x in range(rank) if x not in (b, n))
    update = _others_of(step.update, delta, 2)
    if update is None:
        return None
    parts = {"delta": (delta, (b, d, "l")), "A": (a, (d, n)), "C": (step.readout, (b, n, "l"))}
    for term in update:
        name = "B" if n in dims(term) else "u"
        if name in parts:
            return None
        parts[name] = (term, (b, n, "l") if name == "B" else (b, d, "l"))
    if step.skip and not _add_skip(parts, step.skip, "u", [(d,)]):
        return None
    if any(dims(term) != set(target) for term, target in parts.values()):
        return None
    return ScanReading(SELECTIVE_SCAN, ("u", "delta", "A", "B", "C", "D"), parts, (b, d, "l"))


def _ssd(step: Step, a, dt) -> Optional[ScanReading]:
    n = step.contracted
    a_dims = dims(a)
    if len(a_dims) != 1 or n in a_dims:
        return None
    h = next(iter(a_dims))
    batch = dims(dt) - {h, "l"}
    if len(batch) != 1 or dims(dt) != batch | {h, "l"} or n in batch:
        return None
    b = batch.pop()
    p = next(x for x in range(4) if x not in (b, h, n))
    update = _others_of(step.update, dt, 2)
    if update is None:
        return None
    parts = {"dt": (dt, (b, "l", h)), "A": (a, (h,))}
    for term in update:
        name = "B" if n in dims(term) else "x"
        if name in parts:
            return None
        parts[name] = (term, _grouped(term, b, h, n) if name == "B" else (b, "l", h, p))
    parts["C"] = (step.readout, _grouped(step.readout, b, h, n))
    if parts["B"][1] != parts["C"][1]:
        return None        # B and C grouped differently: not a layout ssd_scan takes
    if step.skip and not _add_skip(parts, step.skip, "x", [(h,), (h, p)]):
        return None
    if any(dims(term) != {r for r in target if r is not None} for term, target in parts.values()):
        return None
    return ScanReading(SSD_SCAN, ("x", "dt", "A", "B", "C", "D"), parts, (b, "l", h, p))


def _grouped(term, b, h, n) -> tuple:
    """B or C's roles in ssd_scan's (batch, L, groups, N): one group shared by every head (a size-1
    group dim inserted), or one group per head."""
    return (b, "l", h, n) if h in dims(term) else (b, "l", None, n)


def _others_of(update: tuple, delta, count: int) -> Optional[list]:
    """The update's factors besides delta, when there are `count` of them."""
    others = list(update)
    if delta not in others or len(others) != count + 1:
        return None
    others.remove(delta)
    return others


def _add_skip(parts: dict, skip: tuple, input_name: str, allowed: list) -> bool:
    """y_t = <h_t, C_t> + D * input_t: the skip's other factor is D (roles in `allowed`)."""
    terms = list(skip)
    if input_name not in parts or parts[input_name][0] not in terms:
        return False
    terms.remove(parts[input_name][0])
    wanted = next((target for target in allowed if set(target) == dims(terms[0])), None)
    if wanted is None:
        return False
    parts["D"] = (terms[0], wanted)
    return True
