"""Unrolled Python token loops lifted into one scan node (`mambaprune::selective_scan`, or
`mambaprune::ssd_scan` for a Mamba-2 loop whose decay is one scalar per head).

A selective scan written as a Python loop over the tokens (the transformers `MambaMixer` slow path,
hand-written reference code) reaches the captured graph unrolled: L repetitions of

    h = Abar_t * h + Bx_t          y_t = <h, C_t> (+ D * u_t)          y = stack([y_0, ..., y_{L-1}])

with Abar_t = exp(delta_t * A) and Bx_t = delta_t * B_t * u_t, computed either once for all tokens
before the loop and read with `x[:, :, t]` (transformers) or per step from `delta[:, t]`, `B[:, t]`,
`u[:, t]` (written by hand). The states may instead be stacked and read out once after the loop
(mamba.py: `hs.append(h)`, then `torch.stack(hs, 1) @ C.unsqueeze(-1)`). This pass finds such a chain
and replaces the stacked outputs (or the readout of the stacked states) by one scan over the same
tensors, so the rest of the compiler sees the scan it knows.

Nothing is matched on names or on a written form: every step is read (loop_steps.py) through the
data movement torch.export leaves around it (full slices, `select` / `slice` of step t, unsqueeze,
squeeze, views that only add or drop size-1 dims, expand, transpose, permute, dtype casts), each
factor of a product ends at a tensor whose dims are labelled with what they run over (batch, channel
or head, state n, token l), and the factors are told apart by those labels (loop_roles.py: which
recurrence, and which factor is A, delta, B, u, C, D). The chain is lifted only when every step reads the SAME tensors in
the same way at its own index t, the loop covers the whole token axis from a zero state (t = 0 ..
L-1, or L-1 .. 0: a backward loop is lifted as the scan of the flipped tokens), every per-step output
goes into one stack along a new token axis (in step order or reversed), or every state does, and no
state is read elsewhere (a loop that returns its final state is left as it is). Anything else is left unchanged,
and the analysis then finds no scan there.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx as fx

from ..meta_keys import module_of
from .graph_edit import copy_graph, emit, module_like, shape_of
from .loop_roles import read_scan
from .loop_steps import CHECKS, Step, next_update, normal, parse_step, read_out_stacked, readers, settled, stacked_state

aten = torch.ops.aten

_ZEROS = (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)
_FULLS = (aten.full.default, aten.new_full.default, aten.full_like.default)
LIFTED_ORIGIN = "Python token loop, lifted into one scan"


@dataclass(frozen=True)
class LiftedLoop:
    where: str           # the module that holds the loop
    steps: int
    backward: bool = False   # the loop walks the tokens last to first (lifted as a scan of the flipped tokens)

    def __str__(self) -> str:
        return f"{self.where} ({LIFTED_ORIGIN})"


def lift_token_loops(gm: fx.GraphModule, example_inputs: Optional[tuple] = None) -> tuple:
    """(a copy of `gm` with every understood token loop replaced by one scan node, the LiftedLoops);
    `gm` itself and no loops when there is none, or when the lifted graph does not compute what `gm`
    computes on `example_inputs` (a second check of the reading: nothing is lifted then)."""
    found = [loop for loop in map(_loop_from, _zero_states(gm.graph)) if loop is not None]
    if not found:
        return gm, []
    lifted_gm, lifted = _lifted(gm, found)
    if example_inputs is not None:
        with torch.no_grad():
            if not outputs_agree(gm(*example_inputs), lifted_gm(*example_inputs)):
                return gm, []
    return lifted_gm, lifted


def outputs_agree(want, got, tol: float = 1e-4) -> bool:
    """Whether two outputs (any structure of tensors) are the same, relative to each tensor's magnitude."""
    want, got = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
    return len(want) == len(got) and all(not isinstance(w, torch.Tensor) or _close(w, g, tol)
                                         for w, g in zip(want, got))


