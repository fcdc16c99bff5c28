"""Pure-PyTorch selective scan: the CPU implementation and the ground truth for every kernel.

It is also what the custom op's backward differentiates (by recomputation), so it must stay a
differentiable composition of torch ops in every argument except ``gap``.

The recurrence h_t = a_t h_{t-1} + x_t, with a_t = exp(gap_t * delta_t * A) in (0, 1] and
x_t = delta_t * B_t * u_t, is evaluated by a Hillis-Steele (doubling) scan over the token axis:
ceil(log2 L) steps, each composing every position's (decay product, state) pair with the pair
``shift`` tokens earlier. Only products of decays <= 1 are formed, so nothing overflows and there is
no cancellation. Sequences longer than ``chunk_size`` are scanned in chunks of that many tokens all
at once, then the chunk-to-chunk carries are scanned the same way and added back. No Python loop
runs over tokens or chunks; the loops are over log2 steps and over cache-sized blocks of
samples/channels (``_BLOCK_ELEMENTS`` state elements each), which is what makes this fast on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 256
_BLOCK_ELEMENTS = 1 << 19  # state elements (batch * D * N * L) scanned per block


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


@dataclass
class ScanInputs:
    """The scan's inputs in the compute dtype: u, dt (after bias/softplus) and decay_dt = dt * gap,
    (batch, D, L); A (G, Dg, N), channel d in group d // Dg; B, C (batch, G, N, L)."""

    dtype: torch.dtype
    u: torch.Tensor
    dt: torch.Tensor
    decay_dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor


def prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap) -> ScanInputs:
    """What every implementation of the scan computes before the recurrence."""
    dtype = compute_dtype_for(u, delta, A, B, C, D, z, delta_bias)
    B4, C4 = _as_grouped(B).to(dtype), _as_grouped(C).to(dtype)
    groups, dstate = B4.shape[1], B4.shape[2]
    dt = effective_delta(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    decay_dt = dt if gap is None else dt * gap.to(dtype)[:, None, :]
    A_g = A.to(dtype).reshape(groups, u.shape[1] // groups, dstate)
    return ScanInputs(dtype, u.to(dtype), dt, decay_dt, A_g, B4, C4)


def finish_scan_output(y: torch.Tensor, p: ScanInputs, u, D, z) -> torch.Tensor:
    """y (batch, D, L) from the recurrence -> + D * u, * silu(z), in u's dtype, contiguous."""
    if D is not None:
        y = y + D.to(p.dtype)[:, None] * p.u
    if z is not None:
        y = y * F.silu(z.to(p.dtype))
    return y.to(u.dtype).contiguous()


def _as_grouped(B: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L); grouped (batch, G, N, L) is returned unchanged."""
    return B.unsqueeze(1) if B.dim() == 3 else B


def _shift(t: torch.Tensor, steps: int, fill: float) -> torch.Tensor:
    """t moved ``steps`` places towards the end of its last axis, the vacated front filled with ``fill``."""
    return F.pad(t[..., :-steps], (steps, 0), value=fill)


def _doubling_scan(decay: torch.Tensor, inputs: torch.Tensor, need_decay: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hillis-Steele scan of h_t = decay_t * h_{t-1} + inputs_t (h_{-1} = 0) along the last axis.

    After the step with shift s, position t holds the pair composed over the window (t - 2s, t]: its
    decay product and its state from a zero start. ceil(log2(length)) steps. Returns the states and,
    when ``need_decay``, the decay products from the start of the axis (else ``decay`` is stale).
    """
    length = decay.shape[-1]
    shift = 1
    while shift < length:
        inputs = torch.addcmul(inputs, decay, _shift(inputs, shift, 0.0))
        if need_decay or 2 * shift < length:
            decay = decay * _shift(decay, shift, 1.0)
        shift *= 2
    return inputs, decay


def _scan_block(
    decay_dt: torch.Tensor,
    A_g: torch.Tensor,
    dt_u: torch.Tensor,
    B_blk: torch.Tensor,
    C_blk: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """The scan of one block of samples/channels: returns <C_t, h_t> (b, G, Dg, L).

    decay_dt, dt_u: (b, G, Dg, 1, L); A_g: (1, G, Dg, N, 1); B_blk, C_blk: (b, G, 1, N, L).
    """
    length = decay_dt.shape[-1]
    decay = torch.exp(decay_dt * A_g)  # (b, G, Dg, N, L), every factor in (0, 1]
    inputs = dt_u * B_blk
    if length <= chunk_size:
        states, _ = _doubling_scan(decay, inputs, need_decay=False)
        return (states * C_blk).sum(-2)

    # Chunks of chunk_size tokens (the last one padded with decay 1, input 0): scan inside every
    # chunk at once, then scan the chunk-to-chunk carries, then add each chunk's incoming carry.
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length
    decay = F.pad(decay, (0, pad), value=1.0).unflatten(-1, (chunks, chunk_size))
    inputs = F.pad(inputs, (0, pad)).unflatten(-1, (chunks, chunk_size))
    states, decay = _doubling_scan(decay, inputs, need_decay=True)  # (b, G, Dg, N, chunks, T)
    carry, _ = _doubling_scan(decay[..., -1], states[..., -1], need_decay=False)  # (b, G, Dg, N, chunks)
    states = torch.addcmul(states, decay, _shift(carry, 1, 0.0)[..., None])
    return (states.flatten(-2)[..., :length] * C_blk).sum(-2)


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
    p = prepare_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)
    batch, dim, length = u.shape
    groups, per_group, dstate = p.A.shape
    B4, C4, u_f, dt = p.B, p.C, p.u, p.dt

    # Channel d belongs to group d // per_group: split D into (G, Dg) and broadcast B/C over Dg.
    A_g = p.A[None, ..., None]  # (1, G, Dg, N, 1)
    decay_dt = p.decay_dt.reshape(batch, groups, per_group, 1, length)
    dt_u = (dt * u_f).reshape(batch, groups, per_group, 1, length)
    B5, C5 = B4[:, :, None], C4[:, :, None]  # (batch, G, 1, N, L)

    # Blocks of about _BLOCK_ELEMENTS state elements keep the working set in cache: whole samples
    # when they are small, else one sample and a slice of channels. split/cat keep backward cheap.
    per_sample = dim * dstate * length
    if per_sample >= _BLOCK_ELEMENTS:
        samples, channels = 1, max(1, _BLOCK_ELEMENTS // (groups * dstate * length))
    else:
        samples, channels = max(1, _BLOCK_ELEMENTS // per_sample), per_group
    A_blocks = A_g.split(channels, dim=2)
    rows = []
    for dd_s, du_s, B_s, C_s in zip(*(t.split(samples) for t in (decay_dt, dt_u, B5, C5))):
        outs = [
            _scan_block(dd, A_blk, du, B_s, C_s, chunk_size)
            for dd, A_blk, du in zip(dd_s.split(channels, dim=2), A_blocks, du_s.split(channels, dim=2))
        ]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    y = (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)).reshape(batch, dim, length)
    return finish_scan_output(y, p, u, D, z)
