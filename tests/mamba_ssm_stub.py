"""A stand-in for the `mamba_ssm` package (CUDA-only, not installable here), for tests only.

The official code of ViM and PlainMamba imports `selective_scan_fn`, `mamba_inner_fn_no_out_proj`,
`bimamba_inner_fn` (mamba_ssm.ops.selective_scan_interface) and `RMSNorm`, `rms_norm_fn`,
`layer_norm_fn` (mamba_ssm.ops.triton.layernorm); the zoo (tests/official_zoo) also `mamba_inner_fn` and
the upstream mixer `Mamba` (`mamba_ssm.Mamba`, `mamba_ssm.modules.mamba_simple.Mamba`); Mamba-2's
`mamba_chunk_scan_combined`, `mamba_split_conv1d_scan_combined`, `selective_state_update` and
`ssd_minimal_discrete` come from tests/ssd_stub.py. Here they are plain-PyTorch references of what
mamba_ssm computes (its `selective_scan_ref`, `mamba_inner_ref`, `rms_norm_ref`, `layer_norm_ref`),
written as token loops, installed in sys.modules by `install(monkeypatch)` or `installed()`.
mambaprune routes these entry points to its own op during a compile, as it would the real ones.
"""
from __future__ import annotations

import contextlib
import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssd_stub


def ref_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """mamba_ssm's selective_scan_ref, written as a token-by-token loop. u, delta, z: (b, d, l);
    A: (d, n); B, C: (b, n, l) or (b, g, n, l)."""
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape

    def per_channel(M):
        return M.unsqueeze(1) if M.dim() == 3 else M.repeat_interleave(dim // M.shape[1], dim=1)

    B, C = per_channel(B), per_channel(C)                       # (b, d or 1, n, l)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y


def ref_inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C,
                     B_proj_bias=None, C_proj_bias=None):
    """mamba_inner_ref's preamble: causal depthwise conv + SiLU, x_proj, delta (no bias), B, C."""
    x, z = xz.chunk(2, dim=1)
    channels, width = x.shape[1], conv1d_weight.shape[-1]
    weight = conv1d_weight.reshape(channels, 1, width)
    x = F.silu(F.conv1d(F.pad(x, (width - 1, 0)), weight, conv1d_bias, groups=channels))
    x_dbl = torch.einsum("bdl,ed->ble", x, x_proj_weight)
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    delta = torch.einsum("dr,blr->bdl", delta_proj_weight, x_dbl[..., :rank])
    if B is None:
        B = x_dbl[..., rank:rank + n]
        B = (B + B_proj_bias if B_proj_bias is not None else B).transpose(1, 2)
    if C is None:
        C = x_dbl[..., rank + n:rank + 2 * n]
        C = (C + C_proj_bias if C_proj_bias is not None else C).transpose(1, 2)
    return x, z, delta, B, C


def ref_mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A,
                                   B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                                   delta_softplus=True, checkpoint_lvl=1):
    x, z, delta, B, C = ref_inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B,
                                         C, B_proj_bias, C_proj_bias)
    return ref_selective_scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)


