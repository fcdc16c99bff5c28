"""Token merging at a pruning site: the pruned tokens' stream values averaged into kept tokens.

Vocabulary (token_index.py): at a site the previous tokens (P slots per sample, identity slot order)
are split into the K kept slots `sel` (B, K) and the P - K pruned slots `pruned` (B, P - K). Each
pruned slot has a `target` (B, P - K): the kept slot (0..K-1, in `sel`'s order) it is merged into.
Every token has a size (how many original tokens it stands for; 1 before the first site). The merged
value of kept slot k is the size-weighted mean (ToMe's proportional averaging)

    out[k] = (s[sel[k]] * x[sel[k]] + sum_{j: target[j] = k} s[pruned[j]] * x[pruned[j]]) / size[k],
    size[k] = s[sel[k]] + sum_{j: target[j] = k} s[pruned[j]].

Everything is plain torch (gather, scatter_add, bmm, argmin / argmax) on static shapes: it exports
(torch.export, ONNX) and compiles like the gathers it replaces, with no loop over tokens. FLOPs: the
similarity of `similar_targets` is a bmm, counted by FlopCounterMode (B * (P - K) * K * C MACs); the
weighted average is pointwise and, like norms and activations, not counted (DESIGN.md convention).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import token_ops


def pruned_slots(sel: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length - K) slots of 0..length-1 not in `sel` (B, K), increasing."""
    dropped = torch.ones(sel.shape[0], length, dtype=torch.int64, device=sel.device).scatter(1, sel, 0)
    order = torch.argsort(dropped, dim=1, descending=True, stable=True)
    return order[:, : length - sel.shape[1]]


def kept_is_protected(positions: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: which kept tokens (original `positions`) are protected (class tokens, read-outs)."""
    if not protected.numel():
        return torch.zeros_like(positions, dtype=torch.bool)
    return (positions.unsqueeze(-1) == protected.to(positions.device)).any(-1)


def nearest_targets(prev_idx: torch.Tensor, sel: torch.Tensor, pruned: torch.Tensor, coords: torch.Tensor,
                    protected: torch.Tensor) -> torch.Tensor:
    """(B, P - K) kept slot nearest each pruned token in the original coordinates.

    prev_idx: (B, P) original positions of the previous tokens; coords: (L, c) float coordinates of
    every original position (the position itself on a sequence, (row, column) on a grid). Protected
    kept tokens are no target; ties go to the lower kept slot.
    """
    coords = coords.to(prev_idx.device)
    kept_pos, pruned_pos = prev_idx.gather(1, sel), prev_idx.gather(1, pruned)
    distance = ((coords[pruned_pos].unsqueeze(2) - coords[kept_pos].unsqueeze(1)) ** 2).sum(-1)  # (B, P-K, K)
    barred = kept_is_protected(kept_pos, protected).unsqueeze(1)
    return torch.where(barred, torch.full_like(distance, float("inf")), distance).argmin(dim=-1)


def similar_targets(stream: torch.Tensor, token_dim: int, prev_idx: torch.Tensor, sel: torch.Tensor,
                    pruned: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """(B, P - K) kept slot most similar (cosine of the stream values) to each pruned token (ToMe's
    matching, over all kept tokens). `stream`: the tensor crossing the site, P slots along `token_dim`
    in identity slot order. Protected kept tokens are no target; ties go to the lower kept slot."""
    flat = stream.movedim(token_dim, 1).float()
    flat = flat.reshape(flat.shape[0], flat.shape[1], -1)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    kept = token_ops.gather_tokens(flat, sel, 1)
    loose = token_ops.gather_tokens(flat, pruned, 1)
    similarity = torch.bmm(loose, kept.transpose(1, 2))                         # (B, P-K, K)
    barred = kept_is_protected(prev_idx.gather(1, sel), protected).unsqueeze(1)
    return torch.where(barred, torch.full_like(similarity, -float("inf")), similarity).argmax(dim=-1)


def grid_stream(x: torch.Tensor, hdim: int, wdim: int) -> torch.Tensor:
    """A dense (.., H, .., W, ..) grid with its cells flattened to the last axis (row-major)."""
    moved = x.movedim((hdim, wdim), (-2, -1))
    return moved.reshape(*moved.shape[:-2], moved.shape[-2] * moved.shape[-1])


def merged_sizes(size: Optional[torch.Tensor], sel: torch.Tensor, pruned: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    """(B, K) float32 sizes of the kept tokens after the merge; `size` (B, P) before it (None: all 1)."""
    if size is None:
        size = torch.ones(sel.shape[0], sel.shape[1] + pruned.shape[1], device=sel.device)
    return size.gather(1, sel).scatter_add(1, target, size.gather(1, pruned))


def merge_tokens(x: torch.Tensor, sel: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor,
                 size: Optional[torch.Tensor], merged_size: torch.Tensor, dim: int) -> torch.Tensor:
    """x (P slots along `dim`, identity slot order) reduced to the K kept slots, each the size-weighted
    mean of itself and the pruned tokens merged into it (module docstring). `size`: (B, P) sizes before
    the merge (None: all 1); `merged_size`: `merged_sizes(size, sel, pruned, target)`."""
    axis = dim % x.dim()
    kept, loose = token_ops.gather_tokens(x, sel, axis), token_ops.gather_tokens(x, pruned, axis)
    if size is not None:
        kept = kept * _along(size.gather(1, sel), x, axis)
        loose = loose * _along(size.gather(1, pruned), x, axis)
    total = kept.scatter_add(axis, token_ops._expand_index(target, loose.shape, axis), loose)
    return total / _along(merged_size, x, axis)


def merge_grid(x: torch.Tensor, sel: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor,
               size: Optional[torch.Tensor], merged_size: torch.Tensor, hdim: int, wdim: int) -> torch.Tensor:
    """``merge_tokens`` of a dense grid's cells (row-major) -> the K x 1 column of a pruned grid
    (token_index.gather_grid's form)."""
    x = x.expand(sel.shape[0], *x.shape[1:])
    flat = grid_stream(x, hdim, wdim)
    out = merge_tokens(flat, sel, pruned, target, size, merged_size, flat.dim() - 1).unsqueeze(-1)
    return out.movedim((-2, -1), (hdim, wdim))


def merge_assignment(sel: torch.Tensor, pruned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, P): the kept slot every previous token ends in (a kept one: its own slot)."""
    own = torch.arange(sel.shape[1], device=sel.device).unsqueeze(0).expand_as(sel)
    length = sel.shape[1] + pruned.shape[1]
    return torch.zeros(sel.shape[0], length, dtype=torch.int64, device=sel.device).scatter(
        1, sel, own).scatter(1, pruned, target)


def _along(weights: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, K) weights shaped to broadcast over `like` with K along `axis`, in like's dtype."""
    view = [1] * like.dim()
    view[0], view[axis] = weights.shape[0], weights.shape[1]
    return weights.reshape(view).to(like.dtype)


def unmerge_grid(x: torch.Tensor, owner: torch.Tensor, height: int, width: int, hdim: int, wdim: int) -> torch.Tensor:
    """A pruned grid (K x 1 column) back at (height, width), each cell holding the value of the kept cell
    `owner` (B, height * width) names (ToMe's unmerge)."""
    cells = x.movedim((hdim, wdim), (-2, -1)).squeeze(-1)
    dense = token_ops.gather_tokens(cells, owner, cells.dim() - 1)
    return dense.reshape(*dense.shape[:-1], height, width).movedim((-2, -1), (hdim, wdim))
