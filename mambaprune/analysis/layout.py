"""Token layouts: the constant order in which a tensor's token slots visit the original positions.

A dense token tensor in layout `path` holds, in slot i, the token at original position path[i].
Flips, zig-zags and cross-scans only change the layout; after pruning, a tensor in layout `path`
holds the kept tokens sorted by their rank along that path (the original path restricted to the
kept tokens), which is why a flip needs no rewrite while a constant index gather does.
"""
from __future__ import annotations

import functools

import numpy as np


class Layout:
    """An immutable permutation of range(L), compared by value."""

    def __init__(self, path):
        path = np.asarray(path, dtype=np.int64)
        if path.ndim != 1 or not np.array_equal(np.sort(path), np.arange(len(path))):
            raise ValueError("a token layout must be a permutation of range(L)")
        path.setflags(write=False)
        self.path = path
        self._key = (len(path), hash(path.tobytes()))

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def identity(length: int) -> "Layout":
        return Layout(np.arange(length))

    @property
    def length(self) -> int:
        return len(self.path)

    @functools.cached_property
    def rank(self) -> np.ndarray:
        """rank[p] = the slot that holds original position p."""
        rank = np.empty_like(self.path)
        rank[self.path] = np.arange(len(self.path))
        return rank

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.path, np.arange(len(self.path))))

    def reversed(self) -> "Layout":
        return Layout(self.path[::-1].copy())

    def permuted(self, index: np.ndarray) -> "Layout":
        """Layout of `x[..., index]` for x in this layout (index a permutation of the slots)."""
        return Layout(self.path[np.asarray(index, dtype=np.int64)])

    def grid_transposed(self, height: int, width: int) -> "Layout":
        """Layout after reading an H x W grid of this layout column by column."""
        cells = self.path.reshape(height, width)
        return Layout(cells.T.reshape(-1).copy())

    def describe(self) -> str:
        if self.is_identity:
            return "identity"
        if np.array_equal(self.path, np.arange(self.length)[::-1]):
            return "flip"
        return "permutation"

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self._key == other._key and np.array_equal(self.path, other.path)

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Layout({self.describe()}, L={self.length})"
