"""The rewrite rules one by one, on hand-built graphs, against direct computations of what each
must produce on the kept tokens.

A harness stands in for the rest of the rewrite: one site that keeps K of L tokens per sample,
whose kept positions `idx` (and claimed positions `vpos`) are graph inputs, and pruned inputs in
a given layout. The old node the rule rewrites is built in a source graph with the facts the
analysis would have recorded. The emitted graph is then run on concrete tensors.
"""
import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from mambaprune import selective_scan
from mambaprune.analysis import Grid, Layout, MultiTok, Readout, Tok
from mambaprune.errors import UnsupportedModelError
from mambaprune.meta_keys import CONV_LEFT, CONV_SLICE, PERMUTATION, TOKENS
from mambaprune.rewrite.context import RewriteContext
from mambaprune.rewrite.gather import cut_to_site
from mambaprune.rewrite.rules import (REWRITE_RULES, CopyNode, DropConvSlice, NeighbourConv2d, PositionConv1d,
                                      RemapReadout, ReorderTokens, RestoreBeforeMoving, ScanGaps)
from mambaprune.rewrite.restore import nearest, scattered
from mambaprune.rewrite.state import SiteNodes
from mambaprune.settings import PruneSettings

aten = torch.ops.aten
B, L, K, D = 2, 16, 6, 4
IDENTITY = Layout.identity(L)


class StubAnalysis:
    def site_length(self, key):
        return L


class Harness:
    """A rewrite at one site (key 1) keeping K tokens, with idx / vpos as inputs."""

    def __init__(self, alignment="hold"):
        self.source = fx.Graph()
        self.rewrite = RewriteContext(fx.GraphModule(torch.nn.Module(), fx.Graph()), StubAnalysis(), [1],
                                      PruneSettings(alignment=alignment))
        graph = self.rewrite.builder.graph
        self.inputs = ["idx"]
        idx = graph.placeholder("idx")
        vpos = idx
        if not self.rewrite.settings.alignment.claims_positions:
            vpos = graph.placeholder("vpos")
            self.inputs.append("vpos")
        self.rewrite.tables(1).add_site(1, SiteNodes(K, idx, idx, vpos))
        self.ctx = self.rewrite.at(1)

    def pruned(self, name, fact):
        """A new-graph input holding the kept tokens in `fact`'s layout."""
        self.inputs.append(name)
        return self.rewrite.state.mark(self.rewrite.builder.graph.placeholder(name), 1, fact)

    def dense(self, name):
        self.inputs.append(name)
        return self.rewrite.builder.graph.placeholder(name)

    def old(self, target, args, shape, fact, **meta):
        """A node of the source graph, with the facts the analysis recorded."""
        node = self.source.call_function(target, tuple(args))
        node.meta.update({"val": torch.empty(shape, device="meta"), TOKENS: fact, **meta})
        return node

    def emit(self, rule, old, args, kwargs=None):
        assert rule.matches(self.ctx, old, tuple(args)), f"{rule} does not match {old}"
        return rule.emit(self.ctx, old, tuple(args), kwargs or {})

    def run(self, out, **tensors):
        builder = self.rewrite.builder
        builder.graph.output(out)
        gm = builder.module()
        return gm(*[tensors[name] for name in self.inputs])


