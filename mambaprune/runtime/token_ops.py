"""Position-aware token ops: what a block needs to see its kept tokens at their ORIGINAL positions.

After pruning, a block holds K kept tokens per sample plus a position map ``pos`` (batch, K), int64,
strictly increasing, giving each kept token's original position. The `hold` and `decay` alignment
modes (DESIGN.md) need convolutions whose windows look at original neighbours (a pruned neighbour
contributes zero) and scan orders that are the original path restricted to the kept tokens. These
are custom ops (namespace ``mambaprune``) so the compiler's rewrites stay single graph nodes through
torch.export, with fake kernels, autograd and FLOP formulas (2 * MACs, the convention
FlopCounterMode uses for matmuls; the project halves totals).

The ``*_composite`` functions are the ops' definitions (the ONNX translation follows them). On the
CPU the convs run the C++ kernels of token_ops_cpp (forward and backward, measured 10-100x faster:
benchmarks/results/scan_cpu.md) when they are built, else the composites, whose backward is
autograd through a recomputation.

``scatter_tokens`` / ``gather_tokens`` are plain torch functions: they export as ordinary ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .op_library import define_op
from .token_ops_cpp import conv_grads, cpu_conv_op
from .validation import (
    check_path_order_args,
    check_pos_conv1d_args,
    check_pos_conv2d_args,
    check_token_index,
)


# ----------------------------------------------------------------------------- per-sample slot indexing


def _expand_index(index: torch.Tensor, like_shape, axis: int) -> torch.Tensor:
    """(batch, K) index -> broadcast over every axis of like_shape except batch and `axis`."""
    view = [1] * len(like_shape)
    view[0], view[axis] = index.shape[0], index.shape[1]
    target = list(like_shape)
    target[axis] = index.shape[1]
    return index.reshape(view).expand(target)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-sample gather along `dim`: out[b, ..., k, ...] = x[b, ..., index[b, k], ...].

    x: any rank, batch at dim 0; index: (batch, K) int64. Result has size K along `dim`.
    """
    axis = check_token_index("gather_tokens", x, index, dim)
    return x.gather(axis, _expand_index(index, x.shape, axis))


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Inverse of ``gather_tokens``: put x's K slots along `dim` at `index` of a zero axis of size `length`.

    x: any rank, batch at dim 0, K slots along `dim`; index: (batch, K) int64 with distinct entries
    per row. Slots not named by index are zero.
    """
    axis = check_token_index("scatter_tokens", x, index, dim)
    if index.shape[1] != x.shape[axis]:
        raise ValueError(
            f"scatter_tokens: index must have shape (batch, K) = {(x.shape[0], x.shape[axis])}; "
            f"got {tuple(index.shape)}"
        )
    out_shape = list(x.shape)
    out_shape[axis] = length
    return x.new_zeros(out_shape).scatter(axis, _expand_index(index, x.shape, axis), x)


def put_tokens(base: torch.Tensor, x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``base`` with x's K slots along `dim` written at `index` (batch, K); the other slots keep base's values."""
    axis = check_token_index("put_tokens", x, index, dim)
    return base.scatter(axis, _expand_index(index, x.shape, axis), x.to(base.dtype))


# ----------------------------------------------------------------------------- pos_conv1d


