"""Triton forward kernel for the SSD (Mamba-2) scan (GPU path of ``mambaprune::ssd_scan``).

The design of the Mamba-1 kernel (scan_triton; DESIGN.md, "Kernel notes"): one program per
(sample, head, block of the head's channels) walks the tokens sequentially with its (BLOCK_P, N)
state in fp32 registers, reading every input through its strides (mamba_ssm's (batch, L, heads,
headdim) views of an in_proj output are read in place). The decay is one scalar per (token, head).

The op ``mambaprune::ssd_scan_triton`` is a ``torch.library.triton_op`` launching the kernel through
``torch.library.wrap_triton`` (one node under torch.export; torch.compile traces to the launch).
Without triton it is a plain custom op with the same schema and fake kernel whose body raises
MissingDependencyError. Its backward is the SSD op's (ssd_scan registers it).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import missing_dependency
from .scan_triton import _interpreted, _next_power_of_2, _strides_or_zero, triton

if triton is not None:
    import triton.language as tl
    from torch.library import wrap_triton

OP_NAME = "mambaprune::ssd_scan_triton"

if triton is not None:

    @triton.jit
    def _ssd_scan_fwd_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gap_ptr, out_ptr,
        seqlen, headdim, dstate, heads_per_group,
        stride_x_b, stride_x_l, stride_x_h, stride_x_p,
        stride_dt_b, stride_dt_l, stride_dt_h,
        stride_A,
        stride_B_b, stride_B_l, stride_B_g, stride_B_n,
        stride_C_b, stride_C_l, stride_C_g, stride_C_n,
        stride_D_h, stride_D_p, stride_bias,
        stride_z_b, stride_z_l, stride_z_h, stride_z_p,
        stride_gap_b, stride_gap_l,
        stride_out_b, stride_out_l, stride_out_h, stride_out_p,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAP: tl.constexpr,
        SOFTPLUS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        sample = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        channels = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        states = tl.arange(0, BLOCK_N)
        channel_mask = channels < headdim
        state_mask = states < dstate
        group = head // heads_per_group

        A = tl.load(A_ptr + head * stride_A).to(tl.float32)
        if HAS_D:
            skip = tl.load(D_ptr + head * stride_D_h + channels * stride_D_p, mask=channel_mask, other=0.0)
            skip = skip.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + head * stride_bias).to(tl.float32)

        # Row pointers at token 0; each step adds the token stride.
        x_row = x_ptr + sample * stride_x_b + head * stride_x_h + channels * stride_x_p
        z_row = z_ptr + sample * stride_z_b + head * stride_z_h + channels * stride_z_p
        out_row = out_ptr + sample * stride_out_b + head * stride_out_h + channels * stride_out_p
        dt_row = dt_ptr + sample * stride_dt_b + head * stride_dt_h
        B_row = B_ptr + sample * stride_B_b + group * stride_B_g + states * stride_B_n
        C_row = C_ptr + sample * stride_C_b + group * stride_C_g + states * stride_C_n
        gap_row = gap_ptr + sample * stride_gap_b

        h = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for t in range(seqlen):
            x = tl.load(x_row + t * stride_x_l, mask=channel_mask, other=0.0).to(tl.float32)
            dt = tl.load(dt_row + t * stride_dt_l).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # torch's softplus threshold
            decay_dt = dt
            if HAS_GAP:
                decay_dt = dt * tl.load(gap_row + t * stride_gap_l).to(tl.float32)
            B_t = tl.load(B_row + t * stride_B_l, mask=state_mask, other=0.0).to(tl.float32)
            C_t = tl.load(C_row + t * stride_C_l, mask=state_mask, other=0.0).to(tl.float32)

            h = tl.exp(decay_dt * A) * h + (dt * x)[:, None] * B_t[None, :]
            y = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y = y + skip * x
            if HAS_Z:
                z = tl.load(z_row + t * stride_z_l, mask=channel_mask, other=0.0).to(tl.float32)
                y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(out_row + t * stride_out_l, y.to(out_ptr.dtype.element_ty), mask=channel_mask)


def _ssd_scan_triton_op(
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
    block_p: int = 32,
) -> torch.Tensor:
    # Traced on fake tensors by torch.compile: only torch ops and the launch.
    if triton is None:
        raise missing_dependency("triton", "gpu", "The Triton SSD-scan kernel")
    if x.device.type == "cpu" and not _interpreted(_ssd_scan_fwd_kernel):
        raise ValueError(
            "ssd_scan: the Triton kernel needs GPU tensors; x is on the CPU. Use MAMBAPRUNE_SCAN_IMPL=cpp "
            "or reference there (or TRITON_INTERPRET=1, set before triton is imported, for Triton's interpreter)"
        )
    batch, seqlen, heads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    kernel = _ssd_scan_fwd_kernel if _interpreted(_ssd_scan_fwd_kernel) else wrap_triton(_ssd_scan_fwd_kernel)
    unused_pointer = x  # absent optional tensors: the constexpr flags keep it unread
    D_strides = (0, 0) if D is None else ((D.stride(0), 0) if D.dim() == 1 else tuple(D.stride()))
    block_p = min(block_p, _next_power_of_2(headdim))
    grid = (batch, heads, triton.cdiv(headdim, block_p))
    kernel[grid](
        x, dt, A, B, C,
        D if D is not None else unused_pointer,
        z if z is not None else unused_pointer,
        dt_bias if dt_bias is not None else unused_pointer,
        gap if gap is not None else unused_pointer,
        out,
        seqlen, headdim, dstate, heads // groups,
        *x.stride(), *dt.stride(), A.stride(0), *B.stride(), *C.stride(),
        *D_strides, *_strides_or_zero(dt_bias, 1), *_strides_or_zero(z, 4), *_strides_or_zero(gap, 2),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        HAS_GAP=gap is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_P=block_p, BLOCK_N=_next_power_of_2(dstate),
    )
    return out


if triton is not None:
    ssd_scan_triton_op = torch.library.triton_op(OP_NAME, _ssd_scan_triton_op, mutates_args=())
else:  # the same op, so graphs naming it still load and trace; running it raises
    ssd_scan_triton_op = torch.library.custom_op(OP_NAME, _ssd_scan_triton_op, mutates_args=())


@ssd_scan_triton_op.register_fake
def _ssd_scan_triton_fake(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None, block_p=32):
    return x.new_empty(x.shape)


def ssd_scan_triton(
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
    block_p: int = 32,
) -> torch.Tensor:
    """Forward SSD scan with the Triton kernel, as the op ``mambaprune::ssd_scan_triton``; same contract
    as ``ssd_scan_reference`` but accumulated in fp32 whatever the input dtype."""
    return ssd_scan_triton_op(x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), gap, block_p)
