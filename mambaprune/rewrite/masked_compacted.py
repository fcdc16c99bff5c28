"""A second formulation of the `none` alignments: `hold` on the compacted sequence.

Under `none` (and `none-unsorted`) the K tokens kept at a site claim the positions 0..K-1 (DESIGN.md:
"kept tokens are treated as a contiguous sequence of length K"; rewrite/select.py's `vpos`): every
token mixer after the site sees a sequence whose first K positions hold the kept tokens, in the order
the pruned graph keeps them, and nothing after them. Said on the dense graph, without any gather, index
table or rewrite rule: downstream of site k the run is in site k's *compacted coordinates*, where
position j holds the token the site keeps in slot j (j < K) and the positions from K on hold the
pruned ones, masked exactly as MaskedHold masks them (their scan steps pass the state, convs see zeros
there, pools read the first K). A flip, a zig-zag or a cross-scan is then the layout's path restricted
to the first K positions, a conv1d window reaches the previous kept tokens, a conv2d sees the kept
tokens in the first K cells of the grid: the definitions of `none`, not a re-statement of its rules.

A value crosses from one coordinate system into another where a node of one reads a node of another
(a stream crossing a site, a read-out of one token, a map restored for a decoder, the grid restored
before a downsampling, a graph output): its token axis is permuted by the two sites' kept positions,
per sample. Values that do not depend on the inputs (a positional table) are not moved: they are read
where the kept tokens claim to be, as the pruned graph reads them. Reads of one constant position
(a class token), everything that restores tokens to full length, and a stream cut around a class token
(`cut_region`: the slices, the cat that puts the class token back, the cat of the slices a mixer reads)
run in original coordinates, as the pruned graph runs them.

Where this does not define a value (a token axis this module cannot permute, a mixer or pooling inside a
cut of the token axis) the node is `untrusted` with the reason, as in MaskedHold.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..analysis import GraphAnalysis, Grid, Readout, Tok, fact_of
from ..analysis.facts import BatchTok, MultiGrid, MultiTok, PaddedTok, TokenMap, is_token_fact
from ..analysis.tokens.movement import is_movement
from ..settings import Alignment, Fill, Reduction
from .masked_hold import MaskedHold, descendants, masks_tokens
from .masks import keep_mask, path_of, tokens_back, tokens_first

# token facts that hold the whole token axis as one permutation: meaningful in compacted coordinates (and a
# TokenMap that `rearranges` them: windows, directions stacked on a new axis)
_WHOLE_AXIS = (Tok, Grid, MultiTok, MultiGrid, PaddedTok, BatchTok)


def compacting_order(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length): compacted position j holds original position order[b, j]: the kept `positions` (B, K)
    in slot order, then the pruned ones in ascending order."""
    kept = keep_mask(positions, length).to(torch.int8)
    rest = torch.argsort(kept, dim=1, stable=True)[:, :length - positions.shape[1]]
    return torch.cat([positions, rest], dim=1)


