"""Token-axis propagation over an exported (ATen) graph.

For every node this decides, from the graph alone, which dimension of its output is the token axis
and in which layout (see `layout.py`) the tokens sit, or that the node is a 2-D grid view of the
tokens, or that it does something to the token axis the compiler does not understand. The facts are
stored in `node.meta["mambaprune.tokens"]`; the passes rewrite nodes according to them.

Seeds: the first tensors (in topological order) with exactly one dimension whose size is the token
count of a selective scan, batch first, or a 4-D map with exactly one pair of adjacent dims whose
product is a token count (a (B, C, H, W) or (B, H, W, C) grid). The token axis then flows through
view/permute/pointwise rules; anything else that touches it becomes `Unknown(reason)`.

Directions folded into one tensor (VMamba's cross-scan: a stack/cat of the tokens in row-major,
column-major and reversed orders, scanned by ONE call with grouped B/C) are `MultiTok`: equal parts
along a group axis, each in its own layout. Every rule that would mix the parts (a reduction, norm
or projection over the group axis, a conv along the tokens) refuses.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.fx as fx

from .layout import Layout

META_KEY = "mambaprune.tokens"
aten = torch.ops.aten


@dataclass(frozen=True)
class Tok:
    """Output dim `dim` is the token axis, `layout.length` long, slots in `layout` order."""
    dim: int
    layout: Layout


@dataclass(frozen=True)
class BatchTok:
    """Batch and tokens flattened into one dim `dim` (batch-major), as `rearrange(x, "b l d -> d (b l)")`."""
    dim: int
    layout: Layout


@dataclass(frozen=True)
class PaddedTok:
    """A conv1d output along the tokens, before the slice that brings it back to L tokens."""
    dim: int
    layout: Layout
    padding: int
    conv: fx.Node


@dataclass(frozen=True)
class Grid:
    """The tokens laid out as an H x W grid in dims (hdim, wdim); cell (i, j) is slot i*W + j."""
    hdim: int
    wdim: int
    layout: Layout
    height: int
    width: int


@dataclass(frozen=True)
class MultiTok:
    """Token axis `dim`; along `gdim` the tensor holds len(layouts) equal parts, part g in layouts[g].

    Built only through `multi()`: a MultiTok always has at least two distinct layouts.
    """
    dim: int
    gdim: int
    layouts: tuple


def multi(dim: int, gdim: int, layouts) -> Union["Tok", MultiTok]:
    """A tensor whose parts are all in one layout is simply in that layout."""
    layouts = tuple(layouts)
    if all(layout == layouts[0] for layout in layouts):
        return Tok(dim, layouts[0])
    return MultiTok(dim, gdim, layouts)


@dataclass(frozen=True)
class Unknown:
    """The node does something to the token axis that the compiler cannot rewrite."""
    reason: str


@dataclass(frozen=True)
class Readout:
    """A token-axis reduction (pooling) or a constant-index read (class token) that ends the tokens."""
    kind: str                      # "select" or "pool"
    position: Optional[int] = None  # original position read, for "select"


Info = Union[Tok, BatchTok, PaddedTok, Grid, MultiTok, Unknown, Readout, tuple, None]

def scan_op():
    return torch.ops.mambaprune.selective_scan.default


def is_scan(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == scan_op()


_IDENTITY_OPS = {
    "aten::clone", "aten::contiguous", "aten::detach", "aten::alias", "aten::_to_copy", "aten::to",
    "aten::type_as", "aten::dropout", "aten::lift_fresh_copy", "aten::_assert_tensor_metadata",
    "aten::feature_dropout", "aten::alpha_dropout",
}
_VIEW_OPS = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten",
             "aten::squeeze", "aten::unsqueeze", "aten::expand", "aten::view_as", "aten::reshape_as",
             "aten::expand_as"}
_REDUCE_OPS = {"aten::mean", "aten::sum", "aten::amax", "aten::amin", "aten::max", "aten::min",
               "aten::std", "aten::var", "aten::logsumexp", "aten::prod", "aten::norm"}
_NORM_LAST_OPS = {"aten::layer_norm", "aten::rms_norm", "aten::native_layer_norm"}
_CHANNEL_OPS = {"aten::batch_norm", "aten::_native_batch_norm_legit_no_training",
                "aten::instance_norm"}


def op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def shape_of(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def is_static(size) -> bool:
    return isinstance(size, int)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _tensor_args(node: fx.Node) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return out


def info_of(node) -> Info:
    return node.meta.get(META_KEY) if isinstance(node, fx.Node) else None


def is_token_info(info) -> bool:
    return isinstance(info, (Tok, BatchTok, PaddedTok, Grid, MultiTok))


_PRIMES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049)


def _concrete(size) -> int:
    """A symbolic size with its symbols replaced by large distinct primes (to pair view groups)."""
    if is_static(size):
        return size
    expr = size.node.expr
    symbols = sorted(expr.free_symbols, key=str)
    return int(expr.subs({sym: _PRIMES[i % len(_PRIMES)] for i, sym in enumerate(symbols)}))


def view_groups(in_shape: Sequence, out_shape: Sequence) -> Optional[list]:
    """Pair consecutive dims of two shapes with equal products: [(in_dims, out_dims), ...]."""
    a = [_concrete(x) for x in in_shape]
    b = [_concrete(x) for x in out_shape]
    groups, i, j = [], 0, 0
    n, m = len(a), len(b)
    while i < n or j < m:
        if i < n and a[i] == 1 and not (j < m and b[j] == 1):
            groups.append(([i], [])); i += 1; continue
        if j < m and b[j] == 1 and not (i < n and a[i] == 1):
            groups.append(([], [j])); j += 1; continue
        if i >= n or j >= m:
            return None
        gi, gj = [i], [j]
        pi, pj = a[i], b[j]
        i += 1; j += 1
        while pi != pj:
            if pi < pj:
                if i >= n:
                    return None
                pi *= a[i]; gi.append(i); i += 1
            else:
                if j >= m:
                    return None
                pj *= b[j]; gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


class TokenFlow:
    """Runs the propagation; `run()` fills node.meta[META_KEY] for every node."""

    def __init__(self, gm: fx.GraphModule, token_lengths: set):
        self.gm = gm
        self.token_lengths = token_lengths
        self.protected: set = set()       # original positions that must never be pruned
        self.barriers: list = []          # nodes a pruning site must precede (downsampling between stages)
        self.class_tokens: set = set()
        self.input_dependent: set = set()

    # -- driver -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.input_dependent.add(node)
            elif any(a in self.input_dependent for a in _tensor_args(node)):
                self.input_dependent.add(node)
            node.meta[META_KEY] = self.infer(node)

    def infer(self, node: fx.Node) -> Info:
        if node.op != "call_function":
            return None
        args = _tensor_args(node)
        infos = [info_of(a) for a in args]
        unknown = next((i for i in infos if isinstance(i, Unknown)), None)
        if unknown is not None:
            return Unknown(unknown.reason)
        if not any(is_token_info(i) or isinstance(i, tuple) for i in infos):
            return self.seed(node)
        try:
            return self.rule(node)
        except _NotUnderstood as err:
            return Unknown(str(err))
        except Exception as err:  # a rule met a form it was not written for: refuse, never crash
            return Unknown(f"{op_name(node)} could not be analysed ({type(err).__name__}: {err})")

    def seed(self, node: fx.Node) -> Info:
        shape = shape_of(node)
        if shape is None or len(shape) < 2 or is_static(shape[0]) or node not in self.input_dependent:
            return None
        dims = self.flattened_grid_dim(node, shape)
        if dims and self.flattens_transposed_grid(node, shape):
            return Unknown("a flatten of a transposed (B, C, H, W)-like map whose token order could not be traced")
        if not dims and len(shape) == 4:
            return self.grid_seed(shape)
        if not dims and len(shape) == 3:  # (B, L, D) or (B, D, L)
            dims = [d for d in (1, 2) if is_static(shape[d]) and shape[d] in self.token_lengths]
        if len(dims) != 1:
            return None
        if node.target == aten.cat.default:
            self.note_class_tokens(node, dims[0])
        return Tok(dims[0], Layout.identity(shape[dims[0]]))

    def grid_seed(self, shape) -> Optional[Grid]:
        """A (B, C, H, W) or (B, H, W, C) map: exactly one pair of adjacent dims multiplies to a token count."""
        pairs = [(d, d + 1) for d in (1, 2) if is_static(shape[d]) and is_static(shape[d + 1])
                 and shape[d] * shape[d + 1] in self.token_lengths]
        if len(pairs) != 1:
            return None
        h, w = pairs[0]
        return Grid(h, w, Layout.identity(shape[h] * shape[w]), shape[h], shape[w])

    def flattened_grid_dim(self, node: fx.Node, shape) -> list:
        """When a width equals the token count, the token axis is the one a flatten of the grid made."""
        if op_name(node) not in _VIEW_OPS or not isinstance(node.args[0], fx.Node):
            return []
        groups = view_groups(shape_of(node.args[0]), shape) or []
        return [go[0] for gi, go in groups if len(gi) == 2 and len(go) == 1 and shape[go[0]] in self.token_lengths]

    def flattens_transposed_grid(self, node: fx.Node, shape) -> bool:
        """An untracked map whose two flattened dims were swapped by a permute/transpose before the flatten.

        Seeding it as row-major would be wrong (it is the column-major order of the map it came from).
        """
        groups = view_groups(shape_of(node.args[0]), shape) or []
        flattened = next(gi for gi, go in groups if len(gi) == 2 and len(go) == 1 and shape[go[0]] in self.token_lengths)
        source = node.args[0]
        while isinstance(source, fx.Node) and op_name(source) in _IDENTITY_OPS:
            source = source.args[0]
        if not isinstance(source, fx.Node) or op_name(source) not in ("aten::permute", "aten::transpose"):
            return False
        ndim = len(shape_of(source))
        if op_name(source) == "aten::permute":
            perm = [norm_dim(d, ndim) for d in source.args[1]]
        else:
            perm = list(range(ndim))
            a, b = norm_dim(source.args[1], ndim), norm_dim(source.args[2], ndim)
            perm[a], perm[b] = perm[b], perm[a]
        return perm[flattened[0]] > perm[flattened[1]]

    def note_class_tokens(self, cat: fx.Node, dim: int) -> None:
        """Slots of a concatenation that come from parameters, not from the image, are class tokens."""
        offset = 0
        for part in cat.args[0]:
            size = shape_of(part)[dim]
            if part not in self.input_dependent:
                self.class_tokens.update(range(offset, offset + size))
            offset += size
        self.protected.update(self.class_tokens)

    # -- rules ------------------------------------------------------------------------------
    def rule(self, node: fx.Node) -> Info:
        name = op_name(node)
        if name == "getitem":
            parent = info_of(node.args[0])
            return parent[node.args[1]] if isinstance(parent, tuple) else parent
        x = node.args[0] if node.args else None
        xi = info_of(x)
        if is_scan(node):
            return self.scan_rule(node)
        if isinstance(xi, PaddedTok) and name != "aten::slice":
            raise _NotUnderstood(f"{name} on a padded conv1d output (expected the slice back to L tokens)")
        if name in _IDENTITY_OPS:
            return xi
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
            return self.pointwise_rule(node)
        handler = getattr(self, "rule_" + name.split("::")[-1], None)
        if handler is not None:
            return handler(node, xi)
        if name in _VIEW_OPS:
            return self.view_rule(node, xi)
        if name in _REDUCE_OPS:
            return self.reduce_rule(node, xi)
        if name in _NORM_LAST_OPS:
            return self.norm_last_rule(node, xi)
        if name in _CHANNEL_OPS:
            return self.channel_rule(node, xi)
        raise _NotUnderstood(f"{name} on the token axis is not a rewrite the compiler knows")

    def pointwise_rule(self, node: fx.Node) -> Info:
        out_shape = shape_of(node)
        found = []
        for a in _tensor_args(node):
            i = info_of(a)
            if i is None:
                continue
            if not isinstance(i, (Tok, BatchTok, Grid, MultiTok)):
                raise _NotUnderstood(f"{op_name(node)} mixes a token tensor with {type(i).__name__}")
            shift = len(out_shape) - len(shape_of(a))
            found.append(_shift(i, shift))
        first = found[0]
        if any(f != first for f in found[1:]):
            raise _NotUnderstood(f"{op_name(node)} combines tensors whose tokens are in different orders")
        return first

    def scan_rule(self, node: fx.Node) -> Info:
        """Every input in one order, or (grouped B/C) channel group g of every input in layouts[g]."""
        u, delta, _a, b, c = node.args[:5]
        z = _arg(node, 6, "z")
        per_group = []
        for name, t in (("u", u), ("delta", delta), ("B", b), ("C", c), ("z", z)):
            if t is None:
                continue
            i = info_of(t)
            ndim = len(shape_of(t))
            if not isinstance(i, (Tok, MultiTok)) or i.dim != ndim - 1:
                raise _NotUnderstood(f"selective scan input {name} does not carry the tokens on its last axis")
            if isinstance(i, MultiTok) and (i.gdim != 1 or name in ("B", "C") and ndim != 4):
                raise _NotUnderstood(f"selective scan input {name} holds token orders along an axis that is not "
                                     "its channel / group axis")
            per_group.append(i.layouts if isinstance(i, MultiTok) else (i.layout,))
        count = int(np.lcm.reduce([len(p) for p in per_group]))
        expanded = {tuple(layout for layout in p for _ in range(count // len(p))) for p in per_group}
        if len(expanded) != 1:
            raise _NotUnderstood("selective scan inputs are in different token orders (the channel groups of u, "
                                 "delta and z do not match the groups of B/C in order)")
        return multi(2, 1, expanded.pop())

    def view_rule(self, node: fx.Node, xi: Info) -> Info:
        in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
        groups = view_groups(in_shape, out_shape)
        if groups is None:
            raise _NotUnderstood(f"{op_name(node)} {in_shape} -> {out_shape} could not be followed")
        if isinstance(xi, Tok):
            for gi, go in groups:
                if xi.dim not in gi:
                    continue
                if gi == [xi.dim] and len(go) == 1:
                    return Tok(go[0], xi.layout)
                if gi == [xi.dim] and len(go) == 2 and go[1] == go[0] + 1:
                    h, w = out_shape[go[0]], out_shape[go[1]]
                    return Grid(go[0], go[1], xi.layout, h, w)
                if _is_batch_then_token(gi, xi.dim, in_shape) and len(go) == 1:
                    return BatchTok(go[0], xi.layout)
                raise _NotUnderstood(f"{op_name(node)} merges the token axis with other dims {in_shape} -> {out_shape}")
        if isinstance(xi, MultiTok):
            return _view_parts(xi, groups, in_shape, out_shape, op_name(node))
        if isinstance(xi, BatchTok):
            for gi, go in groups:
                if xi.dim not in gi:
                    continue
                if gi == [xi.dim] and len(go) == 1:
                    return BatchTok(go[0], xi.layout)
                if gi == [xi.dim] and len(go) == 2 and not is_static(out_shape[go[0]]) \
                        and out_shape[go[1]] == xi.layout.length:
                    return Tok(go[1], xi.layout)
            raise _NotUnderstood(f"{op_name(node)} reshapes flattened batch x tokens {in_shape} -> {out_shape}")
        if isinstance(xi, Grid):
            for gi, go in groups:
                if xi.hdim in gi or xi.wdim in gi:
                    if gi == [xi.hdim, xi.wdim] and len(go) == 1:
                        return Tok(go[0], xi.layout)
                    if gi == [xi.wdim, xi.hdim] and len(go) == 1:
                        return Tok(go[0], xi.layout.grid_transposed(xi.height, xi.width))
                    if len(gi) == 1 and len(go) == 1:
                        continue
                    raise _NotUnderstood(f"{op_name(node)} reshapes the token grid {in_shape} -> {out_shape}")
            hd = next(go[0] for gi, go in groups if gi == [xi.hdim])
            wd = next(go[0] for gi, go in groups if gi == [xi.wdim])
            return Grid(hd, wd, xi.layout, xi.height, xi.width)
        raise _NotUnderstood(f"{op_name(node)} of {type(xi).__name__}")

    def rule_expand(self, node, xi):
        """A broadcast of size-1 dims (einops repeat) keeps the token axis where it is."""
        in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
        shift = len(out_shape) - len(in_shape)
        aligned = all(a == 1 or str(a) == str(b) for a, b in zip(in_shape, out_shape[shift:]))
        if aligned and not isinstance(xi, (PaddedTok, Grid)) and in_shape[xi.dim] == out_shape[xi.dim + shift]:
            return _shift(xi, shift)
        return self.view_rule(node, xi)

    def rule_permute(self, node, xi):
        perm = [norm_dim(d, len(node.args[1])) for d in node.args[1]]
        return _permute(xi, perm)

    def rule_transpose(self, node, xi):
        ndim = len(shape_of(node))
        a, b = norm_dim(node.args[1], ndim), norm_dim(node.args[2], ndim)
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return _permute(xi, perm)

    def rule_t(self, node, xi):
        return _permute(xi, [1, 0])

    def rule_movedim(self, node, xi):
        ndim = len(shape_of(node))
        perm = list(np.moveaxis(np.arange(ndim), node.args[1], node.args[2]))
        return _permute(xi, [int(p) for p in perm])

    def rule_linear(self, node, xi):
        last = len(shape_of(node.args[0])) - 1
        if isinstance(xi, MultiTok) and xi.gdim == last:
            raise _NotUnderstood("a linear layer mixes directions folded into one tensor (parts in different orders)")
        if isinstance(xi, (Tok, BatchTok, MultiTok)) and xi.dim != last:
            return xi
        raise _NotUnderstood("a linear layer mixes the token axis")

    def rule_matmul(self, node, xi):
        a, b = node.args[0], node.args[1]
        ai, bi = info_of(a), info_of(b)
        out_nd = len(shape_of(node))
        if isinstance(ai, MultiTok) or isinstance(bi, MultiTok):
            raise _NotUnderstood("a matmul on directions folded into one tensor (only einsum and linear layers "
                                 "that keep the direction axis are understood)")
        if isinstance(ai, (Tok, BatchTok)) and bi is None and ai.dim != len(shape_of(a)) - 1:
            return _shift(ai, out_nd - len(shape_of(a)))
        if isinstance(bi, (Tok, BatchTok)) and ai is None and bi.dim == len(shape_of(b)) - 1:
            return type(bi)(out_nd - 1, bi.layout)
        raise _NotUnderstood("a matmul contracts or mixes the token axis")

    rule_bmm = rule_matmul
    rule_mm = rule_matmul

    def rule_einsum(self, node, xi):
        """The token letter (and a direction letter) pass through to the output; nothing sums over them."""
        equation, operands = node.args[0], list(node.args[1])
        if "->" not in equation or "." in equation:
            raise _NotUnderstood("an einsum without an explicit output (or with '...') on the token axis")
        lhs, output = equation.replace(" ", "").split("->")
        inputs = lhs.split(",")
        carriers = [k for k, op in enumerate(operands) if info_of(op) is not None]
        if len(carriers) != 1 or any(len(set(t)) != len(t) for t in inputs + [output]):
            raise _NotUnderstood("an einsum of two token tensors (or with a repeated index) mixes the token axis")
        k = carriers[0]
        info, letters = info_of(operands[k]), inputs[k]
        if not isinstance(info, (Tok, MultiTok)):
            raise _NotUnderstood(f"an einsum on a {type(info).__name__}")
        token = letters[info.dim]
        others = "".join(t for j, t in enumerate(inputs) if j != k)
        if token not in output or token in others or output[0] != letters[0]:
            raise _NotUnderstood("an einsum contracts or mixes the token axis")
        if isinstance(info, Tok):
            return Tok(output.index(token), info.layout)
        group = letters[info.gdim]
        if group not in output:
            raise _NotUnderstood("an einsum sums over directions folded into one tensor (parts in different orders)")
        return multi(output.index(token), output.index(group), info.layouts)

    def rule_conv1d(self, node, xi):
        if isinstance(xi, MultiTok):
            raise _NotUnderstood("conv1d along directions folded into one tensor (parts in different orders)")
        if not isinstance(xi, Tok) or xi.dim != len(shape_of(node.args[0])) - 1:
            raise _NotUnderstood("conv1d over a non-token axis of a token tensor")
        stride, padding, dilation = (_arg(node, i, k, d) for i, k, d in
                                     ((3, "stride", [1]), (4, "padding", [0]), (5, "dilation", [1])))
        if padding == "same":
            padding = [(shape_of(node.args[1])[-1] - 1) // 2]   # PyTorch's left pad for 'same'
        if isinstance(padding, str) or list(stride) != [1] or list(dilation) != [1]:
            raise _NotUnderstood("conv1d along the tokens with stride/dilation/'valid' padding")
        groups = _arg(node, 6, "groups", 1)
        channels = shape_of(node.args[0])[-2]
        if groups != channels or shape_of(node.args[1])[0] != channels:
            raise _NotUnderstood("conv1d along the tokens that is not depthwise")
        pad = padding[0]
        out_len = shape_of(node)[-1]
        if out_len == xi.layout.length:
            node.meta["mambaprune.conv_left"] = pad
            return Tok(xi.dim, xi.layout)
        return PaddedTok(xi.dim, xi.layout, pad, node)

    def rule_slice(self, node, xi):
        ndim = len(shape_of(node.args[0]))
        dim = norm_dim(_arg(node, 1, "dim", 0), ndim)
        start = _arg(node, 2, "start", None) or 0
        end = _arg(node, 3, "end", None)
        step = _arg(node, 4, "step", 1)
        size = shape_of(node.args[0])[dim]
        end = size if end is None or (is_static(end) and end > size) else end
        token_dim = getattr(xi, "dim", None) if not isinstance(xi, Grid) else None
        if isinstance(xi, Grid) and dim in (xi.hdim, xi.wdim):
            raise _NotUnderstood("slice of the token grid")
        if isinstance(xi, MultiTok) and dim == xi.gdim:
            if step != 1 or not is_static(start) or not is_static(end):
                raise _NotUnderstood("strided or symbolic slice of directions folded into one tensor")
            return _part_range(xi, start, end, size)
        if dim != token_dim:
            return xi
        if step != 1 or not is_static(start) or not is_static(end):
            raise _NotUnderstood("strided or symbolic slice of the token axis")
        if isinstance(xi, PaddedTok):
            if end - start != xi.layout.length:
                raise _NotUnderstood("slice of a padded conv1d output to a length other than L")
            xi.conv.meta["mambaprune.conv_left"] = xi.padding - start
            node.meta["mambaprune.conv_slice"] = xi.conv
            return Tok(xi.dim, xi.layout)
        if start == 0 and end == size:
            return xi
        raise _NotUnderstood(f"slice [{start}:{end}] of the token axis (only whole-axis slices are understood)")

    def rule_flip(self, node, xi):
        dims = [norm_dim(d, len(shape_of(node))) for d in node.args[1]]
        if isinstance(xi, Grid):
            if xi.hdim in dims or xi.wdim in dims:
                raise _NotUnderstood("flip of the token grid")
            return xi
        if isinstance(xi, MultiTok):
            layouts = xi.layouts[::-1] if xi.gdim in dims else xi.layouts
            if xi.dim in dims:
                layouts = tuple(layout.reversed() for layout in layouts)
            return multi(xi.dim, xi.gdim, layouts)
        if xi.dim in dims and not isinstance(xi, Tok):
            raise _NotUnderstood(f"flip of the token axis of a {type(xi).__name__}")
        return Tok(xi.dim, xi.layout.reversed()) if xi.dim in dims else xi

    def rule_index(self, node, xi):
        indices = list(node.args[1])
        if not isinstance(xi, Tok):
            raise _NotUnderstood("indexing of the token grid")
        used = [d for d, i in enumerate(indices) if i is not None]
        if used != [xi.dim]:
            raise _NotUnderstood("advanced indexing that touches more than the token axis")
        perm = self.constant_value(indices[xi.dim])
        return Tok(xi.dim, self.permuted(xi.layout, perm, node))

    def rule_index_select(self, node, xi):
        dim = norm_dim(node.args[1], len(shape_of(node)))
        if isinstance(xi, MultiTok):
            if dim in (xi.dim, xi.gdim):
                raise _NotUnderstood("index_select of the token or direction axis of directions folded into one tensor")
            return xi
        if not isinstance(xi, Tok) or dim != xi.dim:
            return xi if isinstance(xi, Tok) else self._raise("index_select on the token grid")
        perm = self.constant_value(node.args[2])
        return Tok(xi.dim, self.permuted(xi.layout, perm, node))

    def rule_select(self, node, xi):
        ndim = len(shape_of(node.args[0]))
        dim = norm_dim(node.args[1], ndim)
        if isinstance(xi, MultiTok):
            return _select_part(xi, dim, node.args[2], shape_of(node.args[0])[dim])
        if isinstance(xi, Tok) and dim == xi.dim:
            index = node.args[2]
            if not is_static(index):
                raise _NotUnderstood("select of a symbolic token index")
            position = int(xi.layout.path[index])
            self.protected.add(position)
            return Readout("select", position)
        if isinstance(xi, Grid) and dim in (xi.hdim, xi.wdim):
            raise _NotUnderstood("select of a grid row or column")
        return _drop_dim(xi, dim)

    def reduce_rule(self, node, xi):
        ndim = len(shape_of(node.args[0]))
        dims = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        dims = list(range(ndim)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
        dims = [norm_dim(d, ndim) for d in dims]
        token_dims = _token_dims(xi)
        if isinstance(xi, MultiTok) and xi.gdim in dims and xi.dim not in dims:
            raise _NotUnderstood(f"{op_name(node)} over directions folded into one tensor (parts in different orders)")
        if any(d in dims for d in token_dims):
            if isinstance(xi, (BatchTok, PaddedTok)):
                raise _NotUnderstood(f"{op_name(node)} over flattened batch x tokens")
            if isinstance(xi, Grid) and not all(d in dims for d in token_dims):
                raise _NotUnderstood("reduction over one axis of the token grid")
            if op_name(node) not in ("aten::mean", "aten::sum", "aten::amax", "aten::max"):
                raise _NotUnderstood(f"{op_name(node)} over the token axis")
            return Readout("pool")
        if keepdim:
            return xi
        for d in sorted(dims, reverse=True):
            xi = _drop_dim(xi, d)
        return xi

    def norm_last_rule(self, node, xi):
        normalized = len(node.args[1])
        ndim = len(shape_of(node.args[0]))
        token_dims = _token_dims(xi)
        if any(d >= ndim - normalized for d in token_dims):
            raise _NotUnderstood(f"{op_name(node)} normalises over the token axis")
        if isinstance(xi, MultiTok) and xi.gdim >= ndim - normalized:
            raise _NotUnderstood(f"{op_name(node)} normalises over directions folded into one tensor")
        return xi

    def channel_rule(self, node, xi):
        token_dims = _token_dims(xi)
        if 1 in token_dims:
            raise _NotUnderstood(f"{op_name(node)} over the token axis as channels")
        return xi

    def rule_conv2d(self, node, xi):
        if not isinstance(xi, Grid) or (xi.hdim, xi.wdim) != (2, 3):
            raise _NotUnderstood("conv2d over something other than the (B, C, H, W) token grid")
        out = shape_of(node)
        if (out[2], out[3]) != (xi.height, xi.width):
            # a new stage: its tokens start afresh; no site may lie before this node (analysis)
            self.barriers.append(node)
            return None
        stride = _arg(node, 3, "stride", [1, 1])
        if list(stride) not in ([1], [1, 1]):
            raise _NotUnderstood("strided conv2d on the token grid")
        return xi

    def rule_chunk(self, node, xi):
        return self._split_like(node, xi, _arg(node, 2, "dim", 0), len(node.meta["val"]))

    def rule_split(self, node, xi):
        return self._split_like(node, xi, _arg(node, 2, "dim", 0), len(node.meta["val"]))

    rule_split_with_sizes = rule_split
    rule_tensor_split = rule_split

    def rule_unbind(self, node, xi):
        dim = norm_dim(_arg(node, 1, "dim", 0), len(shape_of(node.args[0])))
        if dim in _token_dims(xi):
            raise _NotUnderstood("unbind of the token axis")
        size = shape_of(node.args[0])[dim]
        if isinstance(xi, MultiTok):
            return tuple(_select_part(xi, dim, i, size) for i in range(size))
        return tuple(_drop_dim(xi, dim) for _ in node.meta["val"])

    def _split_like(self, node, xi, dim, count):
        dim = norm_dim(dim, len(shape_of(node.args[0])))
        if dim in _token_dims(xi):
            raise _NotUnderstood(f"{op_name(node)} of the token axis")
        if isinstance(xi, MultiTok) and dim == xi.gdim:
            size, start, out = shape_of(node.args[0])[dim], 0, []
            for value in node.meta["val"]:
                out.append(_part_range(xi, start, start + value.shape[dim], size))
                start += value.shape[dim]
            return tuple(out)
        return tuple(xi for _ in range(count))

    def rule_cat(self, node, xi):
        parts = node.args[0]
        dim = norm_dim(_arg(node, 1, "dim", 0), len(shape_of(node)))
        infos = [info_of(p) for p in parts]
        if any(i is None for i in infos):
            raise _NotUnderstood("concatenation of token tensors with non-token tensors")
        if any(dim in _token_dims(i) for i in infos):
            raise _NotUnderstood("concatenation along the token axis")
        if all(i == infos[0] for i in infos) and not isinstance(infos[0], MultiTok):
            return infos[0]
        return _concat_parts(parts, infos, dim)

    def rule_stack(self, node, xi):
        """Token tensors stacked along a new axis: one part per tensor (directions folded into one tensor)."""
        parts = node.args[0]
        dim = norm_dim(_arg(node, 1, "dim", 0), len(shape_of(node)))
        infos = [info_of(p) for p in parts]
        if dim == 0 or not all(isinstance(i, Tok) and i.dim == infos[0].dim for i in infos):
            raise _NotUnderstood("stack of tensors that are not token tensors with one token axis (or along the batch)")
        i0 = infos[0]
        return multi(i0.dim + (1 if dim <= i0.dim else 0), dim, [i.layout for i in infos])

    def rule_scaled_dot_product_attention(self, node, xi):
        q, k, v = node.args[:3]
        qi = info_of(q)
        if not isinstance(qi, Tok) or qi.dim != len(shape_of(q)) - 2:
            raise _NotUnderstood("attention whose queries do not carry the tokens")
        if _arg(node, 3, "attn_mask", None) is not None:
            raise _NotUnderstood("attention with a mask over the tokens")
        return qi

    def rule_softmax(self, node, xi):
        dim = norm_dim(node.args[1], len(shape_of(node)))
        if dim in _token_dims(xi):
            raise _NotUnderstood("softmax over the token axis")
        if isinstance(xi, MultiTok) and dim == xi.gdim:
            raise _NotUnderstood("softmax over directions folded into one tensor")
        return xi

    rule__softmax = rule_softmax
    rule_log_softmax = rule_softmax

    def rule_sym_size(self, node, xi):
        return None

    def _raise(self, msg):
        raise _NotUnderstood(msg)

    # -- constants -----------------------------------------------------------------------------
    def constant_value(self, node) -> np.ndarray:
        value = _constant_tensor(self.gm, node)
        if value is None:
            raise _NotUnderstood("a token gather whose index is computed at run time (only constant permutations are understood)")
        return value.detach().cpu().numpy().astype(np.int64).reshape(-1)

    def permuted(self, layout: Layout, perm: np.ndarray, node) -> Layout:
        if len(perm) != layout.length or not np.array_equal(np.sort(perm), np.arange(layout.length)):
            raise _NotUnderstood("a constant token gather that is not a permutation of all tokens")
        node.meta["mambaprune.permutation"] = perm
        return layout.permuted(perm)


class _NotUnderstood(Exception):
    pass


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shift(info, shift: int):
    if shift == 0 or info is None:
        return info
    if isinstance(info, MultiTok):
        return MultiTok(info.dim + shift, info.gdim + shift, info.layouts)
    if isinstance(info, (Tok, BatchTok)):
        return type(info)(info.dim + shift, info.layout)
    if isinstance(info, Grid):
        return Grid(info.hdim + shift, info.wdim + shift, info.layout, info.height, info.width)
    raise _NotUnderstood(f"broadcast of {type(info).__name__}")


def _permute(info, perm: list):
    if info is None:
        return None
    where = {old: new for new, old in enumerate(perm)}
    if isinstance(info, MultiTok):
        return MultiTok(where[info.dim], where[info.gdim], info.layouts)
    if isinstance(info, (Tok, BatchTok, PaddedTok)):
        if isinstance(info, PaddedTok):
            raise _NotUnderstood("permute of a padded conv1d output")
        return type(info)(where[info.dim], info.layout)
    if isinstance(info, Grid):
        return Grid(where[info.hdim], where[info.wdim], info.layout, info.height, info.width)
    raise _NotUnderstood("permute of a token readout")


def _token_dims(info) -> list:
    return [info.hdim, info.wdim] if isinstance(info, Grid) else [info.dim]


def _is_batch_then_token(group: list, token_dim: int, shape) -> bool:
    return len(group) == 2 and group[1] == token_dim and not is_static(shape[group[0]])


def _drop_dim(info, dim: int):
    if isinstance(info, MultiTok):
        if dim == info.gdim:
            raise _NotUnderstood("drops the axis that holds directions folded into one tensor")
        return MultiTok(info.dim - (dim < info.dim), info.gdim - (dim < info.gdim), info.layouts)
    if isinstance(info, Tok):
        return Tok(info.dim - (1 if dim < info.dim else 0), info.layout)
    if isinstance(info, Grid):
        return Grid(info.hdim - (dim < info.hdim), info.wdim - (dim < info.wdim), info.layout,
                    info.height, info.width)
    return info


def _part_size(info: MultiTok, size) -> int:
    if not is_static(size) or size % len(info.layouts):
        raise _NotUnderstood("directions folded into one tensor along an axis that does not split into equal parts")
    return size // len(info.layouts)


def _part_range(info: MultiTok, start: int, end: int, size) -> Info:
    """Slots [start, end) of the direction axis: whole parts only."""
    part = _part_size(info, size)
    if start % part or end % part:
        raise _NotUnderstood("a slice that cuts through a direction of directions folded into one tensor")
    return multi(info.dim, info.gdim, info.layouts[start // part:end // part])


def _select_part(info: MultiTok, dim: int, index, size) -> Info:
    """x.select(dim, index): one slot of the direction axis is a tensor in that part's layout."""
    if dim == info.dim:
        raise _NotUnderstood("select of a token of directions folded into one tensor")
    if dim != info.gdim:
        return _drop_dim(info, dim)
    if not is_static(index):
        raise _NotUnderstood("select of a symbolic direction")
    index = index + size if index < 0 else index
    return Tok(info.dim - (dim < info.dim), info.layouts[index // _part_size(info, size)])


def _concat_parts(parts: list, infos: list, dim: int) -> Info:
    """Token tensors in different orders side by side along `dim`: the parts of a MultiTok."""
    layouts, sizes = [], set()
    for part, info in zip(parts, infos):
        if isinstance(info, Tok):
            own = (info.layout,)
        elif isinstance(info, MultiTok) and info.gdim == dim:
            own = info.layouts
        else:
            raise _NotUnderstood("concatenation of token tensors in different orders (or with non-token tensors)")
        if info.dim != infos[0].dim or dim == 0:
            raise _NotUnderstood("concatenation of token tensors in different orders along different axes")
        sizes.add(_part_size(MultiTok(info.dim, dim, own), shape_of(part)[dim]))
        layouts.extend(own)
    if len(sizes) != 1:
        raise _NotUnderstood("concatenation of directions of unequal sizes")
    return multi(infos[0].dim, dim, layouts)


def _view_parts(info: MultiTok, groups: list, in_shape, out_shape, name: str) -> Info:
    """A view keeps the token axis alone and the direction axis as the major dim of its group."""
    new_dim = new_gdim = None
    for gi, go in groups:
        if info.dim in gi:
            if gi != [info.dim] or len(go) != 1:
                raise _NotUnderstood(f"{name} reshapes the token axis of directions folded into one tensor")
            new_dim = go[0]
        if info.gdim in gi:
            new_gdim = _parts_after_view(info, gi, go, in_shape, out_shape, name)
    return multi(new_dim, new_gdim, info.layouts)


def _parts_after_view(info: MultiTok, gi: list, go: list, in_shape, out_shape, name: str) -> int:
    """The output dim that the parts run along; each part must stay a block of whole slices of it."""
    sizes_in, sizes_out = [in_shape[d] for d in gi], [out_shape[d] for d in go]
    if gi[0] != info.gdim or not all(is_static(x) for x in sizes_in + sizes_out):
        raise _NotUnderstood(f"{name} interleaves directions folded into one tensor with another axis "
                             f"{tuple(in_shape)} -> {tuple(out_shape)}")
    block = int(np.prod(sizes_in)) // len(info.layouts)   # elements of one part in the flattened group
    for j in range(len(go)):
        if int(np.prod(sizes_out[:j])) != 1:
            break
        inner = int(np.prod(sizes_out[j + 1:]))
        if block % inner == 0 and sizes_out[j] == len(info.layouts) * (block // inner):
            return go[j]
    raise _NotUnderstood(f"{name} splits directions folded into one tensor across axes "
                         f"{tuple(in_shape)} -> {tuple(out_shape)}")


def _constant_tensor(gm: fx.GraphModule, node, _depth: int = 0) -> Optional[torch.Tensor]:
    """The value of a node computed only from graph constants (buffers, literals), if it is one.

    Parameters count as constants too: an index computed from them would not depend on the input.
    """
    if not isinstance(node, fx.Node):
        return torch.as_tensor(node) if isinstance(node, (list, tuple)) else None
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    if node.op != "call_function" or _depth > 32:
        return None
    values = {}
    for inp in node.all_input_nodes:
        value = _constant_tensor(gm, inp, _depth + 1)
        if value is None:
            return None
        values[inp] = value
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    with torch.no_grad():
        out = node.target(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else None


def propagate_tokens(gm: fx.GraphModule, token_lengths: set) -> TokenFlow:
    flow = TokenFlow(gm, token_lengths)
    flow.run()
    return flow

