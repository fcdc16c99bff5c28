"""Token facts: what the analysis knows about the token axis of a node's output.

Every node of the captured graph gets one fact (`node.meta[meta_keys.TOKENS]`), or None when its
output carries no tokens. Facts are immutable values; the transforms a rule needs (broadcast
shift, permutation, dropping a dim, taking parts of folded directions) are their methods, each of
which raises `NotUnderstood` when the transform cannot be followed for that kind of fact.

- `Tok(dim, layout)`: output dim `dim` is the token axis, slots in `layout` order (layout.py).
- `BatchTok(dim, layout)`: batch and tokens flattened into one dim, batch-major.
- `PaddedTok(dim, layout, padding, conv)`: a conv1d output along the tokens, before the slice
  back to L tokens (`conv` is the conv node's name).
- `Grid(hdim, wdim, layout, height, width)`: the tokens as an H x W grid; cell (i, j) = slot i*W + j.
- `MultiTok(dim, gdim, layouts)`: directions folded into one tensor: along `gdim` equal parts,
  part g in layouts[g] (VMamba's cross-scan). Built through `multi()`.
- `MultiGrid(hdim, wdim, gdim, layouts, height, width)`: folded directions whose token axis is
  viewed as an H x W grid (VMamba's `ys.view(B, K, -1, H, W)` before its cross-merge); only
  views back to a token axis (and pointwise ops) are understood on it.
- `TokenMap(positions, parts, length, origin)`: data movement left the tokens spread over several axes,
  or a subset of them beside slots that hold none (a token axis viewed as windows, a class token
  cut out); only data movement is followed on it (tokens/movement.py), until a token axis comes
  out again.
- `Unknown(reason)`: something happens to the tokens that the compiler cannot rewrite.
- `Readout(kind, position)`: the tokens end here (a pooling, or a read of one token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..meta_keys import TOKENS
from .layout import Layout
from .ops import is_static


class NotUnderstood(Exception):
    """Raised on purpose by a token rule: the op does something to the tokens we cannot rewrite."""


@dataclass(frozen=True)
class _OneAxis:
    """A fact with one token dim (`dim`) whose slots are in `layout` order."""

    dim: int
    layout: Layout

    @property
    def token_dims(self) -> tuple:
        return (self.dim,)

    def shifted(self, by: int):
        return type(self)(self.dim + by, self.layout)

    def permuted(self, where: dict):
        return type(self)(where[self.dim], self.layout)

    def without_dim(self, dim: int):
        return type(self)(self.dim - (dim < self.dim), self.layout)


@dataclass(frozen=True)
class Tok(_OneAxis):
    def flipped(self, dims: list) -> "Tok":
        return Tok(self.dim, self.layout.reversed()) if self.dim in dims else self


@dataclass(frozen=True)
class BatchTok(_OneAxis):
    def flipped(self, dims: list) -> "BatchTok":
        if self.dim in dims:
            raise NotUnderstood("flip of the token axis of a BatchTok")
        return self


@dataclass(frozen=True)
class PaddedTok:
    dim: int
    layout: Layout
    padding: int
    conv: str

    @property
    def token_dims(self) -> tuple:
        return (self.dim,)

    def shifted(self, by: int):
        raise NotUnderstood("broadcast of PaddedTok")

    def permuted(self, where: dict):
        raise NotUnderstood("permute of a padded conv1d output")

    def without_dim(self, dim: int) -> "PaddedTok":
        return self

    def flipped(self, dims: list) -> "PaddedTok":
        if self.dim in dims:
            raise NotUnderstood("flip of the token axis of a PaddedTok")
        return self


@dataclass(frozen=True)
class Grid:
    hdim: int
    wdim: int
    layout: Layout
    height: int
    width: int

    @property
    def token_dims(self) -> tuple:
        return (self.hdim, self.wdim)

    def shifted(self, by: int) -> "Grid":
        return Grid(self.hdim + by, self.wdim + by, self.layout, self.height, self.width)

    def permuted(self, where: dict) -> "Grid":
        return Grid(where[self.hdim], where[self.wdim], self.layout, self.height, self.width)

    def without_dim(self, dim: int) -> "Grid":
        return Grid(self.hdim - (dim < self.hdim), self.wdim - (dim < self.wdim), self.layout,
                    self.height, self.width)

    def flipped(self, dims: list) -> "Grid":
        if self.hdim in dims or self.wdim in dims:
            raise NotUnderstood("flip of the token grid")
        return self


@dataclass(frozen=True)
class MultiTok:
    dim: int
    gdim: int
    layouts: tuple

    @property
    def token_dims(self) -> tuple:
        return (self.dim,)

    def shifted(self, by: int) -> "MultiTok":
        return MultiTok(self.dim + by, self.gdim + by, self.layouts)

    def permuted(self, where: dict) -> "MultiTok":
        return MultiTok(where[self.dim], where[self.gdim], self.layouts)

    def without_dim(self, dim: int) -> "MultiTok":
        if dim == self.gdim:
            raise NotUnderstood("drops the axis that holds directions folded into one tensor")
        return MultiTok(self.dim - (dim < self.dim), self.gdim - (dim < self.gdim), self.layouts)

    def flipped(self, dims: list):
        layouts = self.layouts[::-1] if self.gdim in dims else self.layouts
        if self.dim in dims:
            layouts = tuple(layout.reversed() for layout in layouts)
        return multi(self.dim, self.gdim, layouts)

    def part_size(self, size) -> int:
        """Slots of the direction axis (of `size` slots) per part."""
        if not is_static(size) or size % len(self.layouts):
            raise NotUnderstood("directions folded into one tensor along an axis that does not split into equal parts")
        return size // len(self.layouts)

    def part_span(self, start: int, end: int, size) -> range:
        """The parts that slots [start, end) of the direction axis hold: whole parts only."""
        part = self.part_size(size)
        if start % part or end % part:
            raise NotUnderstood("a slice that cuts through a direction of directions folded into one tensor")
        return range(start // part, end // part)

    def parts(self, start: int, end: int, size) -> "Fact":
        """Slots [start, end) of the direction axis."""
        span = self.part_span(start, end, size)
        return multi(self.dim, self.gdim, self.layouts[span.start:span.stop])

    def part_at(self, index, size) -> int:
        """The part that slot `index` of the direction axis belongs to."""
        if not is_static(index):
            raise NotUnderstood("select of a symbolic direction")
        index = index + size if index < 0 else index
        return index // self.part_size(size)

    def selected(self, dim: int, index, size) -> "Fact":
        """x.select(dim, index)."""
        if dim == self.dim:
            raise NotUnderstood("select of a token of directions folded into one tensor")
        if dim != self.gdim:
            return self.without_dim(dim)
        return Tok(self.dim - (dim < self.dim), self.layouts[self.part_at(index, size)])


@dataclass(frozen=True)
class MultiGrid:
    hdim: int
    wdim: int
    gdim: int
    layouts: tuple
    height: int
    width: int

    @property
    def token_dims(self) -> tuple:
        return (self.hdim, self.wdim)

    def shifted(self, by: int) -> "MultiGrid":
        return MultiGrid(self.hdim + by, self.wdim + by, self.gdim + by, self.layouts, self.height, self.width)

    def permuted(self, where: dict):
        raise NotUnderstood("permute of directions folded into one tensor viewed as a grid")

    def without_dim(self, dim: int) -> "MultiGrid":
        if dim in (self.gdim, self.hdim, self.wdim):
            raise NotUnderstood("drops an axis of directions folded into one tensor viewed as a grid")
        less = lambda d: d - (dim < d)                                                    # noqa: E731
        return MultiGrid(less(self.hdim), less(self.wdim), less(self.gdim), self.layouts, self.height, self.width)

    def flipped(self, dims: list):
        raise NotUnderstood("flip of directions folded into one tensor viewed as a grid")


def multi(dim: int, gdim: int, layouts) -> Union[Tok, MultiTok]:
    """A tensor whose parts are all in one layout is simply in that layout."""
    layouts = tuple(layouts)
    if all(layout == layouts[0] for layout in layouts):
        return Tok(dim, layouts[0])
    return MultiTok(dim, gdim, layouts)


@dataclass(frozen=True, eq=False)
class TokenMap:
    """`positions` (int64, the evaluated shape of the node: hint sizes for symbolic dims) holds, for
    every element, the original position of the token it carries, -1 for none; `parts`, which input
    tensor (and direction of it) it came from. Compared by identity."""

    positions: object
    parts: object
    length: int
    origin: str        # the op that made it, for a refusal ("aten::view (B, 16, 8) -> (B, 2, 2, 2, 2, 8)")

    @property
    def token_dims(self) -> tuple:
        return tuple(d for d in range(self.positions.ndim) if varies(self.positions, d))

    @property
    def rearranges(self) -> bool:
        """Whether it holds every token of each part equally often and nothing else (windows, directions
        stacked on a new axis), rather than a subset of them (a class token cut out) or empty slots."""
        positions, parts = np.asarray(self.positions).ravel(), np.asarray(self.parts).ravel()
        if positions.size == 0 or (positions < 0).any():
            return False
        for part in np.unique(parts):
            counts = np.bincount(positions[parts == part], minlength=self.length)
            if len(counts) != self.length or not (counts == counts[0]).all() or counts[0] == 0:
                return False
        return True

    @property
    def refusal(self) -> str:
        return (f"{self.origin} leaves the tokens spread over several axes or mixed with slots that hold no "
                "token; only data movement that brings back one token axis (or grid) of all the tokens is followed")


def varies(values, dim: int) -> bool:
    """Whether an array's values change along `dim`."""
    if values.shape[dim] < 2:
        return False
    first = values.take([0], axis=dim)
    return bool((values != first).any())


@dataclass(frozen=True)
class Unknown:
    reason: str


@dataclass(frozen=True)
class Readout:
    kind: str                       # "select" or "pool"
    position: Optional[int] = None  # original position read, for "select"

    def permuted(self, where: dict):
        raise NotUnderstood("permute of a token readout")


TokenFact = Union[Tok, BatchTok, PaddedTok, Grid, MultiTok, MultiGrid, TokenMap]
Fact = Union[Tok, BatchTok, PaddedTok, Grid, MultiTok, MultiGrid, TokenMap, Unknown, Readout, tuple, None]
TOKEN_FACTS = (Tok, BatchTok, PaddedTok, Grid, MultiTok, MultiGrid, TokenMap)


def is_token_fact(fact) -> bool:
    return isinstance(fact, TOKEN_FACTS)


def fact_of(node) -> Fact:
    """The token fact the analysis recorded for `node` (None for non-nodes)."""
    return node.meta.get(TOKENS) if hasattr(node, "meta") else None


def token_dims(fact) -> tuple:
    """The dims that carry tokens (none for a non-token fact)."""
    return fact.token_dims if is_token_fact(fact) else ()