def _close(want: torch.Tensor, got, tol: float) -> bool:
    if not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    if want.numel() == 0 or not want.is_floating_point():
        return torch.equal(want, got)
    return float((want - got).abs().max()) <= tol * (1 + float(want.abs().max()))


def _lifted(gm: fx.GraphModule, found: list) -> tuple:
    graph, mapping = copy_graph(gm.graph)
    loop_nodes = _ancestors([mapping[loop.out] for loop in found])
    lifted = [_lift(graph, loop, mapping) for loop in found]
    _erase_dead(graph, loop_nodes)
    return module_like(gm, graph), lifted


# --- finding the chain -------------------------------------------------------------------------

def _zero_states(graph: fx.Graph) -> list:
    out = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ZEROS or (node.target in _FULLS and _fill_value(node) == 0):
            if shape_of(node) is not None and len(shape_of(node)) in (3, 4):
                out.append(node)
    return out


def _fill_value(node: fx.Node):
    index = 2 if node.target is aten.new_full.default else 1
    return node.args[index] if len(node.args) > index else None


def _next_state(state: fx.Node) -> Optional[tuple]:
    """(h_next, Abar, Bx) for h_next = Abar * state + Bx, if `state` feeds exactly one such update."""
    state = settled(state)
    found = [update for update in (next_update(state, user) for user in state.users) if update is not None]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class _Loop:
    steps: list          # Step, in the order the loop runs
    out: fx.Node         # what the scan replaces: the stack of the per-step outputs, or the readout of the stacked states
    out_roles: tuple     # per dim of `out`: the state dim it runs over, or "l" for the tokens
    backward: bool       # step i reads token L - 1 - i (`for t in reversed(range(L))`)
    stacked_reversed: bool   # the outputs stacked last step first (`torch.stack(ys[::-1])`)


def _loop_from(zero: fx.Node) -> Optional[_Loop]:
    """The loop whose state starts at the zero state `zero`, if it lifts: read forwards (step i reads
    token i) or backwards (token L - 1 - i)."""
    chain, state = [], zero
    while (nxt := _next_state(state)) is not None:
        chain.append(nxt)
        state = nxt[0]
    if len(chain) < 2:
        return None
    for backward in (False, True):
        steps = [parse_step(len(chain) - 1 - i if backward else i, *link) for i, link in enumerate(chain)]
        if not all(steps) or not _consistent(steps):
            continue
        found = _stack_of(steps) if steps[0].readout is not None else _read_after_stack(steps)
        if found is None:
            return None
        steps, out, out_roles, reversed_stack = found
        return _Loop(steps, out, out_roles, backward, reversed_stack) if read_scan(steps[0]) is not None else None
    return None


def _consistent(steps: list) -> bool:
    """Every step reads the same tensors the same way (at its own index), over the whole token axis,
    and each state is read by the next update and its readout only."""
    first = steps[0]
    key = (first.decay, first.update, first.readout, first.contracted, first.skip)
    if any((s.decay, s.update, s.readout, s.contracted, s.skip) != key for s in steps[1:]):
        return False
    tokens = _token_count(first)
    if tokens != len(steps):
        return False
    for i, step in enumerate(steps):
        expected = 1 if i == len(steps) - 1 else 2
        if len(readers(settled(step.state))) != expected:
            return False
    return True


def _token_count(step: Step):
    for term in (*step.decay, *step.update, *step.skip, *([step.readout] if step.readout else [])):
        if "l" in term.roles:
            return shape_of(term.node)[term.roles.index("l")]
    return None


def _stack_of(steps: list) -> Optional[tuple]:
    """(steps, the stack of every step's output, its dims' roles, whether it stacks them last step first)."""
    outputs = [s.output for s in steps]
    users = {u for y in outputs for u in y.users}
    if len(users) != 1 or any(len(y.users) != 1 for y in outputs):
        return None
    stack = next(iter(users))
    if stack.target is not aten.stack.default or list(stack.args[0]) not in (outputs, outputs[::-1]):
        return None
    roles = [r for r in range(len(shape_of(steps[0].state))) if r != steps[0].contracted]
    roles.insert(normal(stack.args[1] if len(stack.args) > 1 else 0, len(roles) + 1), "l")
    return steps, stack, tuple(roles), list(stack.args[0]) != outputs