def kept_positions(seed=0, protected=()):
    """(B, K) sorted distinct positions per sample, always including `protected`."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        rest = rng.permutation([p for p in range(L) if p not in protected])[:K - len(protected)]
        rows.append(sorted(list(protected) + list(rest)))
    return torch.tensor(rows)


def test_the_rules_are_tried_in_the_documented_order():
    assert [type(r) for r in REWRITE_RULES] == [RemapReadout, DropConvSlice, PositionConv1d, ReorderTokens,
                                                RestoreBeforeMoving, NeighbourConv2d, ScanGaps, CopyNode]


# ------------------------------------------------------------------------------------ restore
def test_a_move_the_kept_tokens_cannot_follow_runs_on_the_restored_tensor():
    """x.roll(1, dims=1) of a pruned tensor: the kept tokens go back to their dense slots (zeros at
    pruned ones), the roll runs densely, and a reader gets the kept tokens in the rolled order."""
    h = Harness()
    rolled = Layout(np.roll(np.arange(L), 1))
    x_old = h.source.placeholder("x")
    x_old.meta[TOKENS] = Tok(1, IDENTITY)
    old = h.old(aten.roll.default, [x_old, [1], [1]], (B, L, D), Tok(1, rolled))
    x = h.pruned("x", Tok(1, IDENTITY))
    assert not ReorderTokens().matches(h.ctx, old, (x, [1], [1]))
    moved = h.emit(RestoreBeforeMoving(), old, [x, [1], [1]])
    assert h.ctx.state.of(moved) is None                      # dense: whoever reads it gathers
    kept = cut_to_site(h.ctx, old, moved, 1)
    idx, values = kept_positions(4), torch.randn(B, K, D)
    out, dense = h.run((kept, moved), idx=idx, x=values)
    for b in range(B):
        full = torch.zeros(L, D)
        full[idx[b]] = values[b]
        assert torch.equal(dense[b], full.roll(1, 0))
        order = np.argsort(rolled.rank[idx[b].numpy()], kind="stable")   # kept tokens along the rolled path
        assert torch.equal(out[b], values[b, order])


# ------------------------------------------------------------------------------------ permutation
@pytest.mark.parametrize("alignment", ["hold", "none"])
def test_reorder_puts_the_kept_tokens_in_the_original_path_order(alignment):
    h = Harness(alignment)
    perm = np.random.default_rng(1).permutation(L)
    target = IDENTITY.permuted(perm)
    old = h.old(aten.index.Tensor, [h.source.placeholder("x"), [None, None]], (B, L, D), Tok(1, target),
                **{PERMUTATION: perm})
    x = h.pruned("x", Tok(1, IDENTITY))
    idx, values, compact = kept_positions(), torch.randn(B, K, D), torch.arange(K).expand(B, K)
    out = h.run(h.emit(ReorderTokens(), old, [x, [None, None]]), idx=idx, x=values, vpos=compact)
    # the kept tokens (in slot order) read along `target`, at their original or compacted positions
    claimed = idx if alignment == "hold" else compact
    for b in range(B):
        order = np.argsort(target.rank[claimed[b].numpy()], kind="stable")
        assert torch.equal(out[b], values[b, order])


def test_reorder_does_not_match_a_dense_input():
    h = Harness()
    old = h.old(aten.index.Tensor, [h.source.placeholder("x"), [None, None]], (B, L, D), Tok(1, IDENTITY),
                **{PERMUTATION: np.arange(L)})
    assert not ReorderTokens().matches(h.ctx, old, (h.dense("x"), [None, None]))


# --------------------------------------------------------------------------------------- conv1d
def test_position_conv1d_sees_each_neighbour_at_its_original_offset():
    h = Harness("hold")
    C, W, left = 3, 4, 3
    weight, bias = torch.randn(C, 1, W), torch.randn(C)
    x_old, w_old, b_old = (h.source.placeholder(n) for n in ("x", "w", "b"))
    old = h.old(aten.conv1d.default, [x_old, w_old, b_old, [1], [left], [1], C], (B, C, L), Tok(2, IDENTITY),
                **{CONV_LEFT: left})
    x = h.pruned("x", Tok(2, IDENTITY))
    out_node = h.emit(PositionConv1d(), old, [x, h.dense("w"), h.dense("b"), [1], [left], [1], C])
    idx, values = kept_positions(3), torch.randn(B, C, K)
    out = h.run(out_node, idx=idx, x=values, w=weight, b=bias)
    for b in range(B):
        for k in range(K):
            expected = bias.clone()
            for j in range(K):
                tap = int(idx[b, j] - idx[b, k]) + left       # a pruned neighbour contributes nothing
                if 0 <= tap < W:
                    expected += weight[:, 0, tap] * values[b, :, j]
            torch.testing.assert_close(out[b, :, k], expected, rtol=1e-5, atol=1e-6)


def test_conv1d_without_a_recorded_window_is_not_position_aware():
    h = Harness()
    old = h.old(aten.conv1d.default, [h.source.placeholder("x")], (B, 3, L), Tok(2, IDENTITY))
    assert not PositionConv1d().matches(h.ctx, old, (h.pruned("x", Tok(2, IDENTITY)),))


def test_the_slice_after_a_padded_conv1d_is_dropped():
    h = Harness()
    old = h.old(aten.slice.Tensor, [h.source.placeholder("x"), 2, 0, L], (B, 3, L), Tok(2, IDENTITY),
                **{CONV_SLICE: "conv1d"})
    x = h.pruned("x", Tok(2, IDENTITY))
    assert h.emit(DropConvSlice(), old, [x, 2, 0, L]) is x


# --------------------------------------------------------------------------------------- conv2d
def test_a_neighbour_conv2d_runs_on_the_grid_scattered_back():
    h = Harness("hold")
    C, side = 3, 4
    weight = torch.randn(C, 1, 3, 3)
    grid = Grid(2, 3, IDENTITY, side, side)
    x_old, w_old = h.source.placeholder("x"), h.source.placeholder("w")
    w_old.meta["val"] = torch.empty(C, 1, 3, 3, device="meta")
    old = h.old(aten.conv2d.default, [x_old, w_old, None, [1, 1], [1, 1], [1, 1], C], (B, C, side, side), grid)
    x = h.pruned("x", grid)
    out_node = h.emit(NeighbourConv2d(), old, [x, h.dense("w"), None, [1, 1], [1, 1], [1, 1], C])
    idx, cells = kept_positions(4), torch.randn(B, C, K, 1)
    out = h.run(out_node, idx=idx, x=cells, w=weight)
    dense = torch.zeros(B, C, L)
    for b in range(B):
        dense[b, :, idx[b]] = cells[b, :, :, 0]
    expected = F.conv2d(dense.view(B, C, side, side), weight, None, 1, 1, 1, C).flatten(2)
    for b in range(B):
        torch.testing.assert_close(out[b, :, :, 0], expected[b, :, idx[b]])


def test_a_pointwise_conv2d_is_not_scattered():
    h = Harness()
    w_old = h.source.placeholder("w")
    w_old.meta["val"] = torch.empty(3, 3, 1, 1, device="meta")
    grid = Grid(2, 3, IDENTITY, 4, 4)
    old = h.old(aten.conv2d.default, [h.source.placeholder("x"), w_old], (B, 3, 4, 4), grid)
    assert not NeighbourConv2d().matches(h.ctx, old, (h.pruned("x", grid), h.dense("w")))


# ------------------------------------------------------------------------------------ scan gaps
def test_decay_gives_the_scan_the_path_gaps_between_kept_tokens():
    h = Harness("decay")
    names = ("u", "delta", "A", "B", "C")
    olds = [h.source.placeholder(n) for n in names]
    old = h.old(torch.ops.mambaprune.selective_scan.default, olds, (B, D, L), Tok(2, IDENTITY))
    args = [h.pruned("u", Tok(2, IDENTITY)), h.pruned("delta", Tok(2, IDENTITY)), h.dense("A"),
            h.pruned("B", Tok(2, IDENTITY)), h.pruned("C", Tok(2, IDENTITY))]
    g = torch.Generator().manual_seed(5)
    u, delta, A = torch.randn(B, D, K, generator=g), torch.rand(B, D, K, generator=g), -torch.rand(D, 3, generator=g)
    Bm, Cm = torch.randn(B, 3, K, generator=g), torch.randn(B, 3, K, generator=g)
    idx = kept_positions(6)
    out = h.run(h.emit(ScanGaps(), old, args), idx=idx, u=u, delta=delta, A=A, B=Bm, C=Cm)
    gaps = torch.cat([idx[:, :1] + 1, idx[:, 1:] - idx[:, :-1]], dim=1).float()
    torch.testing.assert_close(out, selective_scan(u, delta, A, Bm, Cm, gap=gaps))


def test_hold_leaves_the_scan_alone_and_decay_refuses_folded_directions():
    h = Harness("hold")
    scan = torch.ops.mambaprune.selective_scan.default
    old = h.old(scan, [h.source.placeholder("u")], (B, D, L), Tok(2, IDENTITY))
    assert not ScanGaps().matches(h.ctx, old, (h.pruned("u", Tok(2, IDENTITY)),))
    h = Harness("decay")
    folded = h.old(scan, [h.source.placeholder("u")], (B, D, L), MultiTok(2, 1, (IDENTITY, IDENTITY.reversed())))
    with pytest.raises(UnsupportedModelError, match="alignment='decay' is not possible"):
        h.emit(ScanGaps(), folded, [h.pruned("u", Tok(2, IDENTITY))])


# -------------------------------------------------------------------------------------- readout
def test_a_constant_index_read_follows_its_token():
    h = Harness("none")
    position = 5
    old = h.old(aten.select.int, [h.source.placeholder("x"), 1, position], (B, D), Readout("select", position))
    x = h.pruned("x", Tok(1, IDENTITY))
    idx, values = kept_positions(7, protected=(position,)), torch.randn(B, K, D)
    out = h.run(h.emit(RemapReadout(), old, [x, 1, position]), idx=idx, x=values, vpos=torch.arange(K).expand(B, K))
    for b in range(B):
        assert torch.equal(out[b], values[b, idx[b].tolist().index(position)])


def test_a_token_output_is_scattered_back_to_every_position():
    h = Harness()
    x = h.pruned("x", Tok(1, IDENTITY))
    idx, values = kept_positions(8), torch.randn(B, K, D)
    out = h.run(scattered(h.ctx, x, Tok(1, IDENTITY), h.ctx.tables.dense_index(1, IDENTITY)), idx=idx, x=values)
    expected = torch.zeros(B, L, D)
    for b in range(B):
        expected[b, idx[b]] = values[b]
    assert torch.equal(out, expected)


def test_nearest_fills_every_position_with_the_nearest_kept_token():
    h = Harness()
    x = h.pruned("x", Tok(1, IDENTITY))
    idx, values = kept_positions(9), torch.randn(B, K, D)
    out = h.run(nearest(h.ctx, x, Tok(1, IDENTITY), h.ctx.tables.dense_index(1, IDENTITY)), idx=idx, x=values)
    for b in range(B):
        kept = idx[b].tolist()
        for p in range(L):
            q = min(kept, key=lambda k: (abs(k - p), k))
            assert torch.equal(out[b, p], values[b, kept.index(q)])


# ------------------------------------------------------------------------------------------ copy
def test_copy_resizes_the_token_count_and_marks_the_result_pruned():
    h = Harness()
    old = h.old(aten.view.default, [h.source.placeholder("x"), [B, L, 2, 2]], (B, L, 2, 2), Tok(1, IDENTITY))
    x = h.pruned("x", Tok(1, IDENTITY))
    node = h.emit(CopyNode(), old, [x, [B, L, 2, 2]])
    assert node.args[1] == [B, K, 2, 2] and h.rewrite.state.of(node).site == 1
    out = h.run(node, idx=kept_positions(), x=torch.randn(B, K, D))
    assert out.shape == (B, K, 2, 2)
