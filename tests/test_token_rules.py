"""The token rules one by one, on hand-built graphs: positive and negative cases, and the registry.

Each test builds a few fx nodes whose inputs carry given token facts (meta_keys.TOKENS) and shapes
(meta["val"] on the meta device), runs the rule the registry finds for the node, and checks the
fact it returns, the refusal it raises on purpose, or the side effect it records.
"""
import operator

import numpy as np
import pytest
import torch
import torch.fx as fx

from mambaprune.analysis import (BatchTok, Grid, Layout, MultiTok, NotUnderstood, PaddedTok, Readout, Tok, TokenMap,
                                 Unknown, multi)
from mambaprune.analysis.tokens import TokenRuleError, propagate_tokens, rule_for, token_rule
from mambaprune.analysis.tokens.context import RuleContext
from mambaprune.analysis.tokens.propagate import infer
from mambaprune.meta_keys import CONV_LEFT, CONV_SLICE, PERMUTATION, TOKENS

aten = torch.ops.aten
L = 16
IDENTITY = Layout.identity(L)
FLIP = IDENTITY.reversed()


class Builder:
    """A graph of nodes with shapes and facts, and the RuleContext of its module."""

    def __init__(self):
        self.graph = fx.Graph()
        self.root = torch.nn.Module()

    def input(self, shape, fact=None, name="x"):
        node = self.graph.placeholder(name)
        return self._meta(node, shape, fact)

    def op(self, target, args, shape, fact=None, kwargs=None):
        node = self.graph.call_function(target, tuple(args), kwargs or {})
        return self._meta(node, shape, fact)

    def constant(self, name, value):
        self.root.register_buffer(name, value)
        node = self.graph.get_attr(name)
        return self._meta(node, tuple(value.shape), None)

    @staticmethod
    def _meta(node, shape, fact):
        node.meta["val"] = torch.empty(shape, device="meta") if shape is not None else None
        node.meta[TOKENS] = fact
        return node

    def context(self):
        return RuleContext(fx.GraphModule(self.root, self.graph), {L})


def run(b: Builder, node):
    """The fact the registry's rule gives `node` (NotUnderstood propagates)."""
    return rule_for(node)(node, b.context())


# ------------------------------------------------------------------------------- elementwise family
def test_identity_ops_keep_the_fact():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, FLIP))
    assert run(b, b.op(aten.clone.default, [x], (2, L, 8))) == Tok(1, FLIP)


def test_tuple_items_take_their_own_fact():
    b = Builder()
    x = b.input((2, L, 8), (Tok(1, IDENTITY), Tok(1, FLIP)))
    assert run(b, b.op(operator.getitem, [x, 1], (2, L, 8))) == Tok(1, FLIP)


def test_pointwise_broadcasts_and_requires_one_order():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    bias = b.input((8,), None, "bias")
    assert run(b, b.op(aten.add.Tensor, [x, bias], (2, L, 8))) == Tok(1, IDENTITY)
    row = b.input((L, 8), Tok(0, IDENTITY), "row")      # (L, D) broadcast over the batch: shifted by one
    assert run(b, b.op(aten.mul.Tensor, [x, row], (2, L, 8))) == Tok(1, IDENTITY)
    flipped = b.input((2, L, 8), Tok(1, FLIP), "y")
    with pytest.raises(NotUnderstood, match="different orders"):
        run(b, b.op(aten.add.Tensor, [x, flipped], (2, L, 8)))


def test_pointwise_with_a_readout_is_not_understood():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    pooled = b.input((2, 1, 8), Readout("pool"), "p")
    with pytest.raises(NotUnderstood, match="mixes a token tensor with Readout"):
        run(b, b.op(aten.sub.Tensor, [x, pooled], (2, L, 8)))


