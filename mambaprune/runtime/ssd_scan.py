"""``mambaprune::ssd_scan``: the SSD (Mamba-2) scan as ONE custom op.

The Mamba-2 layer's scan (mamba_ssm's ``mamba_chunk_scan_combined``) with the layout of that
function, plus the position ``gap`` the pruning rewrite adds. One graph node under torch.export and
torch.compile, with a fake kernel, an autograd formula and a FLOP formula, like
``mambaprune::selective_scan`` (selective_scan.py).

Implementations (``chosen_ssd_impl``): Triton on CUDA (the op ``mambaprune::ssd_scan_triton``,
ssd_triton); on the CPU the C++ kernel (ssd_cpp, csrc/ssd.h) when it builds, else the equivalent
Mamba-1 selective scan (``ssd_reference.as_selective_scan_args``) through that op's own pure-PyTorch
implementations. ``MAMBAPRUNE_SCAN_IMPL`` forces one as for the Mamba-1 scan: ``reference`` is the
direct token loop (ssd_reference), ``sequential`` the Mamba-1 route, ``cpp`` and ``triton`` the kernels.

Backward: on the CPU with the C++ kernels, the SSD kernel's analytic backward (csrc/ssd.h); elsewhere
autograd through the equivalent Mamba-1 scan that the selective_scan op would differentiate, pulled
back through the views and expands that build it (the direct token loop when ``reference`` is forced).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .cpu_kernels import load_cpu_kernels
from .op_library import define_op
from .selective_scan import _differentiable_impl, _forced_impl, _selective_scan_kernel
from .ssd_cpp import ssd_scan_cpp, ssd_scan_cpp_backward
from .ssd_reference import as_selective_scan_args, from_selective_scan_output, ssd_scan_reference
from .ssd_triton import ssd_scan_triton, ssd_scan_triton_op
from .scan_triton import triton_available
from .validation import check_ssd_scan_args

# mamba_ssm's Mamba2 default chunk size: the FLOP formula counts the chunked algorithm with it.
SSD_CHUNK_SIZE = 256
_SSD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def chosen_ssd_impl(x: torch.Tensor) -> str:
    """The implementation that runs for x: 'triton' for CUDA inputs when triton imports (not fp64); on
    the CPU 'cpp' when the C++ kernels build, else 'mamba1' (the equivalent Mamba-1 scan through
    selective_scan's pure-PyTorch implementations). MAMBAPRUNE_SCAN_IMPL forces 'reference' (the
    direct token loop), 'sequential' (-> 'mamba1'), 'cpp' (falls back when the kernels cannot be
    built) or 'triton'."""
    forced = _forced_impl()
    if forced == "reference" or forced == "triton":
        return forced
    if forced == "sequential":
        return "mamba1"
    if x.is_cuda:
        return "triton" if triton_available() and x.dtype != torch.float64 else "mamba1"
    return "cpp" if load_cpu_kernels() is not None else "mamba1"


def _via_mamba1(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None) -> torch.Tensor:
    args = as_selective_scan_args(x, dt, A, B, C, D, z, dt_bias, gap)
    return from_selective_scan_output(_selective_scan_kernel(**args, delta_softplus=dt_softplus), x.shape)


_IMPLEMENTATIONS = {"reference": ssd_scan_reference, "mamba1": _via_mamba1, "cpp": ssd_scan_cpp,
                    "triton": ssd_scan_triton}


def _ssd_scan_kernel(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None):
    return _IMPLEMENTATIONS[chosen_ssd_impl(x)](x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap)


def _ssd_scan_fake(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None):
    return x.new_empty(x.shape)  # contiguous, like the real output


def _setup_context(ctx, inputs, output):
    # inputs[10:] is the Triton op's block_p
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap = inputs[:10]
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, gap)
    ctx.dt_softplus = dt_softplus
    ctx.extra_inputs = len(inputs) - 10


def _backward(ctx, grad_out):
    x, dt, A, B, C, D, z, dt_bias, gap = ctx.saved_tensors
    saved = dict(zip(_SSD_NAMES, (x, dt, A, B, C, D, z, dt_bias)))
    wanted = [name for name, needed in zip(_SSD_NAMES, ctx.needs_input_grad) if needed and saved[name] is not None]
    grads = dict(zip(wanted, _input_grads(grad_out, saved, wanted, ctx.dt_softplus, gap))) if wanted else {}
    return (*(grads.get(name) for name in _SSD_NAMES), None, None, *(None,) * ctx.extra_inputs)


def _input_grads(grad_out, saved: dict, wanted: list, dt_softplus: bool, gap) -> tuple:
    """Gradients of sum(grad_out * ssd_scan(**saved)) w.r.t. the ``wanted`` arguments."""
    gap = None if gap is None else gap.detach()
    impl = chosen_ssd_impl(saved["x"])
    if impl == "cpp":
        by_name = ssd_scan_cpp_backward(grad_out, **saved, dt_softplus=dt_softplus, gap=gap)
        return tuple(by_name[name] for name in wanted)
    with torch.enable_grad():
        leaves = {name: None if t is None else t.detach().requires_grad_(name in wanted) for name, t in saved.items()}
        targets = [leaves[name] for name in wanted]
        if impl == "reference":
            y = ssd_scan_reference(**leaves, dt_softplus=dt_softplus, gap=gap)
            return torch.autograd.grad(y, targets, grad_out)
        mamba1 = as_selective_scan_args(**leaves, gap=gap)
        batch, length, heads, headdim = saved["x"].shape
        grad_mamba1 = grad_out.reshape(batch, length, heads * headdim).transpose(1, 2)
        y = _differentiable_impl(mamba1["u"], saved["B"].shape[-1])(**mamba1, delta_softplus=dt_softplus)
        return torch.autograd.grad(y, targets, grad_mamba1)


_ssd_scan_op = define_op(
    "ssd_scan",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D=None, Tensor? z=None, "
    "Tensor? dt_bias=None, bool dt_softplus=False, Tensor? gap=None) -> Tensor",
    _ssd_scan_kernel,
    _ssd_scan_fake,
    _backward,
    _setup_context,
)
# The Triton op called directly (torch.ops.mambaprune.ssd_scan_triton) trains the same way.
ssd_scan_triton_op.register_autograd(_backward, setup_context=_setup_context)


def ssd_scan_macs(x_shape, B_shape, has_D: bool, has_z: bool, chunk_size: int = SSD_CHUNK_SIZE) -> int:
    """Multiply-accumulates of one SSD scan counted as the chunked SSD algorithm of the Mamba-2 paper
    computes it (chunks of ``chunk_size`` tokens, the last one shorter), per sample:

        groups * sum_c q_c^2 * N           C_c B_c^T inside every chunk (once per group)
      + heads  * sum_c q_c^2 * P           (C B^T masked by the decays) x inside every chunk
      + heads  * 2 * L * N * P             every chunk's final state (B^T x) and its read-out (C h)
      + heads  * chunks * N * P            the state passed from chunk to chunk
      + heads  * L * P                     for D, and again for z

    with q_c the tokens of chunk c, N the state size, P the head dim.
    """
    batch, length, heads, headdim = x_shape
    groups, dstate = B_shape[2], B_shape[3]
    full, rest = divmod(length, chunk_size)
    chunks = full + int(rest > 0)
    squares = full * chunk_size**2 + rest**2
    per_sample = (groups * squares * dstate + heads * squares * headdim + heads * 2 * length * dstate * headdim
                  + heads * chunks * dstate * headdim + heads * length * headdim * (int(has_D) + int(has_z)))
    return batch * per_sample


@register_flop_formula([torch.ops.mambaprune.ssd_scan, torch.ops.mambaprune.ssd_scan_triton])
def _ssd_scan_flops(x, dt, A, B, C, D=None, z=None, *rest, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts 2 FLOPs per matmul MAC; the project halves its totals (planning/flops.py).
    return 2 * ssd_scan_macs(x, B, D is not None, z is not None)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    gap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mamba-2 (SSD) scan, optionally position-aware, as the custom op ``mambaprune::ssd_scan``.

    Layout of mamba_ssm's ``mamba_chunk_scan_combined``: x, z (batch, L, heads, headdim); dt
    (batch, L, heads); A (heads,); B, C (batch, L, groups, N), head h reading group
    h // (heads // groups); D (heads,) or (heads, headdim); dt_bias (heads,); gap (batch, L) integer
    or float, the original token steps between a kept token and the previous one (None or all ones
    is the plain scan). Any strides. Per sample, head h, token t::

        dt_t = dt_t + dt_bias_h                (then softplus if dt_softplus)
        h_t  = exp(gap_t * dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        (headdim, N)
        y_t  = h_t C_t + D_h * x_t             (then y_t *= silu(z_t) if z is given)

    Returns a contiguous (batch, L, heads, headdim) tensor in x's dtype; accumulation is fp32
    (fp64 for fp64 inputs). Gradients flow to every tensor argument but gap.

    FLOPs: FlopCounterMode counts 2 * ``ssd_scan_macs``: the MACs of the Mamba-2 paper's chunked
    algorithm with mamba_ssm's chunk size 256 (quadratic in the tokens of a chunk), not the
    recurrent 9 per state update of the Mamba-1 op. The project's FLOPs counter halves the total.
    """
    check_ssd_scan_args(x, dt, A, B, C, D, z, dt_bias, gap)
    return _ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), gap)
