"""The selective scan through the C++ CPU kernel (``csrc/scan.h``): forward and analytic backward.

Same contract as ``selective_scan_reference`` (values, dtypes, layouts; gradients through
``selective_scan_cpp_backward``). The kernel computes in float32 or float64; this wrapper casts the
inputs to the compute dtype the reference would use (a no-op for fp32 inputs, so a transposed
(batch, L, D) view of u reaches the kernel as it is) and casts the result back to u's dtype.

Callers check ``cpu_kernels.load_cpu_kernels()`` first (``selective_scan.chosen_scan_impl`` does);
calling these without the kernels raises an error that says how to get them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import MissingDependencyError
from .cpu_kernels import cpu_kernels_status, load_cpu_kernels
from .scan_reference import compute_dtype_for

_GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# The kernels' schemas and fake kernels live here, so the ops exist (and trace, e.g. in a compiled
# backward) whether or not the C++ library was built; the library only registers their CPU kernels.
torch.library.define(
    "mambaprune_cpu::scan_forward",
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus, Tensor? gap) -> Tensor",
)
torch.library.define(
    "mambaprune_cpu::scan_backward",
    "(Tensor grad_out, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, bool delta_softplus, Tensor? gap) -> Tensor[]",
)


@torch.library.register_fake("mambaprune_cpu::scan_forward")
def _scan_forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap):
    return u.new_empty(u.shape)


@torch.library.register_fake("mambaprune_cpu::scan_backward")
def _scan_backward_fake(grad_out, u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap):
    dim, dstate = A.shape
    return [u.new_empty(u.shape), u.new_empty(u.shape), u.new_empty(u.shape) if z is not None else u.new_empty(0),
            u.new_empty(dim, dstate), u.new_empty(dim), u.new_empty(dim), B.new_empty(B.shape), C.new_empty(C.shape)]


def _kernels():
    kernels = load_cpu_kernels()
    if kernels is None:
        raise MissingDependencyError(
            f"the C++ CPU scan kernel is unavailable ({cpu_kernels_status().detail}); install a C++ compiler "
            f"and ninja (pip install ninja), or use MAMBAPRUNE_SCAN_IMPL=sequential or reference"
        )
    return kernels


def _kernel_args(u, delta, A, B, C, D, z, delta_bias, gap) -> tuple[torch.dtype, list]:
    """The compute dtype and the kernel's tensor arguments: cast to it, B and C grouped (batch, G, N, L)."""
    if u.device.type != "cpu":
        raise ValueError(
            f"the C++ scan kernel needs CPU tensors; got u on {u.device}. "
            f"Use MAMBAPRUNE_SCAN_IMPL=triton or reference for {u.device.type} tensors"
        )
    dtype = compute_dtype_for(u, delta, A, B, C, D, z, delta_bias)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return t if t is None or t.dtype == dtype else t.to(dtype)

    B4, C4 = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))
    return dtype, [cast(t) for t in (u, delta, A, B4, C4, D, z, delta_bias, gap)]


def selective_scan_cpp(
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
    """Mamba-1 selective scan (see ``selective_scan``) by the C++ kernel; contiguous (batch, D, L) in u's dtype."""
    _, (u_c, delta_c, A_c, B_c, C_c, D_c, z_c, bias_c, gap_c) = _kernel_args(u, delta, A, B, C, D, z, delta_bias, gap)
    y = _kernels().scan_forward.default(u_c, delta_c, A_c, B_c, C_c, D_c, z_c, bias_c, bool(delta_softplus), gap_c)
    return y if y.dtype == u.dtype else y.to(u.dtype)


def selective_scan_cpp_backward(
    grad_out: torch.Tensor,
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
) -> dict[str, torch.Tensor]:
    """Gradients of sum(grad_out * selective_scan(...)) w.r.t. every given tensor but gap, by name.

    Each gradient has its input's shape and dtype.
    """
    dtype, args = _kernel_args(u, delta, A, B, C, D, z, delta_bias, gap)
    gu, gdelta, gz, gA, gD, gbias, gB, gC = _kernels().scan_backward(
        grad_out.to(dtype), *args[:7], args[7], bool(delta_softplus), args[8])
    grads = dict(u=gu, delta=gdelta, A=gA, B=gB, C=gC, D=gD, z=gz, delta_bias=gbias)
    inputs = dict(zip(_GRAD_NAMES, (u, delta, A, B, C, D, z, delta_bias)))
    return {name: grads[name].reshape(t.shape).to(t.dtype) for name, t in inputs.items() if t is not None}