def test_elementwise_max_is_pointwise_and_the_reduction_is_a_readout():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    y = b.input((2, L, 8), Tok(1, IDENTITY), "y")
    assert run(b, b.op(aten.max.other, [x, y], (2, L, 8))) == Tok(1, IDENTITY)
    assert run(b, b.op(aten.max.dim, [x, 1], (2, 8))) == Readout("pool")


# ------------------------------------------------------------------------------------ views family
def test_view_follows_the_token_axis_alone():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, FLIP))
    assert run(b, b.op(aten.view.default, [x, [2, L, 2, 4]], (2, L, 2, 4))) == Tok(1, FLIP)
    merged = b.op(aten.view.default, [x, [2, L * 8]], (2, L * 8))
    assert refused_when_used(b, merged, (2, L * 8), "aten::view")
    back = b.op(aten.view.default, [merged, [2, L, 8]], (2, L, 8))
    assert run(b, back) == Tok(1, FLIP)          # a composition of moves needs no rule of its own


def refused_when_used(b: Builder, node, shape, op: str) -> bool:
    """`node` spreads the tokens (TokenMap); a compute op other than a pointwise one on it is refused,
    naming `op`."""
    node.meta[TOKENS] = run(b, node)
    assert isinstance(node.meta[TOKENS], TokenMap), node.meta[TOKENS]
    fact = infer(b.op(aten.softmax.int, [node, -1], shape), b.context())
    return isinstance(fact, Unknown) and op in fact.reason and node.name in fact.reason


def test_compositions_of_moves_need_no_rule_of_their_own():
    """Data movement is run on position tensors: a windowed scan order written as view + permute +
    reshape is the window order; a roll, a stack before the batch are what they do to the positions."""
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))     # a 4 x 4 grid of tokens, row-major
    windows = b.op(aten.view.default, [x, [2, 2, 2, 2, 2, 8]], (2, 2, 2, 2, 2, 8))
    windows.meta[TOKENS] = run(b, windows)
    assert isinstance(windows.meta[TOKENS], TokenMap)
    moved = b.op(aten.permute.default, [windows, [0, 1, 3, 2, 4, 5]], (2, 2, 2, 2, 2, 8))
    moved.meta[TOKENS] = run(b, moved)
    order = run(b, b.op(aten.reshape.default, [moved, [2, L, 8]], (2, L, 8)))
    assert order == Tok(1, Layout([0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]))
    assert run(b, b.op(aten.roll.default, [x, [1], [1]], (2, L, 8))) == Tok(1, Layout(np.roll(np.arange(L), 1)))
    assert run(b, b.op(aten.stack.default, [[x, x]], (2, 2, L, 8))) == Tok(2, IDENTITY)
    tokens_first = b.op(aten.permute.default, [x, [1, 0, 2]], (L, 2, 8))
    tokens_first.meta[TOKENS] = run(b, tokens_first)
    assert tokens_first.meta[TOKENS] == Tok(0, IDENTITY)
    # a window partition that folds the windows into the batch mixes samples with tokens: refused
    halves = b.op(aten.view.default, [x, [2, 2, 8, 8]], (2, 2, 8, 8))
    windows_first = b.op(aten.permute.default, [halves, [1, 0, 2, 3]], (2, 2, 8, 8))
    partition = b.op(aten.reshape.default, [windows_first, [4, 8, 8]], (4, 8, 8))
    fixed_batch = RuleContext(fx.GraphModule(b.root, b.graph), {L}, batch=2)
    for node in (halves, windows_first):
        node.meta[TOKENS] = rule_for(node)(node, fixed_batch)
    with pytest.raises(NotUnderstood, match="merging windows"):
        rule_for(partition)(partition, fixed_batch)