def slot_moves(layout, source: Optional[torch.Tensor], target: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """(B, L) source slot of every target slot of a tensor laid out in `layout`, moved from coordinates
    `source` into `target` (orders as compacting_order gives them; None: original coordinates)."""
    path = path_of(layout)
    length = len(path)
    identity = torch.arange(length).expand(batch, length).contiguous()
    source = identity if source is None else source
    target = identity if target is None else target
    held = torch.gather(target, 1, path.expand(batch, length))           # original token of each target slot
    where = torch.empty_like(source).scatter_(1, source, identity)        # its position in source coordinates
    return torch.from_numpy(layout.rank.copy())[torch.gather(where, 1, held)]


def moved(fact, value: torch.Tensor, source, target) -> Optional[torch.Tensor]:
    """`value` (with token fact `fact`) with its tokens moved from coordinates `source` to `target`; None
    where the fact is not one token axis or grid of the coordinates' length."""
    batch = value.shape[0]
    length = (source if source is not None else target).shape[1]
    one_axis = isinstance(fact, Tok) and value.shape[fact.dim] == length
    grid = isinstance(fact, Grid) and fact.hdim < fact.wdim and (
        value.shape[fact.hdim], value.shape[fact.wdim]) == (fact.height, fact.width)
    if not (one_axis or grid) or fact.layout.length != length:
        return None
    tokens = tokens_first(value, fact)
    index = slot_moves(fact.layout, source, target, batch).to(value.device)
    index = index.reshape(batch, length, *[1] * (tokens.dim() - 2)).expand_as(tokens)
    return tokens_back(torch.gather(tokens, 1, index), fact, tuple(value.shape))


def is_cut(fact) -> bool:
    """A token map that cuts the token axis (a class token sliced out and put back), not one that only
    rearranges every token."""
    return isinstance(fact, TokenMap) and not fact.rearranges


def cut_region(nodes) -> set:
    """The nodes whose token facts cut the token axis, the moves that make one token axis of them again (the
    cat of the slices around a class token) and what reads constant positions of them (the class token's
    slice): they run in original coordinates, as the pruned graph runs them (rewrite/rules/dense_moves.py:
    kept tokens at their own positions), and what a mixer reads from them is moved into its site's compacted
    coordinates like any other value."""
    region = set()
    for node in nodes:
        fact = fact_of(node)
        reads_cut = any(is_cut(fact_of(a)) for a in node.all_input_nodes)
        if is_cut(fact) or (reads_cut and (fact is None or (isinstance(fact, (Tok, Grid)) and is_movement(node)))):
            region.add(node)
    return region


class MaskedCompacted(MaskedHold):
    """Run the dense graph `analysis.gm` in each site's compacted coordinates (module docstring).

    `kept`: {site key: (B, K) the original positions the pruned graph keeps there, in slot order}."""

    def __init__(self, analysis: GraphAnalysis, kept: dict, fill: Fill, fed: dict, reduction: Optional[Reduction] = None):
        lengths = {key: analysis.site_length(key) for key in kept}
        first = {key: (torch.arange(lengths[key], device=kept[key].device) < kept[key].shape[1]).expand(
            kept[key].shape[0], -1) for key in kept}
        merge = (reduction, kept) if reduction is not None and reduction.merges else None
        super().__init__(analysis, first, Alignment.HOLD, fill, fed, merge)
        self.kept_at = {key: keep_mask(kept[key], lengths[key]) for key in kept}
        self.order = {key: compacting_order(kept[key].cpu(), lengths[key]) for key in kept}
        nodes = analysis.gm.graph.nodes
        inputs = [n for n in nodes if n.op == "placeholder"]
        self.from_inputs = set(inputs) | descendants(inputs)
        self.in_original = set().union(*(site.restored for key, site in analysis.sites.items() if key in fed))
        self.in_original |= {n for n in nodes if isinstance(fact_of(n), Readout) and fact_of(n).kind == "select"}
        self.cut_region = cut_region(nodes)
        self.in_original |= self.cut_region
        for reader, restore in self._fill_readers.items():     # up to the downsampling: on the restored grid
            stage = self.stage_ends[restore][1]
            self.in_original |= {reader} | {n for n in descendants([reader]) if self.site_of.get(n) in stage}
        self._problem: Optional[str] = None

    def coordinates(self, n: fx.Node) -> Optional[int]:
        """The site whose compacted coordinates `n` runs in (None: original positions)."""
        return None if n in self.in_original or n.op == "output" else self.site_of.get(n)

    def run_node(self, n: fx.Node):
        self._problem = None
        key, fact = self.coordinates(n), fact_of(n)
        if key is not None and is_token_fact(fact) and not isinstance(fact, _WHOLE_AXIS) and not (
                isinstance(fact, TokenMap) and fact.rearranges):
            self._problem = f"{n.name}: a {type(fact).__name__} that compacted coordinates (alignment none) do not describe"
        elif n in self.cut_region and self.site_of.get(n) is not None and masks_tokens(n):
            self._problem = f"{n.name}: a token mixer or pooling inside a cut of the token axis (alignment none)"
        value = super().run_node(n)
        if self._problem:
            self.untrusted.setdefault(n, self._problem)
        return value

    def read(self, a: fx.Node, n: fx.Node):
        merged = self.merged_read(a, n)
        if merged is not None:
            return self._move(a, merged, None, self.coordinates(n))
        value = super().read(a, n)
        source = None if self._fill_readers.get(n) is a else self.coordinates(a)
        return self._move(a, value, source, self.coordinates(n))

    def original(self, a: fx.Node):
        return self._move(a, self.env[a], self.coordinates(a), None)

    def _move(self, a: fx.Node, value, source: Optional[int], target: Optional[int]):
        if source == target or a not in self.from_inputs or not isinstance(value, torch.Tensor) \
                or not is_token_fact(fact_of(a)):
            return value
        orders = [self.order.get(key) if key is not None else None for key in (source, target)]
        if any(key is not None and key not in self.order for key in (source, target)):
            self._problem = self._problem or f"{a.name}: the positions kept by a site it crosses are unknown"
            return value
        result = moved(fact_of(a), value, *orders)
        if result is None:
            self._problem = self._problem or (f"{a.name}: its token axis ({type(fact_of(a)).__name__}) could not be "
                                              "moved into compacted coordinates")
            return value
        return result
