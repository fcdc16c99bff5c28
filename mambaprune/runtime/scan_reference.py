"""Pure-PyTorch selective scan: the CPU implementation and the ground truth for every kernel.

It is also what the custom op's backward differentiates (by recomputation), so it must stay a
differentiable composition of torch ops in every argument except ``gap``.

The recurrence h_t = exp(a_t) h_{t-1} + x_t is evaluated in chunks of ``chunk_size`` tokens. Inside
a chunk every state is written in closed form with the stable "segment sum":
h_t = exp(cum_t) h_0 + sum_{s<=t} exp(cum_t - cum_s) x_s, with cum the running sum of the log
decays a <= 0, so every exponent is <= 0 and nothing overflows. Only the chunk-to-chunk carry is a
Python loop (L / chunk_size iterations). Memory per chunk is O(batch * D * N * chunk_size^2), which is
why the chunk is kept short.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 16


def compute_dtype_for(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64 (so gradcheck is meaningful), otherwise float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def effective_delta(
    delta: torch.Tensor,
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> torch.Tensor:
    """delta (B, D, L) after the optional per-channel bias and softplus."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _as_grouped(B: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L); grouped (batch, G, N, L) is returned unchanged."""
    return B.unsqueeze(1) if B.dim() == 3 else B


def _scan_chunk(
    log_decay: torch.Tensor,
    inputs: torch.Tensor,
    C_chunk: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the recurrence.

    log_decay, inputs: (batch, G, Dg, N, T); C_chunk: (batch, G, 1, N, T); state: (batch, G, Dg, N).
    Returns the chunk's outputs <C_t, h_t> (batch, G, Dg, T) and the state after its last token.
    """
    length = log_decay.shape[-1]
    cum = log_decay.cumsum(-1)
    segment = cum[..., :, None] - cum[..., None, :]  # [t, s] = sum of log decays in (s, t]
    causal = torch.ones(length, length, dtype=torch.bool, device=cum.device).tril()
    # Mask before exp: above the diagonal the segment sum is positive and could overflow.
    decay = torch.exp(segment.masked_fill(~causal, float("-inf")))
    states = (decay @ inputs[..., None]).squeeze(-1) + torch.exp(cum) * state[..., None]
    outputs = (states * C_chunk).sum(-2)
    return outputs, states[..., -1]


def selective_scan_reference(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mamba-1 selective scan with an optional per-token position gap; see ``selective_scan``.

    Returns a contiguous (batch, D, L) tensor in u's dtype; accumulates in float32 (float64 when
    any input is float64).
    """
    dtype = compute_dtype_for(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    B4, C4 = _as_grouped(B).to(dtype), _as_grouped(C).to(dtype)
    groups, dstate = B4.shape[1], B4.shape[2]
    per_group = dim // groups

    u_f = u.to(dtype)
    dt = effective_delta(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    decay_dt = dt if gap is None else dt * gap.to(dtype)[:, None, :]

    # Channel d belongs to group d // per_group: split D into (G, Dg) and broadcast B/C over Dg.
    A_g = A.to(dtype).reshape(groups, per_group, dstate)[None, ..., None]  # (1, G, Dg, N, 1)
    log_decay_all = decay_dt.reshape(batch, groups, per_group, 1, length) * A_g
    inputs_all = (dt * u_f).reshape(batch, groups, per_group, 1, length) * B4[:, :, None]
    C_all = C4[:, :, None]

    state = u_f.new_zeros(batch, groups, per_group, dstate)
    chunks = []
    for start in range(0, length, chunk_size):
        window = slice(start, min(start + chunk_size, length))
        out, state = _scan_chunk(log_decay_all[..., window], inputs_all[..., window], C_all[..., window], state)
        chunks.append(out)
    y = torch.cat(chunks, dim=-1).reshape(batch, dim, length)

    if D is not None:
        y = y + D.to(dtype)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype).contiguous()