def test_view_to_a_grid_and_back():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    grid = run(b, b.op(aten.view.default, [x, [2, 8, 4, 4]], (2, 8, 4, 4)))
    assert grid == Grid(2, 3, IDENTITY, 4, 4)
    g = b.input((2, 8, 4, 4), grid, "g")
    assert run(b, b.op(aten.view.default, [g, [2, 8, L]], (2, 8, L))) == Tok(2, IDENTITY)
    transposed = b.input((2, 8, 4, 4), Grid(3, 2, IDENTITY, 4, 4), "t")    # dims swapped: column-major read
    out = run(b, b.op(aten.reshape.default, [transposed, [2, 8, L]], (2, 8, L)))
    assert out == Tok(2, IDENTITY.grid_transposed(4, 4))


def test_permute_and_transpose_move_the_token_dim():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    assert run(b, b.op(aten.permute.default, [x, [0, 2, 1]], (2, 8, L))) == Tok(2, IDENTITY)
    assert run(b, b.op(aten.transpose.int, [x, 1, 2], (2, 8, L))) == Tok(2, IDENTITY)
    m = b.input((2, 4, 8, L), MultiTok(3, 1, (IDENTITY, FLIP)), "m")
    assert run(b, b.op(aten.permute.default, [m, [0, 3, 1, 2]], (2, L, 4, 8))) == MultiTok(1, 2, (IDENTITY, FLIP))


def test_expand_of_size_one_dims_keeps_the_axis():
    b = Builder()
    x = b.input((1, L, 8), Tok(1, IDENTITY))
    assert run(b, b.op(aten.expand.default, [x, [3, 2, L, 8]], (3, 2, L, 8))) == Tok(2, IDENTITY)


# ------------------------------------------------------------------------------- reductions family
def test_a_reduction_over_the_tokens_is_a_readout_other_dims_drop():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    assert run(b, b.op(aten.mean.dim, [x, [1]], (2, 8))) == Readout("pool")
    assert run(b, b.op(aten.sum.dim_IntList, [x, [2]], (2, L))) == Tok(1, IDENTITY)
    assert run(b, b.op(aten.sum.dim_IntList, [x, [2], True], (2, L, 1))) == Tok(1, IDENTITY)
    with pytest.raises(NotUnderstood, match="over the token axis"):
        run(b, b.op(aten.std.correction, [x, [1]], (2, 8)))


def test_norms_and_softmax_stay_off_the_token_axis():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    with pytest.raises(NotUnderstood, match="normalises over the token axis"):
        run(b, b.op(aten.layer_norm.default, [x, [L]], (2, 8, L)))
    assert run(b, b.op(aten.softmax.int, [x, 1], (2, 8, L))) == Tok(2, IDENTITY)
    with pytest.raises(NotUnderstood, match="softmax over the token axis"):
        run(b, b.op(aten.softmax.int, [x, -1], (2, 8, L)))
    y = b.input((2, L, 8), Tok(1, IDENTITY), "y")
    assert run(b, b.op(aten.layer_norm.default, [y, [8]], (2, L, 8))) == Tok(1, IDENTITY)
    with pytest.raises(NotUnderstood, match="over the token axis as channels"):
        run(b, b.op(aten.batch_norm.default, [y, None, None, None, None, False, 0.1, 1e-5, True], (2, L, 8)))


# ----------------------------------------------------------------------------- contractions family
def test_linear_contracts_channels_only():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    w = b.input((4, 8), None, "w")
    assert run(b, b.op(aten.linear.default, [x, w], (2, L, 4))) == Tok(1, IDENTITY)
    t = b.input((2, 8, L), Tok(2, IDENTITY), "t")
    w2 = b.input((4, L), None, "w2")
    with pytest.raises(NotUnderstood, match="mixes the token axis"):
        run(b, b.op(aten.linear.default, [t, w2], (2, 8, 4)))


def test_weight_matmul_of_a_token_tensor_keeps_the_tokens_last():
    b = Builder()
    w = b.input((16, 8), None, "w")
    x = b.input((8, 2 * L), BatchTok(1, IDENTITY))
    assert run(b, b.op(aten.matmul.default, [w, x], (16, 2 * L))) == BatchTok(1, IDENTITY)
    q = b.input((2, L, 8), Tok(1, IDENTITY), "q")
    k = b.input((2, 8, L), Tok(2, IDENTITY), "k")
    with pytest.raises(NotUnderstood, match="contracts or mixes"):
        run(b, b.op(aten.matmul.default, [q, k], (2, L, L)))


