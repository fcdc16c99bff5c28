"""The masks and fills of the masked formulation (masked_hold.py, verify_pruned.py): which cells of a dense
tensor hold kept tokens, and a dense tensor with its pruned cells filled as `settings.fill` defines it."""
from __future__ import annotations

from typing import Optional

import torch

from ..analysis import Grid, Tok
from ..analysis.facts import MultiTok
from ..settings import Fill
from .restore import slot_coordinates


def mask_like(fact, shape: tuple, keep: torch.Tensor) -> Optional[torch.Tensor]:
    """The (broadcastable) bool mask of a tensor of `shape` with token fact `fact`, True where the
    slot holds a kept token; `keep` (B, L) is True at the kept original positions. None when the
    fact is not one the mask can be laid on (or the token count is another stage's)."""
    batch, length = keep.shape
    view = [batch] + [1] * (len(shape) - 1)
    if isinstance(fact, Tok) and fact.layout.length == length and shape[fact.dim] == length:
        view[fact.dim] = length
        return keep[:, path_of(fact.layout)].reshape(view)
    if isinstance(fact, Grid) and fact.layout.length == length and (shape[fact.hdim], shape[fact.wdim]) == (
            fact.height, fact.width) and fact.hdim < fact.wdim:
        view[fact.hdim], view[fact.wdim] = fact.height, fact.width
        return keep[:, path_of(fact.layout)].reshape(view)
    if isinstance(fact, MultiTok) and fact.gdim < fact.dim and all(layout.length == length for layout in fact.layouts) \
            and shape[fact.dim] == length and shape[fact.gdim] % len(fact.layouts) == 0:
        parts = torch.stack([keep[:, path_of(layout)] for layout in fact.layouts], dim=1)   # (B, G, L)
        parts = parts.repeat_interleave(shape[fact.gdim] // len(fact.layouts), dim=1)
        view[fact.gdim], view[fact.dim] = shape[fact.gdim], length
        return parts.reshape(view)
    return None


def keep_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool, True at the kept `positions` (B, K)."""
    mask = torch.zeros(positions.shape[0], length, dtype=torch.bool, device=positions.device)
    return mask.scatter(1, positions, True)


def filled(fact, value: torch.Tensor, keep: torch.Tensor, fill: Fill) -> Optional[torch.Tensor]:
    """`value` (a dense tensor with token fact `fact`) with `fill`'s value at the slots of tokens that
    `keep` (B, L) prunes, by the definition of rewrite/restore.py: "zeros" 0, "nearest" the value of the
    kept slot whose original token is nearest (squared distance of the positions on a sequence, of
    (row, column) on a grid; ties to the first such slot), found here by brute force per sample.
    None where it is not defined on dense values ("carry": the pruned token's own past) or `fact`
    cannot be masked."""
    mask = mask_like(fact, tuple(value.shape), keep)
    if mask is None or fill is Fill.CARRY or not isinstance(fact, (Tok, Grid)):
        return None
    if fill is Fill.ZEROS:
        return torch.where(mask, value, torch.zeros_like(value))
    slots = tokens_first(value, fact)                                                # (B, L, ...) in slot order
    kept_slots = keep[:, path_of(fact.layout)]                                        # (B, L): slot holds a kept token
    coords = slot_coordinates(fact).to(value.device)
    out = torch.empty_like(slots)
    for b in range(slots.shape[0]):
        kept = kept_slots[b].nonzero().flatten()
        distance = ((coords[:, None, :] - coords[kept][None]) ** 2).sum(-1)      # (L, K)
        out[b] = slots[b][kept[distance.argmin(dim=1)]]
    return tokens_back(out, fact, tuple(value.shape))


def tokens_first(x: torch.Tensor, fact) -> torch.Tensor:
    """(B, L, ...): `x` (fact a Tok or a Grid) with its token axis (a grid's cells, flattened) second, in
    slot order, and its other dims after it."""
    dims = _token_dims(fact)
    moved = x.movedim(dims, tuple(range(1, 1 + len(dims))))
    return moved.reshape(x.shape[0], -1, *moved.shape[1 + len(dims):])


def tokens_back(tokens: torch.Tensor, fact, shape: tuple) -> torch.Tensor:
    """The inverse of `tokens_first` for a tensor of `shape` (the dims after the tokens may be flattened)."""
    dims = _token_dims(fact)
    grid = tuple(shape[d] for d in dims)
    others = tuple(size for d, size in enumerate(shape) if d and d not in dims)
    moved = tokens.reshape(shape[0], *grid, *others)
    return moved.movedim(tuple(range(1, 1 + len(dims))), dims)


def _token_dims(fact) -> tuple:
    return (fact.hdim, fact.wdim) if isinstance(fact, Grid) else (fact.dim,)


def path_of(layout) -> torch.Tensor:
    return torch.from_numpy(layout.path.copy())
