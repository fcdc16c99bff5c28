"""The SSD (Mamba-2) scan through the C++ CPU kernel (``csrc/ssd.h``): the forward.

Same contract as ``ssd_scan_reference`` (values, dtypes, layouts). The kernel computes in float32
or float64; this wrapper casts the inputs to the compute dtype the reference would use (a no-op for
fp32 inputs, so views such as mamba_ssm's ``rearrange`` of an in_proj output reach the kernel as they
are), hands a per-head D over as a (heads, headdim) expanded view, and casts the result back to
x's dtype. The gradients come from the equivalent Mamba-1 scan's C++ backward (``ssd_scan``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .scan_cpp import _kernels
from .scan_reference import compute_dtype_for

# The schema and fake kernel live here, so the op exists (and traces) whether or not the C++
# library was built; the library only registers its CPU kernel.
torch.library.define(
    "mambaprune_cpu::ssd_forward",
    "(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
    "bool dt_softplus, Tensor? gap) -> Tensor",
)


@torch.library.register_fake("mambaprune_cpu::ssd_forward")
def _ssd_forward_fake(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap):
    return x.new_empty(x.shape)


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
    y = _kernels().ssd_forward.default(*(cast(t) for t in (x, dt, A, B, C, D, z, dt_bias)), bool(dt_softplus),
                                       cast(gap))
    return y if y.dtype == x.dtype else y.to(x.dtype)
