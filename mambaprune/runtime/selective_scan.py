"""``mambaprune::selective_scan``: the selective scan as ONE custom op.

Every scan in a captured model is routed here so that torch.export sees a single graph node the
compiler can find, rewrite (e.g. add a position ``gap`` after pruning) and lower. The op has a fake
kernel (export / compile), an autograd formula and a FLOP formula (FlopCounterMode).

Implementations: Triton on CUDA (the op ``mambaprune::selective_scan_triton``, a
``torch.library.triton_op``: see scan_triton); on the CPU the C++ kernel (``scan_cpp``, built on
first use: see cpu_kernels) with its analytic C++ backward, measured faster than the PyTorch scans
at every shape (benchmarks/results/scan_cpu.md). Without a compiler (or when its build fails) the
CPU falls back, with one warning, to the pure-PyTorch scans: the chunked token loop with its
analytic backward (``scan_sequential``) once a token's state (batch * D * N) is big enough to
amortise the per-token dispatch (from 128 state elements), else the log-depth doubling reference.
``MAMBAPRUNE_SCAN_IMPL=reference|sequential|cpp|triton`` forces one (``cpp`` still falls back when
the kernel cannot be built); ``chosen_scan_impl`` says which one runs. The backward is the C++ one
with ``cpp``, the sequential scan's analytic one on the CPU otherwise, and the differentiated
doubling reference elsewhere.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .cpu_kernels import load_cpu_kernels
from .op_library import define_op
from .scan_cpp import selective_scan_cpp, selective_scan_cpp_backward
from .scan_reference import selective_scan_reference
from .scan_sequential import selective_scan_sequential
from .scan_triton import selective_scan_triton, selective_scan_triton_op, triton_available
from .validation import check_selective_scan_args

IMPL_ENV_VAR = "MAMBAPRUNE_SCAN_IMPL"
_IMPLS = ("reference", "sequential", "cpp", "triton")
# Without the C++ kernel: the chunked token loop beats the doubling reference at every state size
# benchmarks/scan_cpu.py measured (results/scan_cpu.md: 0.23 vs 0.25 ms at batch*D*N = 128, L = 16;
# 3.2 vs 39 ms at ViM-T's 6144, L = 197); below 128 elements per token the reference keeps them.
_SEQUENTIAL_MIN_STATE = 128
_IMPLEMENTATIONS = {
    "reference": selective_scan_reference,
    "sequential": selective_scan_sequential,
    "cpp": selective_scan_cpp,
}


def _forced_impl() -> Optional[str]:
    forced = os.environ.get(IMPL_ENV_VAR)
    if not forced:
        return None
    forced = forced.strip().lower()
    if forced and forced not in _IMPLS:
        raise ValueError(f"{IMPL_ENV_VAR} must be one of {_IMPLS}; got {forced!r}")
    return forced or None


def chosen_scan_impl(u: torch.Tensor, dstate: int = 16) -> str:
    """The implementation that runs for u: 'triton' for CUDA inputs when triton imports (fp64 stays on
    the reference); on the CPU 'cpp' when the C++ kernel builds (the first call may build it), else
    'sequential' when batch * D * dstate exceeds 128, else 'reference'.
    MAMBAPRUNE_SCAN_IMPL forces one; a forced 'cpp' that cannot be built falls back like the default."""
    forced = _forced_impl()
    if forced and not (forced == "cpp" and not u.is_cuda and load_cpu_kernels() is None):
        return forced
    if u.is_cuda:
        return "triton" if triton_available() and u.dtype != torch.float64 else "reference"
    if load_cpu_kernels() is not None:
        return "cpp"
    return "sequential" if u.shape[0] * u.shape[1] * dstate > _SEQUENTIAL_MIN_STATE else "reference"


def _differentiable_impl(u: torch.Tensor, dstate: int):
    """What the backward differentiates when there is no C++ backward: the sequential scan's analytic
    backward on the CPU, the doubling reference elsewhere."""
    impl = chosen_scan_impl(u, dstate)
    if impl == "cpp":
        impl = "sequential"
    if impl == "triton" or (impl == "sequential" and u.is_cuda):
        impl = "reference"  # no Triton backward; a token loop of kernel launches is slow on a GPU
    return _IMPLEMENTATIONS[impl]


def _selective_scan_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
    impl = chosen_scan_impl(u, A.shape[-1])
    if impl == "triton":
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)
    return _IMPLEMENTATIONS[impl](u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)


def _selective_scan_fake(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
    # new_empty with a size is contiguous, like the real output.
    return u.new_empty(u.shape)


_DIFFERENTIABLE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _setup_context(ctx, inputs, output):
    # inputs[10:] is the Triton op's block_d
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap = inputs[:10]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, gap)
    ctx.delta_softplus = delta_softplus
    ctx.extra_inputs = len(inputs) - 10


def _backward(ctx, grad_out):
    u, delta, A, B, C, D, z, delta_bias, gap = ctx.saved_tensors
    saved = dict(zip(_DIFFERENTIABLE, (u, delta, A, B, C, D, z, delta_bias)))
    wanted = [
        name
        for name, needed in zip(_DIFFERENTIABLE, ctx.needs_input_grad)
        if needed and saved[name] is not None
    ]
    if wanted and chosen_scan_impl(u, A.shape[-1]) == "cpp":
        by_name = selective_scan_cpp_backward(grad_out, **saved, delta_softplus=ctx.delta_softplus, gap=gap)
        return (*(by_name[name] if name in wanted else None for name in _DIFFERENTIABLE), None, None,
                *(None,) * ctx.extra_inputs)
    with torch.enable_grad():
        leaves = {name: t.detach().requires_grad_(name in wanted) if t is not None else None for name, t in saved.items()}
        y = _differentiable_impl(u, A.shape[-1])(
            **leaves, delta_softplus=ctx.delta_softplus, gap=None if gap is None else gap.detach()
        )
        grads = torch.autograd.grad(y, [leaves[name] for name in wanted], grad_out) if wanted else ()
    by_name = dict(zip(wanted, grads))
    return (*(by_name.get(name) for name in _DIFFERENTIABLE), None, None, *(None,) * ctx.extra_inputs)


_selective_scan_op = define_op(
    "selective_scan",
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D=None, Tensor? z=None, "
    "Tensor? delta_bias=None, bool delta_softplus=False, Tensor? gap=None) -> Tensor",
    _selective_scan_kernel,
    _selective_scan_fake,
    _backward,
    _setup_context,
)
# The Triton op called directly (torch.ops.mambaprune.selective_scan_triton) trains the same way.
selective_scan_triton_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_macs(u_shape, A_shape, has_D: bool, has_z: bool) -> int:
    """Multiply-accumulates of one scan (DESIGN.md): 9*B*L*D*N, + B*D*L for D, + B*D*L for z."""
    batch, dim, length = u_shape
    dstate = A_shape[1]
    per_token = batch * dim * length
    return 9 * per_token * dstate + per_token * int(has_D) + per_token * int(has_z)


@register_flop_formula([torch.ops.mambaprune.selective_scan, torch.ops.mambaprune.selective_scan_triton])
def _selective_scan_flops(u, delta, A, B, C, D=None, z=None, *rest, out_shape=None, **kwargs) -> int:
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
    if _eager_cpu_training(u, A, delta, B, C, D, z, delta_bias):
        # The op's backward recomputes the forward; the sequential scan's own autograd Function
        # saves its states instead, which makes eager CPU training about a third faster.
        return selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), gap)
    return _selective_scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), gap)


def _eager_cpu_training(u, A, *others) -> bool:
    """Plain (not fake, not traced) CPU tensors needing gradients, with the sequential scan chosen."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or type(u) is not torch.Tensor:
        return False
    if not any(t is not None and t.requires_grad for t in (u, A, *others)):
        return False
    return not u.is_cuda and chosen_scan_impl(u, A.shape[-1]) == "sequential"
