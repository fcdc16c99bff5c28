"""What a node is: one definition of every predicate and op set the pipeline uses.

Ops are named by their schema name ("aten::view") or, for Python callables, their `__name__`;
arguments are read by their schema name (`argument(node, "dim")`), never by position.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .. import runtime  # noqa: F401  (registers the mambaprune:: ops)

aten = torch.ops.aten

# ops whose output is their first input as far as tokens go
IDENTITY_OPS = frozenset({
    "aten::clone", "aten::contiguous", "aten::detach", "aten::alias", "aten::_to_copy", "aten::to",
    "aten::type_as", "aten::dropout", "aten::lift_fresh_copy", "aten::_assert_tensor_metadata",
    "aten::feature_dropout", "aten::alpha_dropout",
})
# ops that only change the layout of their input (walked through to find a stage's stream)
LAYOUT_OPS = frozenset({
    "aten::transpose", "aten::permute", "aten::view", "aten::reshape", "aten::_unsafe_view",
    "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::clone",
})
# ops followed from a block's merged scan output to its output projection (the scored `y`)
TO_PROJECTION_OPS = frozenset({
    "aten::transpose", "aten::permute", "aten::contiguous", "aten::clone", "aten::view",
    "aten::reshape", "aten::_unsafe_view", "aten::_to_copy", "aten::to",
})
# ops whose shape argument spells out sizes (a token count among them)
SHAPE_ARGUMENT_OPS = frozenset({"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::expand"})
TOKEN_CONVS = frozenset({"aten::conv1d", "aten::conv2d"})


@dataclass(frozen=True)
class ScanSignature:
    """How a scan op names its operands: the input (its token axis gives the scan's length), the step
    size with its bias and softplus flag, and every operand that carries the tokens (`token_axis`
    from the end for the selective scan's (B, D, L), from the front for the SSD's (B, L, H, P))."""

    input: str
    step: str
    step_bias: str
    step_softplus: str
    token_operands: tuple
    token_axis: int       # the token axis of every token operand (negative: from the end)
    bias_axis: int        # the axis of the step size the bias runs along


SELECTIVE_SCAN = ScanSignature("u", "delta", "delta_bias", "delta_softplus", ("u", "delta", "B", "C", "z"), -1, 1)
SSD_SCAN = ScanSignature("x", "dt", "dt_bias", "dt_softplus", ("x", "dt", "B", "C", "z"), 1, -1)


def scan_ops() -> dict:
    """Every scan op the pipeline prunes -> its signature (the Mamba-1 and the SSD (Mamba-2) scan)."""
    return {torch.ops.mambaprune.selective_scan.default: SELECTIVE_SCAN,
            torch.ops.mambaprune.ssd_scan.default: SSD_SCAN}


def scan_signature(node_or_target) -> ScanSignature:
    target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
    return scan_ops()[target]


def scan_length(node: fx.Node) -> int:
    """The number of tokens a scan node runs over."""
    signature = scan_signature(node)
    return shape_of(argument(node, signature.input))[signature.token_axis]


def op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def is_scan(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in scan_ops()


def is_pointwise(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def is_assert(node: fx.Node) -> bool:
    """aten::_assert_* nodes: checks, not uses."""
    return op_name(node).startswith("aten::_assert")


def shape_of(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def is_static(size) -> bool:
    return isinstance(size, int)


def norm_dim(dim: int, ndim: int) -> int:
    """A possibly negative dim as an index into `ndim` dims."""
    return dim + ndim if dim < 0 else dim


def tensor_args(node: fx.Node) -> list:
    """Node arguments, in order, including those inside lists (cat, stack)."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return out


@functools.lru_cache(maxsize=None)
def _positions(target) -> dict:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {}
    return {a.name: i for i, a in enumerate(schema.arguments) if not a.kwarg_only}


def argument(node: fx.Node, name: str, default=None):
    """The argument called `name` in the op's schema, passed by position or keyword."""
    return call_argument(node.target, node.args, node.kwargs, name, default)


def call_argument(target, args: tuple, kwargs: dict, name: str, default=None):
    """The argument called `name` of a call `target(*args, **kwargs)`."""
    if name in kwargs:
        return kwargs[name]
    index = _positions(target).get(name)
    if index is not None and index < len(args):
        return args[index]
    return default


def with_argument(target, args: tuple, kwargs: dict, name: str, value) -> tuple:
    """(args, kwargs) of a call to `target` with the argument `name` set to `value`."""
    index = _positions(target).get(name)
    if index is not None and index < len(args):
        args = args[:index] + (value,) + args[index + 1:]
    else:
        kwargs = {**kwargs, name: value}
    return args, kwargs


def kernel_size(conv: fx.Node) -> tuple:
    return tuple(argument(conv, "weight").meta["val"].shape[2:])


def looks_at_neighbours(conv: fx.Node) -> bool:
    """A conv2d that reads neighbouring cells: anything but a 1x1 kernel without padding (a per-token
    linear layer written as a conv2d)."""
    padding = argument(conv, "padding", [0, 0])
    padding = [padding] * 2 if isinstance(padding, int) else padding
    return kernel_size(conv) != (1, 1) or any(p != 0 for p in padding)
