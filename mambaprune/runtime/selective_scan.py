"""``mambaprune::selective_scan``: the selective scan as ONE custom op.

Every scan in a captured model is routed here so that torch.export sees a single graph node the
compiler can find, rewrite (e.g. add a position ``gap`` after pruning) and lower. The op has a fake
kernel (export / compile), an autograd formula (backward recomputes the differentiable reference)
and a FLOP formula (FlopCounterMode). Implementations: Triton on CUDA, the chunked pure-PyTorch
reference elsewhere; ``MAMBAPRUNE_SCAN_IMPL=reference|triton`` forces one.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .scan_reference import selective_scan_reference
from .scan_triton import selective_scan_triton, triton_available
from .validation import check_selective_scan_args

IMPL_ENV_VAR = "MAMBAPRUNE_SCAN_IMPL"
_IMPLS = ("reference", "triton")


def chosen_scan_impl(u: torch.Tensor) -> str:
    """'triton' for CUDA inputs when triton imports (fp64 stays on the reference), else 'reference'."""
    forced = os.environ.get(IMPL_ENV_VAR, "").strip().lower()
    if forced:
        if forced not in _IMPLS:
            raise ValueError(f"{IMPL_ENV_VAR} must be one of {_IMPLS}; got {forced!r}")
        return forced
    if u.is_cuda and triton_available() and u.dtype != torch.float64:
        return "triton"
    return "reference"


@torch.library.custom_op("mambaprune::selective_scan", mutates_args=())
def _selective_scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    gap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if chosen_scan_impl(u) == "triton":
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)


@_selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
    # new_empty with a size is contiguous, like the real output.
    return u.new_empty(u.shape)


_DIFFERENTIABLE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, gap)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad_out):
    u, delta, A, B, C, D, z, delta_bias, gap = ctx.saved_tensors
    saved = dict(zip(_DIFFERENTIABLE, (u, delta, A, B, C, D, z, delta_bias)))
    wanted = [
        name
        for name, needed in zip(_DIFFERENTIABLE, ctx.needs_input_grad)
        if needed and saved[name] is not None
    ]
    with torch.enable_grad():
        leaves = {name: t.detach().requires_grad_(name in wanted) if t is not None else None for name, t in saved.items()}
        y = selective_scan_reference(
            **leaves, delta_softplus=ctx.delta_softplus, gap=None if gap is None else gap.detach()
        )
        grads = torch.autograd.grad(y, [leaves[name] for name in wanted], grad_out) if wanted else ()
    by_name = dict(zip(wanted, grads))
    return (*(by_name.get(name) for name in _DIFFERENTIABLE), None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_macs(u_shape, A_shape, has_D: bool, has_z: bool) -> int:
    """Multiply-accumulates of one scan (DESIGN.md): 9*B*L*D*N, + B*D*L for D, + B*D*L for z."""
    batch, dim, length = u_shape
    dstate = A_shape[1]
    per_token = batch * dim * length
    return 9 * per_token * dstate + per_token * int(has_D) + per_token * int(has_z)


@register_flop_formula(torch.ops.mambaprune.selective_scan)
def _selective_scan_flops(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None, *, out_shape=None, **kwargs
) -> int:
    # FlopCounterMode counts 2 FLOPs per matmul MAC; the project divides its totals by 2, so the
    # scan registers twice its MACs to come out as MACs like everything else.
    return 2 * selective_scan_macs(u, A, D is not None, z is not None)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    gap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mamba-1 selective scan, optionally position-aware, as the custom op ``mambaprune::selective_scan``.

    Per sample b, channel d, state n, token t::

        delta' = delta + delta_bias        (then softplus if delta_softplus)
        h_t = exp(gap_t * delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t
        y_t = <C_t, h_t> + D * u_t         (then y_t *= silu(z_t) if z is given)

    Layouts: u, delta, z: (batch, D, L) (any strides; a transposed (batch, L, D) view is fine);
    A: (D, N); B, C: (batch, N, L) or grouped (batch, G, N, L), channel d using group d // (D // G);
    D, delta_bias: (D,); gap: (batch, L) float or int, the number of original token steps between
    a kept token and the previous one (None or all ones is the plain scan).

    Returns a contiguous (batch, D, L) tensor in u's dtype; accumulation is fp32 (fp64 for fp64
    inputs). Gradients flow to every tensor argument but gap.

    FLOPs: FlopCounterMode counts 2 * MACs with MACs = 9*B*L*D*N (+ B*D*L with D, + B*D*L with z),
    the same factor of 2 it applies to matmuls; the project's FLOPs counter halves those totals.
    """
    check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, gap)
    return _selective_scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), gap)