def ref_mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                       delta_softplus=True, checkpoint_lvl=1):
    """mamba_inner_ref: the one-direction mixer after in_proj, out_proj included."""
    x, z, delta, B, C = ref_inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B,
                                         C, B_proj_bias, C_proj_bias)
    y = ref_selective_scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def ref_bimamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                         out_proj_bias, A, A_b, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                         C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
    x, z, delta, B, C = ref_inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B,
                                         C, B_proj_bias, C_proj_bias)
    y = ref_selective_scan_fn(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    y_b = ref_selective_scan_fn(x.flip(-1), delta.flip(-1), A_b, B.flip(-1), C.flip(-1), D, z=z.flip(-1),
                                delta_bias=delta_bias, delta_softplus=True)
    return F.linear((y + y_b.flip(-1)).transpose(1, 2), out_proj_weight, out_proj_bias)


def ref_rms_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    """mamba_ssm's fused add + RMSNorm: the sum is the new residual (fp32 if asked), then normed."""
    dtype = x.dtype
    total = x if residual is None else x + residual
    if residual_in_fp32:
        total = total.float()
    out = total.float() * torch.rsqrt(total.float().square().mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        out = out + bias.float()
    out = out.to(dtype)
    return (out, total) if prenorm else out


def ref_layer_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    dtype = x.dtype
    total = x if residual is None else x + residual
    if residual_in_fp32:
        total = total.float()
    out = F.layer_norm(total.float(), total.shape[-1:], weight.float(), None if bias is None else bias.float(),
                       eps).to(dtype)
    return (out, total) if prenorm else out


class RMSNorm(nn.Module):
    """mamba_ssm.ops.triton.layernorm.RMSNorm: a weight, no bias."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return ref_rms_norm_fn(x, self.weight, self.bias, residual, prenorm, residual_in_fp32, self.eps)


class Mamba(nn.Module):
    """mamba_ssm.modules.mamba_simple.Mamba (upstream, one direction): in_proj as one matmul on
    (d, b*l), then `mamba_inner_fn` (the fast path) with out_proj inside. Used as it is by Mamba-ND and
    SiMBA (`from mamba_ssm import Mamba`)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4, conv_bias=True, bias=False, use_fast_path=True, layer_idx=None, device=None,
                 dtype=None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.activation, self.act = "silu", nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states, inference_params=None):
        seqlen = hidden_states.shape[1]
        xz = (self.in_proj.weight @ hidden_states.reshape(-1, self.d_model).t())   # (d, b*l)
        xz = xz.reshape(xz.shape[0], -1, seqlen).permute(1, 0, 2)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(dtype=xz.dtype)[:, None]
        A = -torch.exp(self.A_log.float())
        return ref_mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                                  self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                                  delta_bias=self.dt_proj.bias.float(), delta_softplus=True)


INTERFACE = {
    "selective_scan_fn": ref_selective_scan_fn,
    "mamba_inner_fn": ref_mamba_inner_fn,
    "mamba_inner_fn_no_out_proj": ref_mamba_inner_fn_no_out_proj,
    "bimamba_inner_fn": ref_bimamba_inner_fn,
}
LAYERNORM = {"RMSNorm": RMSNorm, "rms_norm_fn": ref_rms_norm_fn, "layer_norm_fn": ref_layer_norm_fn}


def _modules() -> dict:
    package, ops, triton = (types.ModuleType(n) for n in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"))
    modules, mamba_simple = (types.ModuleType(n) for n in ("mamba_ssm.modules", "mamba_ssm.modules.mamba_simple"))
    package.Mamba = mamba_simple.Mamba = Mamba
    package.modules, modules.mamba_simple = modules, mamba_simple
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    layernorm = types.ModuleType("mamba_ssm.ops.triton.layernorm")
    for name, value in INTERFACE.items():
        setattr(interface, name, value)
    for name, value in LAYERNORM.items():
        setattr(layernorm, name, value)
    package.ops, ops.selective_scan_interface, ops.triton, triton.layernorm = ops, interface, triton, layernorm
    return {"mamba_ssm": package, "mamba_ssm.ops": ops, "mamba_ssm.ops.selective_scan_interface": interface,
            "mamba_ssm.ops.triton": triton, "mamba_ssm.ops.triton.layernorm": layernorm,
            "mamba_ssm.modules": modules, "mamba_ssm.modules.mamba_simple": mamba_simple,
            **ssd_stub.mamba_ssm_modules(modules, triton)}


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-in package in sys.modules for one test; returns its selective_scan_interface."""
    for name, module in _modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return sys.modules["mamba_ssm.ops.selective_scan_interface"]


@contextlib.contextmanager
def installed():
    """The stand-in package in sys.modules for the duration of the block (module-scoped fixtures)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield install(monkeypatch)
