"""Adapters from third-party scan entry points to `mambaprune::selective_scan`.

Each adapter has the signature of the function it replaces and computes the same value with our
op. mamba_ssm's fused `*_inner_fn` adapters follow `mamba_inner_ref` of state-spaces/mamba (and
Vim's `bimamba_inner_ref` for the bidirectional v1 variant).
"""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import UnsupportedModelError
from ..runtime import selective_scan


# -- mambapy (pure PyTorch Mamba): methods taking (B, L, ED) tensors -------------------------------
def mambapy_selective_scan(self, x, delta, A, B, C, D):
    y = selective_scan(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D)
    return y.transpose(1, 2)


# -- mamba_ssm --------------------------------------------------------------------------------------
def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    if return_last_state:
        raise UnsupportedModelError("mambaprune cannot capture selective_scan_fn(return_last_state=True): "
                                    "the final state is not an output of mambaprune::selective_scan")
    if B.dim() == 3 and B.shape[1] != A.shape[1]:
        raise ValueError("selective_scan_fn with B of shape (batch, L, N) is not supported; use (batch, N, L)")
    return selective_scan(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)


def _inner_scan_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C,
                       B_proj_bias, C_proj_bias):
    length = xz.shape[-1]
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv1d_weight.unsqueeze(1) if conv1d_weight.dim() == 2 else conv1d_weight,
                        conv1d_bias, padding=conv1d_weight.shape[-1] - 1, groups=x.shape[1])[..., :length])
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)
    delta = (delta_proj_weight @ x_dbl[..., :delta_rank].transpose(1, 2))
    if B is None:
        B = x_dbl[..., delta_rank:delta_rank + d_state]
        B = (B + B_proj_bias if B_proj_bias is not None else B).transpose(1, 2)
    if C is None:
        C = x_dbl[..., -d_state:]
        C = (C + C_proj_bias if C_proj_bias is not None else C).transpose(1, 2)
    return x, z, delta, B, C


def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                               A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                               C_proj_bias=None, delta_softplus=True, *args, **kwargs):
    x, z, delta, B, C = _inner_scan_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                           A, B, C, B_proj_bias, C_proj_bias)
    return selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                   C_proj_bias=None, delta_softplus=True, *args, **kwargs):
    y = mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C,
                                   D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                     out_proj_bias, A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                     C_proj_bias=None, delta_softplus=True, *args, **kwargs):
    """Vim's v1 bidirectional block: one conv, the backward scan runs on the flipped sequence."""
    x, z, delta, B, C = _inner_scan_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                           A, B, C, B_proj_bias, C_proj_bias)
    y = selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y_b = selective_scan(x.flip(-1), delta.flip(-1), A_b, B.flip(-1), C.flip(-1), D, z.flip(-1), delta_bias,
                         delta_softplus)
    y = y + y_b.flip(-1)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


_OPS = "mamba_ssm.ops.selective_scan_interface"
BUILTIN = [
    ("mambapy.mamba", "MambaBlock.selective_scan", mambapy_selective_scan),
    ("mambapy.mamba", "MambaBlock.selective_scan_seq", mambapy_selective_scan),
    ("mambapy.vim", "VMambaBlock.selective_scan", mambapy_selective_scan),
    ("mambapy.vim", "VMambaBlock.selective_scan_seq", mambapy_selective_scan),
    (_OPS, "selective_scan_fn", selective_scan_fn),
    (_OPS, "selective_scan_ref", selective_scan_fn),
    (_OPS, "mamba_inner_fn", mamba_inner_fn),
    (_OPS, "mamba_inner_ref", mamba_inner_fn),
    (_OPS, "mamba_inner_fn_no_out_proj", mamba_inner_fn_no_out_proj),
    (_OPS, "bimamba_inner_fn", bimamba_inner_fn),
    (_OPS, "bimamba_inner_ref", bimamba_inner_fn),
]
