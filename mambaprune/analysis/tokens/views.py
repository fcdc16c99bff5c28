"""What the seeds need to know about views and permutes (the rules for them are data movement,
understood by evaluation: movement.py)."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ..ops import argument, norm_dim, op_name

VIEW_OPS = frozenset({"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten",
                      "aten::squeeze", "aten::unsqueeze", "aten::expand", "aten::view_as", "aten::reshape_as",
                      "aten::expand_as"})


def dim_permutation(node: fx.Node, ndim: int) -> list:
    """out dim i is input dim perm[i], for permute / transpose / t / movedim."""
    name = op_name(node)
    if name == "aten::permute":
        return [norm_dim(d, ndim) for d in argument(node, "dims")]
    if name == "aten::t":
        return [1, 0]
    if name == "aten::movedim":
        return [int(p) for p in np.moveaxis(np.arange(ndim), argument(node, "source"), argument(node, "destination"))]
    a, b = norm_dim(argument(node, "dim0"), ndim), norm_dim(argument(node, "dim1"), ndim)
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return perm
