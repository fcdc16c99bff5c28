"""The masked formulation's attention and pooling (rewrite/masked_attention.py, rewrite/masked_pool.py) against
their definition: the op run on the kept tokens alone, gathered in the order each operand's layout holds them.

For random lengths, token orders (a different one for the queries than for the keys and values), kept sets
(K the same for every sample, as a site keeps them) and the causal flag, the dense op run with the masks
must equal, at every kept query, the op run on the kept tokens; a max or mean pooling likewise.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mambaprune.analysis import Layout, Readout, Tok
from mambaprune.meta_keys import TOKENS
from mambaprune.rewrite.masked_attention import masked_attention
from mambaprune.rewrite.masked_pool import masked_pool

aten = torch.ops.aten


@st.composite
def kept_sets(draw, length):
    """(B=2, L) bool: K of L kept in each sample, K the same for both."""
    count = draw(st.integers(1, length))
    rows = [draw(st.permutations(range(length)))[:count] for _ in range(2)]
    keep = torch.zeros(2, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        keep[b, list(row)] = True
    return keep


def kept_slots(values: torch.Tensor, layout: Layout, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """`values` (B, ..., L at `dim`, ...) restricted to the slots holding kept tokens, in slot order."""
    picked = []
    for b in range(values.shape[0]):
        slots = [s for s in range(layout.length) if keep[b, layout.path[s]]]
        picked.append(values[b].index_select(dim - 1, torch.tensor(slots)))
    return torch.stack(picked)


def node_with(graph: fx.Graph, name: str, fact) -> fx.Node:
    node = graph.placeholder(name)
    node.meta[TOKENS] = fact
    return node


@given(st.data(), st.integers(2, 10), st.booleans())
def test_attention_over_the_kept_tokens(data, length, causal):
    keep = data.draw(kept_sets(length))
    query_order = Layout(data.draw(st.permutations(range(length))))
    key_order = Layout(data.draw(st.permutations(range(length))))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    q, k, v = (torch.randn(2, 2, length, 4, generator=generator) for _ in range(3))
    graph = fx.Graph()
    operands = [node_with(graph, "q", Tok(2, query_order))] + [node_with(graph, n, Tok(2, key_order)) for n in "kv"]
    node = graph.call_function(aten.scaled_dot_product_attention.default, tuple(operands), {"is_causal": causal})
    dense, reason = masked_attention(node, keep, (q, k, v), {"is_causal": causal})
    assert reason is None
    pruned = F.scaled_dot_product_attention(kept_slots(q, query_order, keep, 2), kept_slots(k, key_order, keep, 2),
                                            kept_slots(v, key_order, keep, 2), is_causal=causal)
    torch.testing.assert_close(kept_slots(dense, query_order, keep, 2), pruned, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(dense).all()      # pruned queries too: a later mask must not meet a NaN


@given(st.data(), st.integers(2, 10), st.sampled_from(["max", "amax", "mean", "sum"]))
def test_pooling_over_the_kept_tokens(data, length, pool):
    keep = data.draw(kept_sets(length))
    order = Layout(data.draw(st.permutations(range(length))))
    x = torch.randn(2, length, 3, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16))))
    graph = fx.Graph()
    tokens = node_with(graph, "x", Tok(1, order))
    target = {"max": aten.max.dim, "amax": aten.amax.default, "mean": aten.mean.dim, "sum": aten.sum.dim_IntList}[pool]
    args = (tokens, 1) if pool == "max" else (tokens, [1])
    node = graph.call_function(target, args)
    node.meta[TOKENS] = Readout("pool")
    graph.call_function(operator.getitem, (node, 0))
    dense, reason = masked_pool(node, keep, (x,) + args[1:], {})
    assert reason is None
    kept = kept_slots(x, order, keep, 1)
    expected = target(kept, *args[1:])
    dense, expected = (dense[0], expected[0]) if pool == "max" else (dense, expected)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


def test_kept_slots_reads_the_layout():
    """The helper itself: slot s holds original token path[s]; the kept ones come in slot order."""
    order = Layout(np.array([2, 0, 1]))
    keep = torch.tensor([[True, False, True]] * 2)
    values = torch.arange(3.0).reshape(1, 3).expand(2, 3)      # slot index as value
    assert kept_slots(values, order, keep, 1).tolist() == [[0.0, 1.0]] * 2   # slots 0 (token 2), 1 (token 0)
