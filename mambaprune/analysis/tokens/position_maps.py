"""Reading the position arrays of data movement evaluated on position tensors (movement.py): each
element holds the original token position it carries (-1: none). Pure functions of numpy arrays."""
from __future__ import annotations

import numpy as np

from ..facts import Grid, Readout


def along(values: np.ndarray, dims: list) -> np.ndarray:
    """`values` along `dims` (every other dim at index 0)."""
    index = tuple(slice(None) if d in dims else 0 for d in range(values.ndim))
    return values[index]


def is_permutation(values: np.ndarray, length: int) -> bool:
    flat = values.reshape(-1)
    return flat.size == length and bool(np.array_equal(np.sort(flat), np.arange(length)))


def upsampled(cells: np.ndarray, parts: np.ndarray, length: int, facts: list) -> bool:
    """Whether a 2-D result spreads every token of one input grid over an a x b block (a, b > 1) of a grid a
    times higher and b times wider (channels moved into space at once, as a pixel shuffle or einops'
    `b h w (p1 p2 c) -> b (h p1) (w p2) c` does: an upsampling, no token lost or mixed). Every cell comes
    from one tensor. Not an upsampling: EfficientVMamba's interleave of the sub-grids its directions
    scanned, which widens one side at a time."""
    grids = [f for f in facts if f is not None and not isinstance(f, Readout)]
    if len(grids) != 1 or not isinstance(grids[0], Grid) or cells.size <= length or np.unique(parts).size != 1:
        return False
    (height, width), grid = cells.shape, grids[0]
    if height % grid.height or width % grid.width:
        return False
    a, b = height // grid.height, width // grid.width
    if a < 2 or b < 2:
        return False
    blocks = cells[::a, ::b]
    return is_permutation(blocks, length) and bool(np.array_equal(np.repeat(np.repeat(blocks, a, 0), b, 1), cells))
