"""Token-by-token selective scan with an analytic backward: the CPU path for wide batches and training.

The doubling scan in ``scan_reference`` passes over the full (batch, D, N, L) state log2(L) times,
which is fast when batch * D is small (latency, batch 1) but memory-bound when it is large, and its
autograd graph is huge. This module walks the tokens one at a time with a (batch, D, N) state that
stays in cache, and differentiates the recurrence by hand:

    forward   h_t = a_t * h_{t-1} + x_t,          y_t = <C_t, h_t>
    backward  g_t = C_t * dy_t + a_{t+1} * g_{t+1}  (the state's gradient, a reverse scan)
              dx_t = g_t,   da_t = g_t * h_{t-1}

with a_t = exp(decay_dt_t * A) and x_t = dt_u_t * B_t. Only the inner recurrence is a hand-written
autograd Function (``_ScanCore``); softplus, D, z and gap stay ordinary torch ops around it, so the
composition has the same inputs, outputs and gradients as ``selective_scan_reference``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .scan_reference import finish_scan_output, prepare_scan_inputs


# Batch pieces are sized so that each full (L, b, G, Dg, N) intermediate stays below this many elements.
_PIECE_ELEMENTS = 1 << 24


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (L, ...) contiguous, so that every token's slice is one contiguous block."""
    return t.movedim(-1, 0).contiguous()


class _ScanCore(torch.autograd.Function):
    """y[b, g, d, t] = <C_t, h_t> for h_t = exp(decay_dt_t * A) * h_{t-1} + dt_u_t * B_t.

    decay_dt, dt_u: (b, G, Dg, L); A: (G, Dg, N); B, C: (b, G, N, L). Each token's decay and input are
    formed inside the token loop, so the working set is one (b, G, N, Dg) state that stays in cache;
    channels are innermost so that the broadcasts over N vectorise. Only the states are saved for
    the backward, which is one reverse loop of the same kind.
    """

    @staticmethod
    def forward(ctx, decay_dt, dt_u, A, B, C):
        dd, du, B_t, C_t = (_token_major(t) for t in (decay_dt, dt_u, B, C))
        A_t = A.transpose(-1, -2).contiguous()  # (G, N, Dg)
        length = dd.shape[0]
        states = dd.new_empty(length, *B_t.shape[1:], dd.shape[-1])  # (L, b, G, N, Dg)
        torch.mul(du[0, :, :, None, :], B_t[0, ..., None], out=states[0])
        for t in range(1, length):
            torch.mul(du[t, :, :, None, :], B_t[t, ..., None], out=states[t])
            states[t].addcmul_(torch.exp(dd[t, :, :, None, :] * A_t), states[t - 1])
        y = torch.matmul(C_t[:, :, :, None, :], states).squeeze(-2)  # (L, b, G, Dg)
        ctx.save_for_backward(dd, du, A_t, B_t, C_t, states)
        return y.movedim(0, -1)

    @staticmethod
    def backward(ctx, grad_y):
        dd, du, A_t, B_t, C_t, states = ctx.saved_tensors
        gy = _token_major(grad_y)
        length = dd.shape[0]
        grad_dd, grad_du = torch.zeros_like(dd), torch.empty_like(du)
        grad_B = torch.empty_like(B_t)
        grad_A = torch.zeros_like(A_t)
        grad_C = torch.matmul(states, gy[..., None]).squeeze(-1)  # sum_d dy_t h_t
        g = torch.zeros_like(states[0])
        for t in range(length - 1, -1, -1):
            # g_t = C_t dy_t + a_{t+1} g_{t+1}; on entry g holds a_{t+1} g_{t+1}
            g.addcmul_(gy[t, :, :, None, :], C_t[t, ..., None])
            torch.matmul(B_t[t, :, :, None, :], g, out=grad_du[t, :, :, None, :])
            torch.matmul(g, du[t, ..., None], out=grad_B[t, ..., None])
            if t == 0:
                break
            decay = torch.exp(dd[t, :, :, None, :] * A_t)
            g.mul_(decay)  # from here on: a_t g_t, which is also d(decay_dt_t * A) / h_{t-1}
            grad_exponent = g * states[t - 1]
            grad_dd[t] = (grad_exponent * A_t).sum(-2)
            grad_A += (grad_exponent * dd[t, :, :, None, :]).sum(0)
        return (grad_dd.movedim(0, -1), grad_du.movedim(0, -1), grad_A.transpose(-1, -2),
                grad_B.movedim(0, -1), grad_C.movedim(0, -1))


def _scan_core(decay_dt, dt_u, A, B, C) -> torch.Tensor:
    """_ScanCore over batch pieces small enough that its full-size intermediates fit in memory."""
    batch, groups, per_group, length = decay_dt.shape
    per_sample = groups * per_group * A.shape[-1] * length
    piece = max(1, _PIECE_ELEMENTS // per_sample)
    if piece >= batch:
        return _ScanCore.apply(decay_dt, dt_u, A, B, C)
    pieces = zip(*(t.split(piece) for t in (decay_dt, dt_u, B, C)))
    return torch.cat([_ScanCore.apply(dd, du, A, b, c) for dd, du, b, c in pieces])


def selective_scan_sequential(
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
) -> torch.Tensor:
    """Same contract as ``selective_scan_reference`` (values and gradients), computed token by token."""
    p = prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)
    batch, dim, length = u.shape
    grouped = (batch, *p.A.shape[:2], length)
    y = _scan_core(p.decay_dt.reshape(grouped), (p.dt * p.u).reshape(grouped), p.A, p.B, p.C)
    return finish_scan_output(y.reshape(batch, dim, length), p, u, D, z)
