"""Triton forward kernel for the selective scan (GPU path of ``mambaprune::selective_scan``).

Design (DESIGN.md, "Kernel notes"): one program per (sample, block of channels) walks the tokens
sequentially and keeps the (BLOCK_D, N) state in fp32 registers. That simple sequential kernel beat
associative-scan variants on an H100, and it is memory bound, so it reads its inputs through their
strides: the channels-last view that linear layers produce ((B, L, D) transposed to (B, D, L),
strides (L*D, 1, D)) is read as it is, with no copy. Each step's loads are then contiguous.

The forward is the custom op ``mambaprune::selective_scan_triton``, registered with
``torch.library.triton_op`` and launching the kernel through ``torch.library.wrap_triton``: torch.export
keeps it as one node, and torch.compile traces through it to the kernel launch, which Inductor emits
in its generated code instead of calling back into Python. ``mambaprune::selective_scan`` dispatches
to it on CUDA (that op itself stays one opaque node under export and compile).

The module imports without Triton: the op is then a plain custom op with the same schema and fake
kernel whose implementation raises MissingDependencyError; ``triton_available()`` says whether the
kernel can run.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import missing_dependency

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

OP_NAME = "mambaprune::selective_scan_triton"


def triton_available() -> bool:
    return triton is not None


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gap_ptr, out_ptr,
        dim, dstate, seqlen, channels_per_group,
        stride_u_b, stride_u_d, stride_u_l,
        stride_dt_b, stride_dt_d, stride_dt_l,
        stride_A_d, stride_A_n,
        stride_B_b, stride_B_g, stride_B_n, stride_B_l,
        stride_C_b, stride_C_g, stride_C_n, stride_C_l,
        stride_D, stride_bias,
        stride_z_b, stride_z_d, stride_z_l,
        stride_gap_b, stride_gap_l,
        stride_out_b, stride_out_d, stride_out_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAP: tl.constexpr,
        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        sample = tl.program_id(0).to(tl.int64)
        channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        states = tl.arange(0, BLOCK_N)
        channel_mask = channels < dim
        state_mask = channel_mask[:, None] & (states[None, :] < dstate)

        A = tl.load(A_ptr + channels[:, None] * stride_A_d + states[None, :] * stride_A_n,
                    mask=state_mask, other=0.0).to(tl.float32)
        if HAS_D:
            skip = tl.load(D_ptr + channels * stride_D, mask=channel_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + channels * stride_bias, mask=channel_mask, other=0.0).to(tl.float32)

        # Row pointers at token 0; each step adds the token stride.
        group = channels // channels_per_group
        u_row = u_ptr + sample * stride_u_b + channels * stride_u_d
        dt_row = delta_ptr + sample * stride_dt_b + channels * stride_dt_d
        B_rows = B_ptr + sample * stride_B_b + group[:, None] * stride_B_g + states[None, :] * stride_B_n
        C_rows = C_ptr + sample * stride_C_b + group[:, None] * stride_C_g + states[None, :] * stride_C_n
        z_row = z_ptr + sample * stride_z_b + channels * stride_z_d
        gap_row = gap_ptr + sample * stride_gap_b
        out_row = out_ptr + sample * stride_out_b + channels * stride_out_d

        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for t in range(seqlen):
            u = tl.load(u_row + t * stride_u_l, mask=channel_mask, other=0.0).to(tl.float32)
            dt = tl.load(dt_row + t * stride_dt_l, mask=channel_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                # Same threshold as torch.nn.functional.softplus.
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
            decay_dt = dt
            if HAS_GAP:
                decay_dt = dt * tl.load(gap_row + t * stride_gap_l).to(tl.float32)
            B_t = tl.load(B_rows + t * stride_B_l, mask=state_mask, other=0.0).to(tl.float32)
            C_t = tl.load(C_rows + t * stride_C_l, mask=state_mask, other=0.0).to(tl.float32)

            h = tl.exp(decay_dt[:, None] * A) * h + (dt * u)[:, None] * B_t
            y = tl.sum(h * C_t, axis=1)
            if HAS_D:
                y = y + skip * u
            if HAS_Z:
                z = tl.load(z_row + t * stride_z_l, mask=channel_mask, other=0.0).to(tl.float32)
                y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(out_row + t * stride_out_l, y.to(out_ptr.dtype.element_ty), mask=channel_mask)


def _grouped_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides (batch, group, state, token) of B or C; a 3-D tensor is one group."""
    if t.dim() == 3:
        return t.stride(0), 0, t.stride(1), t.stride(2)
    return tuple(t.stride())


