"""The SSD (Mamba-2) scan through the C++ CPU kernel (``csrc/ssd.h``): forward and analytic backward.

Same contract as ``ssd_scan_reference`` (values, dtypes, layouts). The kernel computes in float32
or float64; this wrapper casts the inputs to the compute dtype the reference would use (a no-op for
fp32 inputs, so views such as mamba_ssm's ``rearrange`` of an in_proj output reach the kernel as they
are), hands a per-head D over as a (heads, headdim) expanded view, and casts the result back to
x's dtype; ``ssd_scan_cpp_backward`` gives the gradients, each in its input's shape and dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from .scan_cpp import _kernels
from .scan_reference import compute_dtype_for

_GRAD_NAMES = ("x", "dt", "z", "A", "D", "dt_bias", "B", "C")  # the kernel's order

# The schemas and fake kernels live here, so the op exists (and traces) whether or not the C++
# library was built; the library only registers its CPU kernel.
torch.library.define(
    "mambaprune_cpu::ssd_forward",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
    "bool dt_softplus, Tensor? gap) -> Tensor",
)
torch.library.define(
    "mambaprune_cpu::ssd_backward",
    "(Tensor grad_out, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? dt_bias, bool dt_softplus, Tensor? gap) -> Tensor[]",
)


@torch.library.register_fake("mambaprune_cpu::ssd_forward")
def _ssd_forward_fake(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap):
    return x.new_empty(x.shape)


@torch.library.register_fake("mambaprune_cpu::ssd_backward")
def _ssd_backward_fake(grad_out, x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap):
    heads, headdim = x.shape[2], x.shape[3]
    return [x.new_empty(x.shape), dt.new_empty(dt.shape), x.new_empty(x.shape) if z is not None else x.new_empty(0),
            x.new_empty(heads), x.new_empty(heads, headdim), x.new_empty(heads), B.new_empty(B.shape),
            C.new_empty(C.shape)]


def _kernel_args(x, dt, A, B, C, D, z, dt_bias, gap) -> tuple[torch.dtype, list]:
    """The compute dtype and the kernel's tensor arguments, cast to it; D as (heads, headdim)."""
    if x.device.type != "cpu":
        raise ValueError(
            f"the C++ SSD kernel needs CPU tensors; got x on {x.device}. "
            f"Use MAMBAPRUNE_SCAN_IMPL=triton or reference for {x.device.type} tensors"
        )
    dtype = compute_dtype_for(x, dt, A, B, C, D, z, dt_bias)

    def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return t if t is None or t.dtype == dtype else t.to(dtype)

    if D is not None and D.dim() == 1:
        D = D[:, None].expand(x.shape[2], x.shape[3])
    return dtype, [cast(t) for t in (x, dt, A, B, C, D, z, dt_bias, gap)]


def ssd_scan_cpp(
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
    """SSD scan (see ``ssd_scan``) by the C++ kernel; contiguous (batch, L, heads, headdim) in x's dtype."""
    _, args = _kernel_args(x, dt, A, B, C, D, z, dt_bias, gap)
    y = _kernels().ssd_forward.default(*args[:8], bool(dt_softplus), args[8])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def ssd_scan_cpp_backward(
    grad_out: torch.Tensor,
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
) -> dict[str, torch.Tensor]:
    """Gradients of sum(grad_out * ssd_scan(...)) w.r.t. every given tensor but gap, by name, each in
    its input's shape and dtype (a per-head D's gradient sums its channels)."""
    dtype, args = _kernel_args(x, dt, A, B, C, D, z, dt_bias, gap)
    grads = dict(zip(_GRAD_NAMES, _kernels().ssd_backward(grad_out.to(dtype), *args[:8], bool(dt_softplus), args[8])))
    if D is not None and D.dim() == 1:
        grads["D"] = grads["D"].sum(-1)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    return {name: grads[name].to(t.dtype) for name, t in inputs.items() if t is not None}
