"""Token-by-token selective scan with an analytic backward: the pure-PyTorch CPU path for wide batches
and training (the C++ kernel of scan_cpp is faster still; this is its fallback).

The doubling scan in ``scan_reference`` passes over the full (batch, D, N, L) state log2(L) times,
which is memory-bound when batch * D is large, and its autograd graph is huge. This module walks
the tokens one at a time with a (batch, D, N) state, in cache-sized chunks of tokens whose decays
and inputs are formed in one op each, so the loop itself is one fused multiply-add per token (the
earlier four ops per token made dispatch the cost: 6.5 -> 2.7 ms at ViM-T's batch-1 shape), and
differentiates the recurrence by hand:

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
# A chunk of tokens holds about this many state elements (1 MiB of float32: cache-resident).
_CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK_TOKENS = 4


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (L, ...) contiguous, so that every token's slice is one contiguous block."""
    return t.movedim(-1, 0).contiguous()


def _chunk_tokens(per_token: int) -> int:
    """Tokens per chunk: enough to amortise the per-chunk ops, few enough to stay in cache."""
    return max(_MIN_CHUNK_TOKENS, _CHUNK_ELEMENTS // max(1, per_token))


class _ScanCore(torch.autograd.Function):
    """y[b, g, d, t] = <C_t, h_t> for h_t = exp(decay_dt_t * A) * h_{t-1} + dt_u_t * B_t.

    decay_dt, dt_u: (b, G, Dg, L); A: (G, Dg, N); B, C: (b, G, N, L). Token-major (L, b, G, N, Dg)
    layout, channels innermost so the broadcasts over N vectorise. Tokens go in cache-sized chunks:
    the decays and inputs of a whole chunk are formed in one op each, so the token loop is ONE fused
    multiply-add per token (per-op dispatch, not arithmetic, is the cost on a CPU). Only the states
    are saved; the backward recomputes the decays chunk by chunk in a reverse loop of the same kind.
    """

    @staticmethod
    def forward(ctx, decay_dt, dt_u, A, B, C):
        dd, du, B_t, C_t = (_token_major(t) for t in (decay_dt, dt_u, B, C))
        A_t = A.transpose(-1, -2).contiguous()  # (G, N, Dg)
        length = dd.shape[0]
        states = dd.new_empty(length, *B_t.shape[1:], dd.shape[-1])  # (L, b, G, N, Dg)
        chunk = _chunk_tokens(states[0].numel())
        previous = None
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            decays = torch.exp(dd[start:stop, :, :, None, :] * A_t)
            inputs = torch.mul(du[start:stop, :, :, None, :], B_t[start:stop, ..., None], out=states[start:stop])
            for decay, state in zip(decays.unbind(0), inputs.unbind(0)):
                if previous is not None:
                    state.addcmul_(decay, previous)
                previous = state
        y = torch.matmul(C_t[:, :, :, None, :], states).squeeze(-2)  # (L, b, G, Dg)
        ctx.save_for_backward(dd, du, A_t, B_t, C_t, states)
        return y.movedim(0, -1)

    @staticmethod
    def backward(ctx, grad_y):
        dd, du, A_t, B_t, C_t, states = ctx.saved_tensors
        gy = _token_major(grad_y)
        length = dd.shape[0]
        grad_dd, grad_du, grad_B = torch.zeros_like(dd), torch.empty_like(du), torch.empty_like(B_t)
        grad_A = torch.zeros_like(A_t)
        chunk = _chunk_tokens(states[0].numel())
        later = None  # (a_{t+1}, g_{t+1}) of the first token after the current one
        for start in reversed(range(0, length, chunk)):
            stop = min(length, start + chunk)
            decays = torch.exp(dd[start:stop, :, :, None, :] * A_t)
            g = C_t[start:stop, ..., None] * gy[start:stop, :, :, None, :]  # becomes the state's gradient
            for decay, g_t in zip(reversed(decays.unbind(0)), reversed(g.unbind(0))):
                if later is not None:
                    g_t.addcmul_(*later)  # g_t = C_t dy_t + a_{t+1} g_{t+1}
                later = (decay, g_t)
            grad_du[start:stop] = torch.matmul(B_t[start:stop, :, :, None, :], g).squeeze(-2)  # sum_n B_t g_t
            grad_B[start:stop] = torch.matmul(g, du[start:stop, ..., None]).squeeze(-1)  # sum_d g_t dt_u_t
            # d(decay_dt_t * A) = a_t g_t h_{t-1} for t >= 1 (h_{-1} = 0)
            first = max(start, 1)
            grad_exponent = g[first - start:] * decays[first - start:] * states[first - 1 : stop - 1]
            grad_dd[first:stop] = (grad_exponent * A_t).sum(-2)
            grad_A += (grad_exponent * dd[first:stop, :, :, None, :]).sum((0, 1))
        grad_C = torch.matmul(states, gy[..., None]).squeeze(-1)  # sum_d dy_t h_t
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