def _read_after_stack(steps: list) -> Optional[tuple]:
    """The same for states stacked and read out after the loop (mamba.py's `selective_scan_seq`):
    the steps with that readout as theirs, and the readout's output."""
    states = [s.output for s in steps]
    stacks = {stacked_state(s.state) for s in steps}
    stack = stacks.pop() if len(stacks) == 1 else None
    if stack is None or list(stack.args[0]) not in (states, states[::-1]):
        return None
    rank = len(shape_of(steps[0].state))
    readout = read_out_stacked(stack, rank)
    if readout is None:
        return None
    c_term, contracted, out = readout
    roles = list(range(rank))
    roles.insert(normal(stack.args[1] if len(stack.args) > 1 else 0, rank + 1), "l")
    steps = [replace(s, readout=c_term, contracted=contracted) for s in steps]
    return steps, out, tuple(r for r in roles if r != contracted), list(stack.args[0]) != states


# --- the scan's arguments ----------------------------------------------------------------------

def _lift(graph: fx.Graph, loop: _Loop, mapping: dict) -> LiftedLoop:
    reading, out = read_scan(loop.steps[0]), loop.out
    anchor = mapping[out]
    args = {name: _arrange(graph, anchor, mapping[term.node], term.roles, target)
            for name, (term, target) in reading.parts.items()}
    if loop.backward:      # the scan runs over the tokens in the loop's order
        for name, (_, target) in reading.parts.items():
            if "l" in target:
                args[name] = emit(graph, anchor, aten.flip.default, (args[name], [target.index("l")]))
    scan = emit(graph, anchor, reading.op, tuple(args.get(name) for name in reading.names))
    if loop.stacked_reversed:
        scan = emit(graph, anchor, aten.flip.default, (scan, [reading.output.index("l")]))
    order = [reading.output.index(role) for role in loop.out_roles]
    value = emit(graph, anchor, aten.permute.default, (scan, order)) if order != sorted(order) else scan
    dtype = out.meta["val"].dtype
    if value.meta["val"].dtype != dtype:
        value = emit(graph, anchor, aten._to_copy.default, (value,), {"dtype": dtype})
    anchor.replace_all_uses_with(value)
    return LiftedLoop(module_of(out), len(loop.steps), loop.backward)


def _arrange(graph: fx.Graph, anchor: fx.Node, node: fx.Node, roles: tuple, target: tuple) -> fx.Node:
    """`node` (dims labelled `roles`) as a tensor whose dims are `target`, in that order (a None in
    `target`: a size-1 dim inserted there)."""
    ones = [i for i, r in enumerate(roles) if r is None]
    if ones:
        node = emit(graph, anchor, aten.squeeze.dims, (node, ones))
        roles = tuple(r for r in roles if r is not None)
    order = [roles.index(r) for r in target if r is not None]
    if order != list(range(len(order))):
        node = emit(graph, anchor, aten.permute.default, (node, order))
    for i, role in enumerate(target):
        if role is None:
            node = emit(graph, anchor, aten.unsqueeze.default, (node, i))
    return node


def _ancestors(nodes: list) -> set:
    seen, todo = set(), list(nodes)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def _erase_dead(graph: fx.Graph, candidates: set) -> None:
    """Drop the loop's nodes that nothing reads any more (side-effect-free call_functions only)."""
    for node in reversed(list(graph.nodes)):
        if node not in candidates or node.op != "call_function":
            continue
        for check in [u for u in node.users if u.target in CHECKS and not u.users]:
            graph.erase_node(check)
        if not node.users and not node.is_impure():
            graph.erase_node(node)
