"""Stand-ins for mamba_ssm's Mamba-2 (SSD) functions (CUDA / Triton only, not installable here), for
tests only (HF transformers' Mamba2Mixer has its stand-in in tests/test_mamba2_routing.py).

Plain-PyTorch references with the signatures of mamba_ssm's `mamba_chunk_scan_combined`,
`mamba_split_conv1d_scan_combined` (mamba_ssm/ops/triton/ssd_combined.py), `selective_state_update`
and `ssd_minimal_discrete` (modules/ssd_minimal.py), and causal_conv1d's `causal_conv1d_fn`. The
scan is computed here in the CHUNKED form of the Mamba-2 paper (intra-chunk "attention" with the segment-sum decay mask, chunk states, the
recurrence between chunks), a formulation independent of mambaprune's op, which is a token loop:
a routed model equal to its stand-in checks both. tests/mamba_ssm_stub.py installs them in the
stand-in package.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F


def chunked_ssd(X, A, B, C, block_len, initial_states=None):
    """The SSD of discretised inputs in chunks of `block_len` tokens: X (b, l, h, p) = x * dt,
    A (b, l, h) = A * dt, B, C (b, l, h, n). Returns (Y (b, l, h, p), final state (b, h, p, n))."""
    batch, length, heads, headdim = X.shape
    pad = (-length) % block_len
    X, A, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, A, B, C))
    chunks = (length + pad) // block_len
    X, A, B, C = (t.reshape(batch, chunks, block_len, *t.shape[2:]) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)                                              # (b, h, c, q)
    A_cumsum = torch.cumsum(A, dim=-1)
    causal = torch.ones(block_len, block_len, dtype=torch.bool, device=X.device).tril()
    segment = A_cumsum[..., :, None] - A_cumsum[..., None, :]             # (b, h, c, q, q)
    decay = torch.exp(segment.masked_fill(~causal, -torch.inf))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, X)
    to_end = torch.exp(A_cumsum[..., -1:] - A_cumsum)                      # (b, h, c, q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, X)
    state = X.new_zeros(batch, heads, headdim, B.shape[-1]) if initial_states is None else initial_states
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = torch.exp(A_cumsum[:, :, c, -1])[..., None, None] * state + states[:, c]
    entering = torch.stack(entering, dim=1)                               # (b, c, h, p, n)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(A_cumsum))
    Y = (Y_diag + Y_off).reshape(batch, chunks * block_len, heads, headdim)[:, :length]
    return Y, state


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    return chunked_ssd(X, A, B, C, block_len, initial_states)


def _step_size(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    heads = x.shape[2]
    dt = _step_size(dt, dt_bias, dt_softplus, dt_limit)                   # (b, l, h)
    B, C = (t.float().repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    Y, final = chunked_ssd(x.float() * dt[..., None], A.float() * dt, B, C, chunk_size, initial_states)
    if D is not None:
        Y = Y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()
    if z is not None:
        Y = Y * F.silu(z.float())
    Y = Y.to(x.dtype)
    return (Y, final) if return_final_states else Y


def rms_norm_gated(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """layernorm_gated.rms_norm_ref: RMSNorm over groups of channels, gated by silu(z) before or after."""
    dtype, x = x.dtype, x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    size = group_size or x.shape[-1]
    groups = x.reshape(*x.shape[:-1], -1, size)
    out = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape) * weight.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """mamba_split_conv1d_scan_ref: split, causal depthwise conv (+ SiLU), chunked scan, gated norm, out_proj."""
    if D.dim() == 1:
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, length, width = *zxbcdt.shape[:2], conv1d_weight.shape[-1]
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    padded = F.pad(xBC.transpose(1, 2), (width - 1, 0))
    xBC = F.conv1d(padded, conv1d_weight.unsqueeze(1), conv1d_bias, groups=xBC.shape[-1]).transpose(1, 2)
    if activation in ("silu", "swish"):
        xBC = F.silu(xBC)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, length, nheads, headdim)
    B, C = (t.reshape(batch, length, ngroups, dstate) for t in (B, C))
    gate = z.reshape(batch, length, nheads, headdim) if rmsnorm_weight is None else None
    out = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, gate, dt_bias, initial_states, seq_idx,
                                    dt_softplus=True, dt_limit=dt_limit, return_final_states=return_final_states)
    out, final = out if return_final_states else (out, None)
    out = out.reshape(batch, length, dim)
    if rmsnorm_weight is not None:
        out = rms_norm_gated(out, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        out = torch.cat([F.silu(z0) * x0, out], dim=-1)
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return (out, final) if return_final_states else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decoding step (Mamba2 layout: x, dt (b, h, p); A (h, p, n); B, C (b, g, n)); updates state in place."""
    heads = x.shape[1]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt
    B, C = (t.float().repeat_interleave(heads // t.shape[1], dim=1) for t in (B, C))   # (b, h, n)
    new = torch.exp(dt[..., None] * A.float()) * state.float() + (dt * x.float())[..., None] * B[:, :, None]
    state.copy_(new.to(state.dtype))
    y = (new * C[:, :, None]).sum(-1)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal_conv1d's reference: left-pad by width - 1, depthwise conv, SiLU if asked."""
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_module() -> types.ModuleType:
    module = types.ModuleType("causal_conv1d")
    module.causal_conv1d_fn = causal_conv1d_fn
    return module


def mamba_ssm_modules(modules, triton) -> dict:
    """The SSD modules of the stand-in mamba_ssm package (hung on its `modules` and `ops.triton`)."""
    combined = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    combined.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    combined.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
    update = types.ModuleType("mamba_ssm.ops.triton.selective_state_update")
    update.selective_state_update = selective_state_update
    minimal = types.ModuleType("mamba_ssm.modules.ssd_minimal")
    minimal.ssd_minimal_discrete = ssd_minimal_discrete
    modules.ssd_minimal = minimal
    triton.ssd_combined, triton.selective_state_update = combined, update
    return {"mamba_ssm.ops.triton.ssd_combined": combined, "mamba_ssm.ops.triton.selective_state_update": update,
            "mamba_ssm.modules.ssd_minimal": minimal}
