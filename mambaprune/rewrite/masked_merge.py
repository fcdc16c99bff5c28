"""The merges of the masked formulation (reduction="merge-nearest" / "merge-similar", masked_hold.py).

Under a merge a site does not drop what it prunes: each pruned token's stream value is averaged into a
kept token, weighted by size (ToMe's proportional averaging, README "reduction"). Said on the dense values
of the masked run, without the rewrite's index tables: at site k, with P the tokens present before it (all
of them, or those the previous site of the stage kept), K those it keeps (in the order the pruned graph
holds them) and s the tokens' sizes (1 before a stage's first site),

- every pruned token p has a target t(p) among the kept tokens that are not protected (class tokens,
  read-out positions): the nearest in the original coordinates (cell distance where the positions are a
  grid's cells, position distance on a sequence) for merge-nearest; the most similar by cosine of the
  stream crossing the site (the sum of its parts, in float32) for merge-similar; ties to the first kept;
- every part X of the stream crossing the site is read, at each kept token t, as
  (s_t X_t + sum_{p: t(p) = t} s_p X_p) / (s_t + sum_{p: t(p) = t} s_p), and that sum is t's new size.

Brute force per sample; the values are in original positions (MaskedCompacted moves them afterwards).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.fx as fx

from ..analysis import GraphAnalysis, Grid, Tok, fact_of
from ..settings import Reduction
from .masks import keep_mask, tokens_back, tokens_first


class MaskedMerges:
    """`kept`: {site: (B, K) original positions kept, in slot order}; `value_of(node)`: a node's value in the
    masked run, in original positions."""

    def __init__(self, analysis: GraphAnalysis, kept: dict, reduction: Reduction, value_of: Callable):
        self.analysis, self.kept, self.reduction, self.value_of = analysis, kept, reduction, value_of
        self._owners: dict = {}     # site -> ((B, L) target position of every token, (B, L) its weight)
        self._sizes: dict = {}      # site -> (B, L) float32 sizes after it
        self._merged: dict = {}     # (site, node) -> the merged value

    def parts(self, key: int) -> list:
        """The parts of the stream crossing site `key` that the merge averages."""
        parts = self.analysis.stream_parts(key) if key in self.analysis.sites else []
        return [p for p in parts if isinstance(fact_of(p), (Tok, Grid)) and fact_of(p).layout.is_identity]

    def merged(self, key: int, node: fx.Node) -> Optional[torch.Tensor]:
        """`node`'s value (a part of the stream crossing site `key`) merged as the site merges it; None where
        the site's kept positions are unknown."""
        if key not in self.kept:
            return None
        if (key, node) not in self._merged:
            owner, weight = self._owner(key)
            size = self._sizes[key]
            self._merged[(key, node)] = _average(self.value_of(node), fact_of(node), owner, weight, size,
                                                 keep_mask(self.kept[key], owner.shape[1]))
        return self._merged[(key, node)]

    def unmerged(self, keys: list, fact, value: torch.Tensor) -> torch.Tensor:
        """ToMe's unmerge of `value` (fact `fact`, original positions, fed by the last of the sites `keys`: one
        stage's, in order): every token holds the value of the kept token it ended in, following its targets
        through those sites (its own value when kept)."""
        final = None
        for site in keys:
            owner = self._owner(site)[0]
            final = owner if final is None else owner.gather(1, final)
        return _take(value, fact, final)

    # -- targets and sizes --------------------------------------------------------------------------------
    def _previous(self, key: int) -> Optional[int]:
        earlier = [k for k in self.kept if k < key and self.analysis.same_stage(k, key)]
        return max(earlier) if earlier else None

    def _owner(self, key: int) -> tuple:
        if key in self._owners:
            return self._owners[key]
        kept, length = self.kept[key], self.analysis.site_length(key)
        previous = self._previous(key)
        size = self._sizes_after(previous, kept.shape[0], length, kept.device)
        present = keep_mask(self.kept[previous], length) if previous is not None else torch.ones_like(size, dtype=torch.bool)
        owner = torch.arange(length, device=kept.device).expand(kept.shape[0], -1).clone()
        coords = self._coordinates(key)
        stream = self._stream(key)
        protected = [p for p in self.analysis.protected if p < length]
        for b in range(kept.shape[0]):
            held = kept[b]
            loose = (present[b] & ~keep_mask(held[None], length)[0]).nonzero().flatten()
            if not len(loose):
                continue
            if self.reduction is Reduction.MERGE_NEAREST:
                score = -((coords[loose][:, None, :] - coords[held][None]) ** 2).sum(-1)
            else:
                score = stream[b][loose] @ stream[b][held].T
            barred = torch.tensor([int(p) in protected for p in held], device=score.device)
            score = torch.where(barred[None], torch.full_like(score, -float("inf")), score)
            owner[b, loose] = held[score.argmax(dim=1)]
        weight = torch.where(present, size, torch.zeros_like(size))
        self._sizes[key] = torch.zeros_like(size).scatter_add(1, owner, weight)
        self._owners[key] = (owner, weight)
        return self._owners[key]

    def _sizes_after(self, key: Optional[int], batch: int, length: int, device) -> torch.Tensor:
        if key is None:
            return torch.ones(batch, length, device=device)
        self._owner(key)
        kept = keep_mask(self.kept[key], length)
        return torch.where(kept, self._sizes[key], torch.ones_like(self._sizes[key]))

    def _coordinates(self, key: int) -> torch.Tensor:
        """(L, c) float32: (row, column) where the stream's positions are the cells of a grid (its own, or the
        one a mixer sees the sequence as), else the position."""
        parts, length = self.parts(key), self.analysis.site_length(key)
        fact = fact_of(parts[0]) if parts else None
        widths = {fact.width} if isinstance(fact, Grid) else {
            f.width for f in map(fact_of, self.analysis.gm.graph.nodes)
            if isinstance(f, Grid) and f.layout.length == length and f.layout.is_identity}
        positions = np.arange(length)
        if len(widths) == 1:
            width = widths.pop()
            return torch.from_numpy(np.stack([positions // width, positions % width], 1).astype(np.float32))
        return torch.from_numpy(positions.astype(np.float32))[:, None]

    def _stream(self, key: int) -> Optional[torch.Tensor]:
        """(B, L, R) float32 unit vectors: the stream crossing the site, per token (merge-similar only)."""
        if self.reduction is not Reduction.MERGE_SIMILAR:
            return None
        parts = self.parts(key)
        total = sum(_per_token(self.value_of(p).float(), fact_of(p)) for p in parts)
        return total / total.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _per_token(x: torch.Tensor, fact) -> torch.Tensor:
    """(B, L, R): x with its token axis (or grid) second and everything else flattened last."""
    tokens = tokens_first(x, fact)
    return tokens.reshape(tokens.shape[0], tokens.shape[1], -1)


def _average(x: torch.Tensor, fact, owner: torch.Tensor, weight: torch.Tensor, size: torch.Tensor,
             kept: torch.Tensor) -> torch.Tensor:
    """x with every kept token the size-weighted mean of itself and the tokens whose owner it is."""
    tokens = _per_token(x, fact)
    w = weight.to(tokens.dtype)[..., None]
    total = torch.zeros_like(tokens).scatter_add(1, owner[..., None].expand_as(tokens), tokens * w)
    mean = total / size.clamp_min(1e-12).to(tokens.dtype)[..., None]
    tokens = torch.where(kept[..., None], mean, tokens)
    return tokens_back(tokens, fact, tuple(x.shape))


def _take(x: torch.Tensor, fact, source: torch.Tensor) -> torch.Tensor:
    """x with the token at original position p replaced by the one at `source`[:, p] (B, L)."""
    path = torch.from_numpy(fact.layout.path.copy()).to(source.device)
    rank = torch.from_numpy(fact.layout.rank.copy()).to(source.device)
    slots = rank[source[:, path]]                     # (B, L): slot of the value each slot takes
    tokens = tokens_first(x, fact)
    index = slots.reshape(*slots.shape, *([1] * (tokens.dim() - 2))).expand_as(tokens)
    return tokens_back(tokens.gather(1, index), fact, tuple(x.shape))
