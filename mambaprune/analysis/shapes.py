"""Shape arithmetic for view rules: which dims of a reshape's input become which dims of its output."""
from __future__ import annotations

from typing import Optional, Sequence

from .ops import is_static

_PRIMES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049)


def concrete(size) -> int:
    """A symbolic size with its symbols replaced by large distinct primes (to pair view groups)."""
    if is_static(size):
        return size
    expr = size.node.expr
    symbols = sorted(expr.free_symbols, key=str)
    return int(expr.subs({sym: _PRIMES[i % len(_PRIMES)] for i, sym in enumerate(symbols)}))


def view_groups(in_shape: Sequence, out_shape: Sequence) -> Optional[list]:
    """Pair consecutive dims of two shapes with equal products: [(in_dims, out_dims), ...]."""
    a = [concrete(x) for x in in_shape]
    b = [concrete(x) for x in out_shape]
    groups, i, j = [], 0, 0
    n, m = len(a), len(b)
    while i < n or j < m:
        if i < n and a[i] == 1 and not (j < m and b[j] == 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and b[j] == 1 and not (i < n and a[i] == 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            return None
        gi, gj = [i], [j]
        pi, pj = a[i], b[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= n:
                    return None
                pi *= a[i]
                gi.append(i)
                i += 1
            else:
                if j >= m:
                    return None
                pj *= b[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups
