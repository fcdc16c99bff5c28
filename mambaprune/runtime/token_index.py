"""Run-time index arithmetic emitted by the pruning passes (plain torch: exportable, ONNX-friendly).

Vocabulary (see analysis/layout.py): at a pruning site every sample keeps K tokens.
- `idx` (B, K): original positions of the kept tokens, in the slot order of the identity layout.
- `vpos` (B, K): the positions the kept tokens *claim* for token mixing: `idx` under the `hold` and
  `decay` alignments, 0..K-1 (a compacted sequence) under `none` / `none-unsorted`.
- A tensor in layout `path` holds the kept tokens sorted by their rank along `path`; `rank` below is
  the constant inverse permutation of `path` (rank[p] = step at which the path visits position p).
"""
from __future__ import annotations

import math

import torch

from . import token_ops

METRICS = ("clip", "l1", "l2", "raw", "random", "delta", "delta-max", "novelty", "novelty-y")
# metrics read from the scans' step sizes (rewrite/score.py), not from a token tensor
STEP_METRICS = ("delta", "delta-max")


def token_scores(y: torch.Tensor, token_dim: int, metric: str) -> torch.Tensor:
    """Importance (B, L) of each token slot of y: reduce every axis but batch and tokens."""
    y = y.movedim(token_dim, 1).float()
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    if metric == "clip":
        return flat.clamp_min(0).sum(-1)
    if metric == "l1":
        return flat.abs().sum(-1)
    if metric == "l2":
        return flat.square().sum(-1).sqrt()
    if metric in ("raw", "delta", "delta-max"):
        return flat.sum(-1) if metric == "raw" else flat.mean(-1)
    if metric == "random":
        return pseudo_random_scores(flat)
    if metric in ("novelty", "novelty-y"):
        # distance from the sample's mean token: a token like the average one adds little the others
        # do not already carry (benchmarks/fidelity.py: it keeps the digit, clip keeps the clutter)
        return (flat - flat.mean(1, keepdim=True)).square().sum(-1).sqrt()
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def grid_token_scores(x: torch.Tensor, hdim: int, wdim: int, metric: str) -> torch.Tensor:
    """token_scores of a (B, C, H, W)-like grid, cells in row-major order (a pruned K x 1 grid: its K cells)."""
    flat = x.movedim((hdim, wdim), (-2, -1)).flatten(-2)
    return token_scores(flat, flat.dim() - 1, metric)


def pseudo_random_scores(flat: torch.Tensor) -> torch.Tensor:
    """Deterministic, data-dependent noise: same input, same scores, no generator state in the graph."""
    seed = flat.sum(-1) * 12.9898 + torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype) * 78.233
    return torch.frac(torch.sin(seed) * 43758.5453)


