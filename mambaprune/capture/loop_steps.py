"""Reading one step of an unrolled token loop (token_loops.py): the factors of its decay Abar_t, of its
update Bx_t and of its readout C_t, each followed through the data movement torch.export leaves
around it to the tensor it comes from, with what each dim of that tensor runs over.

A factor read at step t ends at a `Term`: a node and, per dim, an index of the state h's dims, "l"
for the token axis (reached through a `select` / `slice` of index t, or broadcast from a tensor that
has it), or None for a size-1 dim. Followed: full slices, select / slice of step t, unsqueeze,
squeeze, views that only add or drop size-1 dims, expand, transpose, permute, casts, and the
broadcasting `mul`s and sum-free einsums of a product. The readout is a product with the state summed
over one dim, a matmul with a column, or an einsum summing one of the state's letters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .graph_edit import shape_of

aten = torch.ops.aten

SAME = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype, aten._to_copy.default,
        aten.to.dtype_layout, aten.detach.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
CHECKS = (aten._assert_tensor_metadata.default,)   # export's dtype checks before a .to(): not readers


@dataclass(frozen=True)
class Term:
    """A factor read at one step: the tensor it comes from and, per dim of that tensor, what the dim
    runs over (an index of the state h's dims, "l" for the token axis, None for a size-1 dim)."""

    node: fx.Node
    roles: tuple


@dataclass(frozen=True)
class Step:
    state: fx.Node       # h_t
    decay: tuple         # Terms of the exponent of Abar_t
    update: tuple        # Terms of Bx_t
    readout: Optional[Term]      # C_t (None: the states are stacked and read out after the loop)
    contracted: Optional[int]    # the state dim summed in the readout (n)
    output: fx.Node      # y_t (the state h_t itself when it is read out after the loop)
    skip: tuple = ()     # Terms of D * u_t when the step adds it to its readout (y_t = <h_t, C_t> + D * u_t)


# a step never reads this token: the index of a tensor read whole (after the loop) matches no slice
WHOLE = -(1 << 62)


def parse_step(t: int, state: fx.Node, decay: fx.Node, update: fx.Node) -> Optional[Step]:
    shape = shape_of(state)
    roles = tuple(range(len(shape)))
    decay_roles, update_roles = (_broadcast_roles(shape_of(x), shape, roles) if shape_of(x) is not None else None
                                 for x in (decay, update))
    exponent = _strip(decay, decay_roles, t) if decay_roles is not None else None
    if exponent is None or update_roles is None:
        return None
    node, exp_roles = exponent
    if node.target is not aten.exp.default:
        return None
    decay_terms = _product(node.args[0], exp_roles, t)
    update_terms = _product(update, update_roles, t)
    if decay_terms is None or update_terms is None:
        return None
    if stacked_state(state) is not None:       # mamba.py: hs.append(h), read out after torch.stack(hs)
        return Step(state, tuple(decay_terms), tuple(update_terms), None, None, settled(state))
    readout = _readout(state, roles, t)
    if readout is None:
        return None
    c_term, contracted, output = readout
    skip = _skip(output, tuple(r for r in roles if r != contracted), t)
    if skip is None:
        return Step(state, tuple(decay_terms), tuple(update_terms), c_term, contracted, output)
    terms, output = skip
    return Step(state, tuple(decay_terms), tuple(update_terms), c_term, contracted, output, terms)


def stacked_state(state: fx.Node) -> Optional[fx.Node]:
    """The `stack` that the state's one reader besides the next update is, if it is one."""
    state = settled(state)
    reading = [u for u in readers(state) if next_update(state, u) is None]
    return reading[0] if len(reading) == 1 and reading[0].target is aten.stack.default else None


def read_out_stacked(stack: fx.Node, state_rank: int) -> Optional[tuple]:
    """(C's Term, the contracted state dim, y) for the readout of the stacked states `stack` (its dims:
    the state's, with the token axis "l" at the stack's dim), read after the loop."""
    dim = normal(stack.args[1] if len(stack.args) > 1 else 0, state_rank + 1)
    roles = tuple(range(state_rank))
    return _readout(stack, roles[:dim] + ("l",) + roles[dim:], WHOLE)


def _skip(output: fx.Node, roles: tuple, t: int) -> Optional[tuple]:
    """(the Terms of D * u_t, y_t) when the readout's one user adds D * u_t to it (roles: its dims')."""
    if len(output.users) != 1:
        return None
    add = next(iter(output.users))
    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1 \
            or shape_of(add) != shape_of(output):
        return None
    other = add.args[1] if add.args[0] is output else add.args[0]
    inner = _broadcast_roles(shape_of(other), shape_of(output), roles) if shape_of(other) is not None else None
    terms = _product(other, inner, t) if inner is not None else None
    return (tuple(terms), add) if terms is not None and len(terms) == 2 else None


def normal(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _strip(node, roles: tuple, t: int) -> Optional[tuple]:
    """(the node below the data movement around `node`, its dims' roles); None if it cannot be read."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        target, args = node.target, node.args
        src = args[0] if args else None
        if target in SAME:
            node = src
        elif target is aten.slice.Tensor:
            dim = normal(args[1] if len(args) > 1 else 0, len(shape_of(src)))
            if _is_full_slice(node):
                node = src
            elif args[2:4] == (t, t + 1) and args[4:] in ((), (1,)) and roles[dim] is None and "l" not in roles:
                roles = roles[:dim] + ("l",) + roles[dim + 1:]
                node = src
            else:
                break       # a part of a tensor: read as a tensor of its own (each step must read the same)
        elif target is aten.select.int:
            dim = normal(args[1], len(shape_of(src)))
            if args[2] != t or "l" in roles:
                return None
            roles = roles[:dim] + ("l",) + roles[dim:]
            node = src
        elif target is aten.unsqueeze.default:
            dim = normal(args[1], len(roles))
            if roles[dim] is not None:
                return None
            roles = roles[:dim] + roles[dim + 1:]
            node = src
        elif target is aten.squeeze.dim:
            dim = normal(args[1], len(shape_of(src)))
            if shape_of(src)[dim] != 1:
                return None
            roles = roles[:dim] + (None,) + roles[dim:]
            node = src
        elif target is aten.transpose.int:
            a, b = (normal(d, len(roles)) for d in args[1:3])
            swapped = list(roles)
            swapped[a], swapped[b] = roles[b], roles[a]
            roles, node = tuple(swapped), src
        elif target is aten.permute.default:
            order = [normal(d, len(roles)) for d in args[1]]
            back = [None] * len(roles)
            for out_dim, in_dim in enumerate(order):
                back[in_dim] = roles[out_dim]
            roles, node = tuple(back), src
        elif target is aten.expand.default:
            src_shape = shape_of(src)
            offset = len(roles) - len(src_shape)
            roles = tuple(None if size == 1 else roles[offset + i] for i, size in enumerate(src_shape))
            node = src
        elif target in _VIEWS:
            inner = _through_view(shape_of(src), shape_of(node), roles)
            if inner is None:
                break       # a view that splits or merges dims: read as a tensor of its own
            roles, node = inner, src
        else:
            break
    if not isinstance(node, fx.Node) or shape_of(node) is None or len(shape_of(node)) != len(roles):
        return None
    return node, roles


def _through_view(src: tuple, out: tuple, roles: tuple) -> Optional[tuple]:
    """The roles of a view's input when the view only adds or drops size-1 dims."""
    kept = [(size, role) for size, role in zip(out, roles) if size != 1]
    big = [i for i, size in enumerate(src) if size != 1]
    if len(big) != len(kept) or any(src[i] is not size and src[i] != size for i, (size, _) in zip(big, kept)):
        return None
    back = [None] * len(src)
    for i, (_, role) in zip(big, kept):
        back[i] = role
    return tuple(back)


def _product(node, roles: tuple, t: int) -> Optional[list]:
    """The factors of a product (a tree of broadcasting `mul`s), each read through its data movement."""
    stripped = _strip(node, roles, t)
    if stripped is None:
        return None
    node, roles = stripped
    if node.target is aten.einsum.default:
        return _einsum_product(node, roles, t)
    if node.target is not aten.mul.Tensor:
        return [Term(node, roles)]
    terms = []
    for arg in node.args[:2]:
        if not isinstance(arg, fx.Node) or shape_of(arg) is None:
            return None
        inner = _broadcast_roles(shape_of(arg), shape_of(node), roles)
        if inner is None:
            return None
        part = _product(arg, inner, t)
        if part is None:
            return None
        terms.extend(part)
    return terms


def _subscripts(node: fx.Node) -> Optional[tuple]:
    """(the operands' subscripts, the output's) of a plain einsum (no ellipsis, no repeated letter)."""
    equation = node.args[0].replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    lhs, out = equation.split("->")
    inputs = lhs.split(",")
    if any(len(set(x)) != len(x) for x in (*inputs, out)) or len(inputs) != len(node.args[1]):
        return None
    return inputs, out


def _einsum_product(node: fx.Node, roles: tuple, t: int) -> Optional[list]:
    """An einsum that sums nothing (every letter in the output) is a broadcasting product."""
    parsed = _subscripts(node)
    if parsed is None:
        return None
    inputs, out = parsed
    terms = []
    for letters, arg in zip(inputs, node.args[1]):
        if not set(letters) <= set(out) or shape_of(arg) is None:
            return None
        inner = tuple(None if size == 1 else roles[out.index(c)] for c, size in zip(letters, shape_of(arg)))
        part = _product(arg, inner, t)
        if part is None:
            return None
        terms.extend(part)
    return terms


def _einsum_readout(reader: fx.Node, state: fx.Node, roles: tuple, t: int) -> Optional[tuple]:
    """`einsum("bdn,bn->bd", h, C_t)`: the state's one letter missing from the output is summed."""
    parsed = _subscripts(reader)
    operands = list(reader.args[1])
    if parsed is None or len(operands) != 2 or operands.count(state) != 1:
        return None
    (first, second), out = parsed
    mine, other, column = (first, second, operands[1]) if operands[0] is state else (second, first, operands[0])
    summed = [c for c in mine if c not in out]
    if len(summed) != 1 or out != mine.replace(summed[0], "") or not set(other) <= set(mine) \
            or summed[0] not in other or shape_of(column) is None:
        return None
    inner = tuple(None if size == 1 else roles[mine.index(c)] for c, size in zip(other, shape_of(column)))
    terms = _product(column, inner, t)
    return (terms[0], roles[mine.index(summed[0])], reader) if terms is not None and len(terms) == 1 else None


def _broadcast_roles(arg: tuple, out: tuple, roles: tuple) -> Optional[tuple]:
    offset = len(out) - len(arg)
    if offset < 0:
        return None
    inner = []
    for i, size in enumerate(arg):
        role = roles[offset + i]
        inner.append(None if size == 1 else role)
    return tuple(inner)


def _readout(state: fx.Node, roles: tuple, t: int) -> Optional[tuple]:
    """(C_t's Term, the contracted state dim, y_t) for the one user of `state` (its dims: `roles`)
    that reads it out."""
    state = settled(state)
    shape = shape_of(state)
    rank = len(shape)
    reading = [u for u in readers(state) if next_update(state, u) is None]
    if len(reading) != 1:
        return None
    reader = reading[0]
    while reader.target in SAME and len(readers(reader)) == 1:   # transformers: ssm_state.to(dtype)
        state, reader = reader, readers(reader)[0]
    if reader.target is aten.mul.Tensor and len(reader.users) == 1 and shape_of(reader) == shape:
        other = reader.args[1] if reader.args[0] is state else reader.args[0]
        total = next(iter(reader.users))
        if total.target is not aten.sum.dim_IntList or len(total.args[1]) != 1 \
                or (total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)):
            return None
        contracted = roles[normal(total.args[1][0], rank)]
        inner = _broadcast_roles(shape_of(other), shape, roles)
        terms = _product(other, inner, t) if inner is not None else None
        return (terms[0], contracted, total) if terms is not None and len(terms) == 1 else None
    if reader.target is aten.einsum.default:
        return _einsum_readout(reader, state, roles, t)
    if reader.target is aten.matmul.default and reader.args[0] is state and len(reader.users) == 1:
        column = reader.args[1]
        col_shape = shape_of(column)
        if col_shape is None or len(col_shape) < 2 or col_shape[-1] != 1:
            return None
        batch = _broadcast_roles(col_shape[:-2], shape[:-2], roles[:-2])
        if batch is None:
            return None
        terms = _product(column, batch + (roles[-1], None), t)
        squeeze = _past_full_slices(reader)
        last = len(shape_of(reader)) - 1
        on_last = normal(squeeze.args[1], last + 1) == last if len(squeeze.args) > 1 else False
        if not on_last or not (squeeze.target is aten.squeeze.dim or
                               (squeeze.target is aten.select.int and squeeze.args[2] == 0)):
            return None
        return (terms[0], roles[-1], squeeze) if terms is not None and len(terms) == 1 else None
    return None


def readers(node: fx.Node) -> list:
    return [u for u in node.users if u.target not in CHECKS]


def settled(state: fx.Node) -> fx.Node:
    """The state past casts that are its only reader: `h.to(h.dtype)` is h itself, and torch.export
    hands that node to every later reader of h (the next update too)."""
    while len(nxt := readers(state)) == 1 and nxt[0].target in SAME and shape_of(nxt[0]) == shape_of(state):
        state = nxt[0]
    return state


def _past_full_slices(node: fx.Node) -> fx.Node:
    """The one user of `node`, past any full slices (torch.export writes `x[:, :, 0]` as one)."""
    user = next(iter(node.users))
    while user.target is aten.slice.Tensor and len(user.users) == 1 and _is_full_slice(user):
        user = next(iter(user.users))
    return user


def _is_full_slice(node: fx.Node) -> bool:
    src, args = node.args[0], node.args
    dim = normal(args[1] if len(args) > 1 else 0, len(shape_of(src)))
    start = args[2] if len(args) > 2 else None
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    return step == 1 and start in (None, 0) and (end is None or (isinstance(end, int) and end >= shape_of(src)[dim]))


def next_update(state: fx.Node, mul: fx.Node) -> Optional[tuple]:
    """(h_next, Abar, Bx) when the user `mul` of `state` starts h_next = Abar * state + Bx; else None."""
    if mul.target is not aten.mul.Tensor or len(mul.users) != 1 or len(mul.args) != 2:
        return None
    add = next(iter(mul.users))
    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    decay = mul.args[1] if mul.args[0] is state else mul.args[0]
    update = add.args[1] if add.args[0] is mul else add.args[0]
    if not (isinstance(decay, fx.Node) and isinstance(update, fx.Node)) or decay is state \
            or shape_of(add) != shape_of(state):
        return None
    return add, decay, update