def _strides_or_zero(t: Optional[torch.Tensor], rank: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * rank


def _interpreted(kernel) -> bool:
    """Whether TRITON_INTERPRET=1 made @triton.jit return the CPU interpreter's function."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without an interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


def _selective_scan_triton_op(
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
    block_d: int = 32,
) -> torch.Tensor:
    # torch.compile runs this body on fake tensors to trace the kernel launch (wrap_triton records
    # it as a graph node), so it holds only torch ops and the launch.
    if triton is None:
        raise missing_dependency("triton", "gpu", "The Triton selective-scan kernel")
    if u.device.type == "cpu" and not _interpreted(_selective_scan_fwd_kernel):
        raise ValueError(
            "selective_scan: the Triton kernel needs GPU tensors; u is on the CPU. Use "
            "MAMBAPRUNE_SCAN_IMPL=reference or sequential there (or TRITON_INTERPRET=1, set before triton "
            "is imported, to run the kernel in Triton's CPU interpreter)"
        )
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    groups = 1 if B.dim() == 3 else B.shape[1]
    out = torch.empty((batch, dim, seqlen), dtype=u.dtype, device=u.device)
    if out.numel() == 0:
        return out
    # wrap_triton before pytorch#185597 (torch 2.11 among them) rejects the interpreter's kernels
    # (pytorch#152868), which only launch eagerly anyway; on a GPU the launch goes through wrap_triton.
    kernel = (_selective_scan_fwd_kernel if _interpreted(_selective_scan_fwd_kernel)
              else wrap_triton(_selective_scan_fwd_kernel))
    # Absent optional tensors: any valid pointer will do, the constexpr flags keep it unread.
    unused_pointer = u
    grid = (batch, triton.cdiv(dim, block_d))
    kernel[grid](
        u, delta, A, B, C,
        D if D is not None else unused_pointer,
        z if z is not None else unused_pointer,
        delta_bias if delta_bias is not None else unused_pointer,
        gap if gap is not None else unused_pointer,
        out,
        dim, dstate, seqlen, dim // groups,
        *u.stride(), *delta.stride(), *A.stride(),
        *_grouped_strides(B), *_grouped_strides(C),
        *_strides_or_zero(D, 1), *_strides_or_zero(delta_bias, 1),
        *_strides_or_zero(z, 3), *_strides_or_zero(gap, 2),
        *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_GAP=gap is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=block_d, BLOCK_N=_next_power_of_2(dstate),
    )
    return out


if triton is not None:
    from torch.library import wrap_triton

    selective_scan_triton_op = torch.library.triton_op(OP_NAME, _selective_scan_triton_op, mutates_args=())
else:  # the same op, so graphs naming it still load and trace; running it raises
    selective_scan_triton_op = torch.library.custom_op(OP_NAME, _selective_scan_triton_op, mutates_args=())


@selective_scan_triton_op.register_fake
def _selective_scan_triton_fake(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None, block_d=32
):
    # Explicit rather than triton_op's default (the body itself on fake tensors), which fails
    # with interpreted kernels, on CPU tensors and without triton.
    return u.new_empty(u.shape)


def selective_scan_triton(
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
    block_d: int = 32,
) -> torch.Tensor:
    """Forward selective scan with the Triton kernel, as the op ``mambaprune::selective_scan_triton``;
    same contract as ``selective_scan_reference``.

    Accumulates in fp32 whatever the input dtype (float64 inputs are computed in fp32 too). The op
    is differentiable: selective_scan.py registers the scan op's backward for it too. Without triton
    the op's body raises MissingDependencyError.
    """
    return selective_scan_triton_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), gap, block_d)
