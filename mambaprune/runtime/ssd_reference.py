"""The SSD (Mamba-2) scan by its definition: a direct token loop, readable, the ground truth.

Layout of mamba_ssm's ``mamba_chunk_scan_combined``: x, z (batch, L, heads, headdim); dt (batch, L,
heads); A (heads,); B, C (batch, L, groups, N), head h reading group h // (heads // groups); D
(heads,) or (heads, headdim); dt_bias (heads,); gap (batch, L). Per sample, head h, token t::

    dt_t = softplus?(dt_t + dt_bias_h)
    h_t  = exp(gap_t * dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        (headdim, N)
    y_t  = h_t C_t + D_h * x_t                                          (then y_t *= silu(z_t))

SSD is the Mamba-1 selective scan with one decay per head: channel (h, p) of a Mamba-1 scan over
D = heads * headdim channels whose A row is A_h everywhere, whose delta is dt_h, and whose group of
B/C is the head's group. ``as_selective_scan_args`` builds exactly that scan (views and expands,
all differentiable), which is how the op's backward reuses the Mamba-1 analytic C++ backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .scan_reference import compute_dtype_for


def ssd_scan_reference(
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
    """The SSD scan (see ``ssd_scan``) one token at a time; a contiguous (batch, L, heads, headdim)
    tensor in x's dtype, accumulated in float32 (float64 when any input is float64)."""
    dtype = compute_dtype_for(x, dt, A, B, C, D, z, dt_bias)
    batch, length, heads, headdim = x.shape
    per_group = heads // B.shape[2]
    x_f, step = x.to(dtype), dt.to(dtype)
    if dt_bias is not None:
        step = step + dt_bias.to(dtype)
    if dt_softplus:
        step = F.softplus(step)
    decay_step = step if gap is None else step * gap.to(dtype)[..., None]
    B_h = B.to(dtype).repeat_interleave(per_group, dim=2)  # (batch, L, heads, N)
    C_h = C.to(dtype).repeat_interleave(per_group, dim=2)
    state = x_f.new_zeros(batch, heads, headdim, B.shape[3])
    outputs = []
    for t in range(length):
        decay = torch.exp(decay_step[:, t] * A.to(dtype))  # (batch, heads)
        update = (step[:, t, :, None] * x_f[:, t])[..., None] * B_h[:, t, :, None, :]
        state = decay[:, :, None, None] * state + update
        outputs.append((state * C_h[:, t, :, None, :]).sum(-1))  # (batch, heads, headdim)
    y = torch.stack(outputs, dim=1) if outputs else x_f.new_zeros(x.shape)
    if D is not None:
        y = y + (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype)) * x_f
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype).contiguous()


def as_selective_scan_args(x, dt, A, B, C, D=None, z=None, dt_bias=None, gap=None) -> dict:
    """The Mamba-1 ``selective_scan`` arguments (u, delta, A, B, C, D, z, delta_bias, gap) of the same
    scan: channel h * headdim + p; u, delta, z (batch, D, L) transposed views; B, C grouped
    (batch, G, N, L) views. The caller passes ``delta_softplus`` through unchanged."""
    batch, length, heads, headdim = x.shape
    channels, dstate = heads * headdim, B.shape[3]

    def channels_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, channels).transpose(1, 2)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # (heads,) -> (heads * headdim,)
        return t[:, None].expand(heads, headdim).reshape(channels)

    return dict(
        u=channels_first(x),
        delta=channels_first(dt[..., None].expand(batch, length, heads, headdim)),
        A=A[:, None, None].expand(heads, headdim, dstate).reshape(channels, dstate),
        B=B.permute(0, 2, 3, 1),
        C=C.permute(0, 2, 3, 1),
        D=None if D is None else (per_channel(D) if D.dim() == 1 else D.reshape(channels)),
        z=None if z is None else channels_first(z),
        delta_bias=None if dt_bias is None else per_channel(dt_bias),
        gap=gap,
    )


def from_selective_scan_output(y: torch.Tensor, x_shape) -> torch.Tensor:
    """(batch, heads * headdim, L) from the Mamba-1 scan -> contiguous (batch, L, heads, headdim)."""
    return y.transpose(1, 2).reshape(x_shape).contiguous()
