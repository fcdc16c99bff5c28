"""Scan kernels as vision-Mamba projects vendor them, for tests/test_scan_behaviour.py only.

Published vision SSM code (LocalMamba, EfficientVMamba, VMamba's copies) keeps its own copy of the
selective scan under module names mambaprune has never heard of: a token-loop reference like
mamba_ssm's `selective_scan_ref`, an autograd Function whose forward calls a compiled extension's
`fwd` (`selective_scan_cuda_core.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows)`, which
returns `(out, x, *rest)`), and sometimes a variant with different math. These are our own
plain-PyTorch reproductions of that behaviour: nothing here is imported from those projects, and
`selective_scan_cuda_core` is a Python module object standing in for the compiled extension.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _recurrence(u, delta, A, B, C):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = <C_t, h_t>; B, C (b, n, l) or (b, g, n, l)."""
    batch, dim, length = u.shape

    def per_channel(M):
        return M.unsqueeze(1) if M.dim() == 3 else M.repeat_interleave(dim // M.shape[1], dim=1)

    B, C = per_channel(B), per_channel(C)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    return torch.stack(ys, dim=-1), h


def selective_scan_easy(us, dts, As, Bs, Cs, Ds, delta_bias=None, delta_softplus=False):
    """VMamba-style argument order (no gate): us, dts (b, k*d, l), As (k*d, n), Bs, Cs (b, k, n, l), Ds."""
    dts = dts.float()
    if delta_bias is not None:
        dts = dts + delta_bias.float()[:, None]
    if delta_softplus:
        dts = F.softplus(dts)
    y, _ = _recurrence(us.float(), dts, As.float(), Bs.float(), Cs.float())
    return (y + Ds.float()[:, None] * us.float()).to(us.dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's argument order, the gate z included."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, _ = _recurrence(u.float(), delta, A.float(), B.float(), C.float())
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_no_skip(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """A near miss: the same arguments, but D is ignored (no skip connection); its recurrence written out
    (through `_recurrence`, a scan of its own, the call would be the routed scan plus plain ops)."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]).float()
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A.float()) * h + dt * B.float()[:, None, :, t] * u.float()[:, :, t, None]
        ys.append((h * C.float()[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_with_state(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's reference with return_last_state=True: (y, last state)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    y, last = _recurrence(u, F.softplus(delta) if delta_softplus else delta, A, B, C)
    y = y if D is None else y + D[:, None] * u
    return (y if z is None else y * F.silu(z)), last


def _core_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows):
    """What the compiled extension's fwd returns: the output and the last states (for backward)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, last = _recurrence(u, delta, A, B, C)
    if D is not None:
        y = y + D[:, None] * u
    return y, last


def _core_bwd(*args):
    raise NotImplementedError("the stand-in extension has no backward")


selective_scan_cuda_core = types.ModuleType("selective_scan_cuda_core")
selective_scan_cuda_core.fwd = _core_fwd
selective_scan_cuda_core.bwd = _core_bwd


class SelectiveScan(torch.autograd.Function):
    """LocalMamba / EfficientVMamba style: the extension's fwd in forward, its bwd in backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, nrows=1):
        if B.dim() == 3:
            B, C = B.unsqueeze(1), C.unsqueeze(1)
        out, x = selective_scan_cuda_core.fwd(u.contiguous(), delta.contiguous(), A, B.contiguous(),
                                              C.contiguous(), D, delta_bias, delta_softplus, nrows)
        ctx.delta_softplus, ctx.nrows = delta_softplus, nrows
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, x)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, delta_bias, x = ctx.saved_tensors
        return selective_scan_cuda_core.bwd(u, delta, A, B, C, D, delta_bias, dout, x, ctx.delta_softplus,
                                            ctx.nrows)


class SelectiveScanCore(SelectiveScan):
    """The same Function under another name, handed to the model only through a partial's keyword."""