def _shift_slots(t: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """out[..., k] = t[..., k + shift] where that slot exists, else `fill`."""
    length = t.shape[-1]
    pad = t.new_full((*t.shape[:-1], abs(shift)), fill)
    if shift > 0:
        return torch.cat([t[..., shift:], pad], dim=-1)
    return torch.cat([pad, t[..., : length + shift]], dim=-1)


def pos_conv1d_composite(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos: torch.Tensor, left: int
) -> torch.Tensor:
    """Differentiable definition of ``pos_conv1d``.

    Positions strictly increase, so the kept token at original offset o from pos[k] sits at most
    |o| slots away, on the same side. Looping over the W slot shifts m in [-left, W - 1 - left] and
    reading each neighbour's actual offset (hence its tap) therefore finds every contribution.
    """
    _, _, tokens = x.shape
    taps = weight.shape[-1]
    kernel = weight[:, 0, :]  # (C, W)
    out = x.new_zeros(x.shape)
    for shift in range(-left, taps - left):
        if abs(shift) >= tokens:
            continue
        if shift == 0:
            out = out + kernel[:, left][None, :, None] * x
            continue
        offset = _shift_slots(pos, shift, -(2**62)) - pos  # (B, K); far-off sentinel where no slot
        tap = offset + left
        hit = (tap >= 0) & (tap < taps)
        tap_weight = kernel[:, tap.clamp(0, taps - 1)].permute(1, 0, 2)  # (B, C, K)
        contribution = tap_weight * _shift_slots(x, shift, 0.0)
        out = out + torch.where(hit[:, None, :], contribution, torch.zeros_like(contribution))
    if bias is not None:
        out = out + bias[None, :, None]
    return out


def _pos_conv1d_kernel(x, weight, bias, pos, left):
    forward = cpu_conv_op("pos_conv1d_forward", x, weight, bias)
    if forward is not None:
        return forward(x, weight, bias, pos, left)
    return pos_conv1d_composite(x, weight, bias, pos, left).contiguous()


def _pos_conv1d_setup_context(ctx, inputs, output):
    x, weight, bias, pos, left = inputs
    ctx.save_for_backward(x, weight, bias, pos)
    ctx.left = left


def _pos_conv1d_backward(ctx, grad_out):
    x, weight, bias, pos = ctx.saved_tensors
    backward = cpu_conv_op("pos_conv1d_backward", x, weight, bias)
    if backward is not None:
        grads = backward(grad_out.to(x.dtype), x, weight, pos, ctx.left)
        return (*conv_grads(grads, ctx.needs_input_grad, bias), None, None)
    grads = _recompute_grads(
        lambda x_, w_, b_: pos_conv1d_composite(x_, w_, b_, pos, ctx.left),
        (x, weight, bias),
        ctx.needs_input_grad[:3],
        grad_out,
    )
    return (*grads, None, None)


_pos_conv1d_op = define_op(
    "pos_conv1d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int left) -> Tensor",
    _pos_conv1d_kernel,
    lambda x, weight, bias, pos, left: x.new_empty(x.shape),
    _pos_conv1d_backward,
    _pos_conv1d_setup_context,
)


@register_flop_formula(torch.ops.mambaprune.pos_conv1d)
def _pos_conv1d_flops(x, weight, bias, pos, left, *, out_shape=None, **kwargs) -> int:
    batch, channels, tokens = x
    return 2 * batch * channels * tokens * weight[-1]


def pos_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], pos: torch.Tensor, left: int
) -> torch.Tensor:
    """Depthwise conv1d over kept tokens at their original positions.

    x: (batch, C, K) channels-first; weight: (C, 1, W); bias: (C,) or None; pos: (batch, K) int64,
    strictly increasing per row; ``left``: taps looking back (causal Mamba conv: W - 1; "same": (W-1)//2)::

        out[b, c, k] = bias[c] + sum_j weight[c, 0, j] * x[b, c, k']   with pos[b, k'] == pos[b, k] + j - left

    a position that was pruned contributes zero. With pos = arange(K) this is
    F.conv1d(x, weight, bias, padding=W-1, groups=C)[..., W-1-left : W-1-left+K].
    FLOPs: 2 * MACs, MACs = batch * C * K * W.
    """
    check_pos_conv1d_args(x, weight, bias, pos, left)
    return _pos_conv1d_op(x, weight, bias, pos, left)


# ----------------------------------------------------------------------------- pos_conv2d


def pos_conv2d_composite(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: torch.Tensor,
    height: int,
    width: int,
    padding: int,
) -> torch.Tensor:
    """Differentiable definition of ``pos_conv2d``: scatter to a zero grid, dense conv, gather back."""
    batch, _, channels = x.shape
    grid = scatter_tokens(x, pos, height * width, dim=1)  # (B, H*W, C)
    grid = grid.transpose(1, 2).reshape(batch, channels, height, width)
    out = F.conv2d(grid, weight, bias, padding=padding, groups=channels)
    out = out.reshape(batch, channels, height * width).transpose(1, 2)
    return gather_tokens(out, pos, dim=1)


def _pos_conv2d_kernel(x, weight, bias, pos, height, width, padding):
    forward = cpu_conv_op("pos_conv2d_forward", x, weight, bias)
    if forward is not None:
        return forward(x, weight, bias, pos, height, width, padding)
    return pos_conv2d_composite(x, weight, bias, pos, height, width, padding).contiguous()


