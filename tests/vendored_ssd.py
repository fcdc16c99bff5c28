"""Mamba-2 (SSD) kernels as vision Mamba-2 projects vendor them, for tests/test_ssd_behaviour.py only.

Vision code built on Mamba-2 often keeps its own copy of mamba_ssm's SSD under a module name of its
own (`models/ssd/ssd_combined.py`, ...): the chunked scan with mamba_chunk_scan_combined's arguments,
or the minimal discretised SSD of mamba_ssm's `ssd_minimal.py`. These are our own plain-PyTorch
reproductions of that behaviour, computed in the chunked form (tests/ssd_stub.py), a formulation
independent of mambaprune's op; nothing here is imported from those projects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd_stub import chunked_ssd


def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """x, z (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n); D (h,); dt_bias (h,)."""
    heads = x.shape[2]
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    B, C = (t.float().repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    y, _ = chunked_ssd(x.float() * dt[..., None], A.float() * dt, B, C, chunk_size)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def ssd_discrete(X, A, B, C, block_len):
    """The minimal SSD: X = x * dt, A = A * dt (b, l, h), B, C (b, l, h, n) -> (Y, final state)."""
    return chunked_ssd(X, A, B, C, block_len)


def chunk_scan_sigmoid_decay(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False):
    """A variant with other math and SSD shapes: the state decays by sigmoid(dt * A), not exp(dt * A)."""
    heads = x.shape[2]
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    B, C = (t.float().repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    h, ys = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[-1]).float(), []
    for t in range(x.shape[1]):
        h = torch.sigmoid(dt[:, t] * A)[..., None, None] * h \
            + (dt[:, t, :, None] * x[:, t].float())[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) + (0 if D is None else D.float()[:, None] * x.float())
    return (y * F.silu(z.float()) if z is not None else y).to(x.dtype)