def test_einsum_passes_the_token_and_direction_letters():
    b = Builder()
    x = b.input((2, 4, 8, L), MultiTok(3, 1, (IDENTITY, FLIP, IDENTITY, FLIP)))
    w = b.input((4, 6, 8), None, "w")
    out = run(b, b.op(aten.einsum.default, ["bkdl,kcd->bkcl", [x, w]], (2, 4, 6, L)))
    assert out == MultiTok(3, 1, (IDENTITY, FLIP, IDENTITY, FLIP))
    with pytest.raises(NotUnderstood, match="sums over directions"):
        run(b, b.op(aten.einsum.default, ["bkdl,kcd->bcl", [x, w]], (2, 6, L)))


# ----------------------------------------------------------------------------- convolutions family
def test_depthwise_conv1d_padded_then_sliced_back_records_its_left_padding():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    w = b.input((8, 1, 4), None, "w")
    conv = b.op(aten.conv1d.default, [x, w, None, [1], [3], [1], 8], (2, 8, L + 3))
    ctx = b.context()
    padded = rule_for(conv)(conv, ctx)
    assert padded == PaddedTok(2, IDENTITY, 3, conv.name)
    conv.meta[TOKENS] = padded
    sliced = b.op(aten.slice.Tensor, [conv, 2, 0, L], (2, 8, L))
    assert rule_for(sliced)(sliced, ctx) == Tok(2, IDENTITY)
    assert conv.meta[CONV_LEFT] == 3 and sliced.meta[CONV_SLICE] == conv.name


def test_conv1d_that_is_not_depthwise_is_refused():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    w = b.input((8, 8, 3), None, "w")
    with pytest.raises(NotUnderstood, match="not depthwise"):
        run(b, b.op(aten.conv1d.default, [x, w, None, [1], [1], [1], 1], (2, 8, L)))


def test_a_strided_conv2d_that_changes_the_grid_is_a_barrier():
    b = Builder()
    x = b.input((2, 8, 4, 4), Grid(2, 3, IDENTITY, 4, 4))
    w = b.input((8, 8, 2, 2), None, "w")
    down = b.op(aten.conv2d.default, [x, w, None, [2, 2]], (2, 8, 2, 2))
    ctx = b.context()
    assert rule_for(down)(down, ctx) is None and ctx.barriers == [down]
    w3 = b.input((8, 1, 3, 3), None, "w3")
    same = b.op(aten.conv2d.default, [x, w3, None, [1, 1], [1, 1], [1, 1], 8], (2, 8, 4, 4))
    assert rule_for(same)(same, ctx) == Grid(2, 3, IDENTITY, 4, 4)


def test_an_unfold_whose_blocks_tile_the_grid_is_a_barrier():
    """mmpretrain's PatchMerging: nn.Unfold(2, stride=2) of the (B, C, H, W) grid is a downsampling."""
    b = Builder()
    x = b.input((2, 8, 4, 4), Grid(2, 3, IDENTITY, 4, 4))
    down = b.op(aten.im2col.default, [x, [2, 2], [1, 1], [0, 0], [2, 2]], (2, 32, 4))
    ctx = b.context()
    assert rule_for(down)(down, ctx) is None and ctx.barriers == [down]


def test_an_unfold_that_keeps_every_cell_or_reads_no_grid_is_refused():
    b = Builder()
    x = b.input((2, 8, 4, 4), Grid(2, 3, IDENTITY, 4, 4))
    with pytest.raises(NotUnderstood, match="keeps every cell of the token grid"):
        run(b, b.op(aten.im2col.default, [x, [3, 3], [1, 1], [1, 1], [1, 1]], (2, 72, L)))
    rows = b.input((2, 8, 4, 4), Grid(1, 2, IDENTITY, 4, 4), "rows")
    with pytest.raises(NotUnderstood, match="other than the \\(B, C, H, W\\) token grid"):
        run(b, b.op(aten.im2col.default, [rows, [2, 2], [1, 1], [0, 0], [2, 2]], (2, 32, 4)))