def _pos_conv2d_setup_context(ctx, inputs, output):
    x, weight, bias, pos, height, width, padding = inputs
    ctx.save_for_backward(x, weight, bias, pos)
    ctx.grid = (height, width, padding)


def _pos_conv2d_backward(ctx, grad_out):
    x, weight, bias, pos = ctx.saved_tensors
    backward = cpu_conv_op("pos_conv2d_backward", x, weight, bias)
    if backward is not None:
        grads = backward(grad_out.to(x.dtype), x, weight, pos, *ctx.grid)
        return (*conv_grads(grads, ctx.needs_input_grad, bias), None, None, None, None)
    grads = _recompute_grads(
        lambda x_, w_, b_: pos_conv2d_composite(x_, w_, b_, pos, *ctx.grid),
        (x, weight, bias),
        ctx.needs_input_grad[:3],
        grad_out,
    )
    return (*grads, None, None, None, None)


_pos_conv2d_op = define_op(
    "pos_conv2d",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor pos, int height, int width, int padding) -> Tensor",
    _pos_conv2d_kernel,
    lambda x, weight, bias, pos, height, width, padding: x.new_empty(x.shape),
    _pos_conv2d_backward,
    _pos_conv2d_setup_context,
)


@register_flop_formula(torch.ops.mambaprune.pos_conv2d)
def _pos_conv2d_flops(x, weight, bias, pos, height, width, padding, *, out_shape=None, **kwargs) -> int:
    batch, _, channels = x
    kh, kw = weight[-2:]
    return 2 * batch * channels * height * width * kh * kw


def pos_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: torch.Tensor,
    height: int,
    width: int,
    padding: int,
) -> torch.Tensor:
    """Depthwise "same" conv2d over kept tokens at their original grid cells.

    x: (batch, K, C) tokens-last; pos: (batch, K) int64 row-major cells in [0, height*width);
    weight: (C, 1, kh, kw) with kh = kw = 2 * padding + 1; bias: (C,) or None. The kept tokens are
    scattered to a zero (batch, C, height, width) grid, convolved (stride 1, groups=C) and gathered
    back at pos -> (batch, K, C). FLOPs: 2 * MACs, MACs = batch * C * height * width * kh * kw
    (the conv runs densely on the grid).
    """
    check_pos_conv2d_args(x, weight, bias, pos, height, width, padding)
    return _pos_conv2d_op(x, weight, bias, pos, height, width, padding)


# ----------------------------------------------------------------------------- path_order


def path_order_composite(path: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(path)
    rank[path] = torch.arange(path.shape[0], device=path.device)  # inverse permutation
    return rank[pos].argsort(dim=1)


def path_order_by_argsort(path: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``path_order_composite`` with the inverse permutation as one argsort: 3 ops instead of 5."""
    return path.argsort()[pos].argsort(dim=1)


_path_order_op = define_op(
    "path_order", "(Tensor path, Tensor pos) -> Tensor", path_order_by_argsort, lambda path, pos: pos.new_empty(pos.shape)
)


@register_flop_formula(torch.ops.mambaprune.path_order)
def _path_order_flops(path, pos, *, out_shape=None, **kwargs) -> int:
    return 0


def path_order(path: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Order in which a scan path visits the kept tokens.

    path: (L,) int64 permutation of range(L), path[i] = original position visited i-th (flip,
    zig-zag, ...); pos: (batch, K) int64 kept positions. Returns order (batch, K) int64 with
    pos.gather(1, order) listing the kept positions in path order. Integer output: no gradient,
    no FLOPs.
    """
    check_path_order_args(path, pos)
    return _path_order_op(path, pos)


# ----------------------------------------------------------------------------- shared backward


def _recompute_grads(composite, inputs, needs_grad, grad_out):
    """Gradients of composite(*inputs) for the inputs that need them (None for the rest)."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs_grad)) if need and t is not None]
    with torch.enable_grad():
        leaves = [
            None if t is None else t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)
        ]
        out = composite(*leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out) if wanted else ()
    by_index = dict(zip(wanted, grads))
    return tuple(by_index.get(i) for i in range(len(inputs)))