def scores_to_identity(scores: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Scores listed in a layout's slot order -> identity slot order (order = identity slot of each)."""
    if order is None:
        return scores
    return torch.zeros_like(scores).scatter(1, order, scores)


def select_tokens(scores: torch.Tensor, prev_idx: torch.Tensor, protected: torch.Tensor, keep: int,
                  sort: bool) -> torch.Tensor:
    """Per-sample top-`keep` slots; protected original positions always win, then the highest scores,
    equal scores going to the lower original position. Returns (B, keep) slots."""
    is_protected = (prev_idx.unsqueeze(-1) == protected).any(-1) if protected.numel() else torch.zeros_like(prev_idx, dtype=torch.bool)
    ranked = torch.where(is_protected, torch.full_like(scores, math.inf), scores.float())
    # equal scores: the lower ORIGINAL position wins, whatever the slot order (slots follow top-k
    # order under none-unsorted) and the sort implementation: a stable sort by score of the slots
    # listed by position (with slots already in position order, the first argsort is the identity)
    by_position = torch.argsort(prev_idx, dim=1, stable=True)
    order = torch.argsort(ranked.gather(1, by_position), dim=1, descending=True, stable=True)
    slots = by_position.gather(1, order)[:, :keep]
    return torch.sort(slots, dim=1).values if sort else slots


def to_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 (scores of a half-precision model are computed in fp32)."""
    return x.float()


def initial_positions(reference: torch.Tensor, token_dim: int) -> torch.Tensor:
    """arange(L) per sample: the identity slots before the first site."""
    length = reference.shape[token_dim]
    return torch.arange(length, device=reference.device).unsqueeze(0).expand(reference.shape[0], length)


def compacted_positions(idx: torch.Tensor) -> torch.Tensor:
    """0..K-1 per sample: the positions a compacted (ViT-style) sequence claims."""
    return torch.arange(idx.shape[1], device=idx.device).unsqueeze(0).expand_as(idx)


def layout_order(vpos: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """For each slot of a layout, the identity slot it holds: argsort of the claimed path ranks."""
    return torch.argsort(rank.to(vpos.device)[vpos], dim=1, stable=True)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    return torch.argsort(order, dim=1, stable=True)


def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values.gather(1, index) for (B, n) tables and (B, K) indices."""
    return values.gather(1, index)


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A constant 1-D table read at (B, K) indices."""
    return table.to(index.device)[index]


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """token_ops.gather_tokens, with x broadcast to index's batch first (constant token tables).

    The expand is unconditional: a Python test on the batch size would make torch.export guard it.
    """
    x = x.expand(index.shape[0], *x.shape[1:])
    return token_ops.gather_tokens(x, index, dim)


def align_constant(x: torch.Tensor, out_rank: int) -> torch.Tensor:
    """Right-align a broadcast operand to `out_rank` dims (what broadcasting does implicitly)."""
    while x.dim() < out_rank:
        x = x.unsqueeze(0)
    return x


def slot_of_position(positions: torch.Tensor, position: int) -> torch.Tensor:
    """(B,) slot at which each sample holds original `position` (always kept: it is protected)."""
    return (positions == position).to(torch.int64).argmax(dim=1)


def read_slot(x: torch.Tensor, slot: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-sample x.select(dim, slot[b])."""
    return gather_tokens(x, slot.unsqueeze(1), dim).squeeze(dim)


def path_gaps(ranks: torch.Tensor) -> torch.Tensor:
    """Steps along the path between consecutive kept tokens (first token: steps from the start)."""
    first = ranks[:, :1] + 1
    return torch.cat([first, ranks[:, 1:] - ranks[:, :-1]], dim=1).to(torch.float32)


def gather_grid(x: torch.Tensor, index: torch.Tensor, hdim: int, wdim: int) -> torch.Tensor:
    """The cells `index` (B, K), cell = i * W + j, of the grid in dims (hdim, wdim) -> K along hdim, 1 along wdim.

    A pruned grid keeps the rank of the dense one: its kept cells stand in a K x 1 column, so every
    per-token op on it (a 1x1 conv, a channel LayerNorm, a permute, a mean over both grid dims) runs
    unchanged.
    """
    x = x.expand(index.shape[0], *x.shape[1:])
    moved = x.movedim((hdim, wdim), (-2, -1))
    flat = moved.reshape(*moved.shape[:-2], moved.shape[-2] * moved.shape[-1])
    out = token_ops.gather_tokens(flat, index, flat.dim() - 1).unsqueeze(-1)
    return out.movedim((-2, -1), (hdim, wdim))


def scatter_grid(x: torch.Tensor, index: torch.Tensor, height: int, width: int, hdim: int, wdim: int) -> torch.Tensor:
    """Inverse of ``gather_grid``: a zero (height, width) grid with the K kept cells put back at `index`."""
    moved = x.movedim((hdim, wdim), (-2, -1))
    flat = moved.reshape(*moved.shape[:-2], moved.shape[-2] * moved.shape[-1])
    dense = token_ops.scatter_tokens(flat, index, height * width, flat.dim() - 1)
    return dense.reshape(*dense.shape[:-1], height, width).movedim((-2, -1), (hdim, wdim))


def put_grid(base: torch.Tensor, x: torch.Tensor, index: torch.Tensor, hdim: int, wdim: int) -> torch.Tensor:
    """The dense grid `base` with the K cells of the pruned grid `x` (a K x 1 column) written at `index` (B, K)."""
    base = base.expand(index.shape[0], *base.shape[1:])
    moved = base.movedim((hdim, wdim), (-2, -1))
    flat = moved.reshape(*moved.shape[:-2], moved.shape[-2] * moved.shape[-1])
    cells = x.movedim((hdim, wdim), (-2, -1)).squeeze(-1)
    out = token_ops.put_tokens(flat, cells, index, flat.dim() - 1)
    return out.reshape(moved.shape).movedim((-2, -1), (hdim, wdim))


def expand_grid(x: torch.Tensor, hdim: int, wdim: int, height: int, width: int) -> torch.Tensor:
    """Broadcast a constant's size-1 grid dims to the full (height, width) grid."""
    sizes = [-1] * x.dim()
    sizes[hdim], sizes[wdim] = height, width
    return x.expand(*sizes)


def nearest_kept(index: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(B, L): for every dense slot, the pruned slot (0..K-1) that holds the nearest kept token.

    index: (B, K) dense slots of the kept tokens; coords: (L, c) float coordinates of the dense slots
    (a sequence position, or a grid cell's row and column). Squared distances are computed exactly
    (integer coordinates), so a kept slot is its own nearest; ties go to the kept token of the lower dense
    slot, whatever order the pruned slots hold them in (`none-unsorted` keeps them in score order).
    """
    coords = coords.to(device=index.device)
    order = index.argsort(dim=1)                                      # pruned slots by dense slot
    kept = coords[index.gather(1, order)]                             # (B, K, c)
    distance = ((coords.unsqueeze(0).unsqueeze(2) - kept.unsqueeze(1)) ** 2).sum(-1)   # (B, L, K)
    return order.gather(1, distance.argmin(dim=-1))


def nearest_tokens(x: torch.Tensor, index: torch.Tensor, coords: torch.Tensor, dim: int) -> torch.Tensor:
    """x's K slots along `dim` back at full length L: each dense slot takes the nearest kept token's value."""
    return token_ops.gather_tokens(x, nearest_kept(index, coords), dim)


def nearest_grid(x: torch.Tensor, index: torch.Tensor, coords: torch.Tensor, height: int, width: int,
                 hdim: int, wdim: int) -> torch.Tensor:
    """A pruned grid (K x 1 column, see ``gather_grid``) back at (height, width), each cell holding the value of
    the nearest kept cell."""
    cells = x.movedim((hdim, wdim), (-2, -1)).squeeze(-1)
    dense = token_ops.gather_tokens(cells, nearest_kept(index, coords), cells.dim() - 1)
    return dense.reshape(*dense.shape[:-1], height, width).movedim((-2, -1), (hdim, wdim))