# --------------------------------------------------------------------------------- indexing family
def test_select_of_a_token_is_a_protected_readout():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, FLIP))
    node = b.op(aten.select.int, [x, 1, 0], (2, 8))
    ctx = b.context()
    assert rule_for(node)(node, ctx) == Readout("select", L - 1)   # slot 0 of the flipped layout
    assert ctx.protected == {L - 1}


def test_a_constant_permutation_is_a_layout_and_anything_else_is_refused():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    perm = np.random.default_rng(0).permutation(L)
    index = b.constant("perm", torch.from_numpy(perm))
    node = b.op(aten.index.Tensor, [x, [None, index]], (2, L, 8))
    fact = run(b, node)
    assert fact == Tok(1, IDENTITY.permuted(perm)) and np.array_equal(node.meta[PERMUTATION], perm)
    first_half = b.constant("first_half", torch.arange(L // 2))
    assert refused_when_used(b, b.op(aten.index.Tensor, [x, [None, first_half]], (2, L // 2, 8)), (2, L // 2, 8),
                             "aten::index")
    live = b.input((L,), None, "live")        # an index computed at run time
    with pytest.raises(NotUnderstood, match="computed at run time"):
        run(b, b.op(aten.index_select.default, [x, 1, live], (2, L, 8)))


def test_flip_reverses_the_layout_and_parts():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    assert run(b, b.op(aten.flip.default, [x, [-1]], (2, 8, L))) == Tok(2, FLIP)
    m = b.input((2, 2, 8, L), MultiTok(3, 1, (IDENTITY, IDENTITY.grid_transposed(4, 4))), "m")
    out = run(b, b.op(aten.flip.default, [m, [-1]], (2, 2, 8, L)))
    assert out == MultiTok(3, 1, (FLIP, IDENTITY.grid_transposed(4, 4).reversed()))


def test_slicing_part_of_the_token_axis_is_refused():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    assert refused_when_used(b, b.op(aten.slice.Tensor, [x, 1, 1, L], (2, L - 1, 8)), (2, L - 1, 8), "aten::slice")
    assert run(b, b.op(aten.slice.Tensor, [x, 2, 0, 4], (2, L, 4))) == Tok(1, IDENTITY)


# ------------------------------------------------------------------------------- combining family
def test_cat_of_token_tensors_in_different_orders_folds_them_into_parts():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    y = b.input((2, 8, L), Tok(2, FLIP), "y")
    assert run(b, b.op(aten.cat.default, [[x, y], 1], (2, 16, L))) == MultiTok(2, 1, (IDENTITY, FLIP))
    assert run(b, b.op(aten.cat.default, [[x, x], 1], (2, 16, L))) == Tok(2, IDENTITY)
    along_tokens = b.op(aten.cat.default, [[x, y], 2], (2, 8, 2 * L))
    assert refused_when_used(b, along_tokens, (2, 8, 2 * L), "aten::cat")
    # directions side by side on the token axis, then viewed with a direction axis: folded parts
    parts = b.op(aten.view.default, [along_tokens, [2, 8, 2, L]], (2, 8, 2, L))
    assert run(b, parts) == MultiTok(3, 2, (IDENTITY, FLIP))


def test_stack_and_split_of_directions():
    b = Builder()
    x = b.input((2, 8, L), Tok(2, IDENTITY))
    y = b.input((2, 8, L), Tok(2, FLIP), "y")
    stacked = run(b, b.op(aten.stack.default, [[x, y], 1], (2, 2, 8, L)))
    assert stacked == MultiTok(3, 1, (IDENTITY, FLIP))
    m = b.input((2, 16, L), MultiTok(2, 1, (IDENTITY, FLIP)), "m")
    split = b.op(aten.split.Tensor, [m, 8, 1], None)
    split.meta["val"] = [torch.empty(2, 8, L, device="meta")] * 2
    assert run(b, split) == (Tok(2, IDENTITY), Tok(2, FLIP))
    odd = b.op(aten.split_with_sizes.default, [m, [4, 12], 1], None)
    odd.meta["val"] = [torch.empty(2, 4, L, device="meta"), torch.empty(2, 12, L, device="meta")]
    with pytest.raises(NotUnderstood, match="cuts through a direction"):
        run(b, odd)


# ------------------------------------------------------------------------------------ scans family
def test_scan_inputs_in_one_order_or_grouped_orders():
    b = Builder()
    u = b.input((2, 8, L), Tok(2, FLIP), "u")
    d = b.input((2, 8, L), Tok(2, FLIP), "d")
    A = b.input((8, 4), None, "A")
    B = b.input((2, 4, L), Tok(2, FLIP), "B")
    scan = torch.ops.mambaprune.selective_scan.default
    assert run(b, b.op(scan, [u, d, A, B, B], (2, 8, L))) == Tok(2, FLIP)
    # operands in different orders (PlainMamba: u along a path, B / C in raster order): a zip, in u's order
    B_other = b.input((2, 4, L), Tok(2, IDENTITY), "B2")
    assert run(b, b.op(scan, [u, d, A, B_other, B_other], (2, 8, L))) == Tok(2, FLIP)
    ug = b.input((2, 8, L), MultiTok(2, 1, (IDENTITY, FLIP)), "ug")
    Bg = b.input((2, 2, 4, L), MultiTok(3, 1, (IDENTITY, FLIP)), "Bg")
    assert run(b, b.op(scan, [ug, ug, A, Bg, Bg], (2, 8, L))) == multi(2, 1, (IDENTITY, FLIP))
    # grouped operands whose groups disagree with another operand's order: refused
    with pytest.raises(NotUnderstood, match="different token orders"):
        run(b, b.op(scan, [ug, ug, A, B_other, B_other], (2, 8, L)))


# --------------------------------------------------------------------------------- registry, driver
def test_lookup_order_exact_overload_then_packet_then_pointwise_then_nothing():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    assert rule_for(b.op(aten.view.default, [x, [2, L, 8]], (2, L, 8))).__name__ == "movement"
    assert rule_for(b.op(aten.sigmoid.default, [x], (2, L, 8))).__name__ == "pointwise"
    assert rule_for(b.op(aten.cumsum.default, [x, 1], (2, L, 8))) is None


def test_registering_a_target_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        token_rule(aten.view)(lambda node, ctx: None)


def test_only_a_deliberate_refusal_becomes_unknown_and_a_bug_is_raised():
    b = Builder()
    x = b.input((2, L, 8), Tok(1, IDENTITY))
    refused = b.op(aten.cumsum.default, [x, 1], (2, L, 8))
    assert infer(refused, b.context()) == Unknown("aten::cumsum on the token axis is not a rewrite the compiler knows")
    broken = b.op(aten.permute.default, [x, [0, 2, 5]], (2, 8, L))   # a dim that does not exist
    with pytest.raises(TokenRuleError, match="bug in mambaprune"):
        infer(broken, b.context())


def test_propagation_seeds_a_batch_first_token_tensor_and_follows_it():
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return (x.transpose(1, 2) * 2).flip(-1)

    program = torch.export.export(Tiny(), (torch.randn(2, L, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    gm = program.module()
    propagate_tokens(gm, {L})
    facts = {n.name: n.meta[TOKENS] for n in gm.graph.nodes if n.op == "call_function"}
    assert list(facts.values())[-1] == Tok(2, FLIP)
    assert Tok(2, IDENTITY) in facts.values()
