"""Restore: pruned tokens that leave the pruned region come back at full length.

Where: a graph output that carries tokens (a feature map read by a neck, a per-token output:
`restore_output`), and the stage's stream before the downsampling that ends a pruned stage
(stage_end.py). What a pruned position holds there is one setting, `settings.fill`, with one
meaning for both:
- "carry": the value the token had when it was pruned (the stream crossing the site where it was
  pruned: each token its own site's value), passed through the per-token ops that lead from the
  stream to the restored tensor (norms, projections, layout ops): SViT's x <- M * Block(x) + (1 - M) * x,
  a pruned token skips the blocks, not what follows them;
- "nearest": the value of the nearest kept token of the same tensor (cell distance on a grid,
  position distance on a token sequence): QuarterMap's restore;
- "zeros": 0.
Under reduction="merge-*", "carry" is ToMe's unmerge instead: a pruned position takes the value of the
kept token it was merged into (merge.py). With every token kept the restored tensor is the dense one,
whatever the fill. Where `carry` is
not defined (no per-token path from a stream to the tensor), an output falls back to `nearest` and
the report says so; a stage end refuses (its downsampling must see the stream).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..analysis import Grid, Tok
from ..meta_keys import module_of
from ..analysis.stream_chain import ancestors_where, stream_and_chain
from ..errors import UnsupportedModelError
from ..runtime import scatter_tokens
from ..runtime import token_index as ti
from ..runtime.token_ops import put_tokens
from ..settings import Fill
from .context import SiteContext
from .gather import summed_stream
from .merge import unmerged


@dataclass(frozen=True)
class Restoration:
    """One place where pruned tokens were restored, for the report."""

    what: str          # "output[1]", "output['c3']", "stage end before layers.1.downsample"
    site: int          # the last site whose tokens it held
    fill: str          # what the pruned positions hold
    note: str = ""     # why another fill than the one asked for

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.what}: {self.fill}{note}"


def restore_tensor(ctx: SiteContext, old: fx.Node) -> tuple:
    """(the dense new node for the pruned value of `old`, the fill used, a note): `old`'s tokens back at full
    length with `ctx.settings.fill` at pruned positions. `ctx` is at the site the value was pruned at."""
    value = ctx.env[old]
    state = ctx.state.of(value)
    fill, note = ctx.settings.fill, ""
    if fill is Fill.CARRY and ctx.settings.reduction.merges:
        return unmerged(ctx, value, state), "carry (unmerged)", ""
    if fill is Fill.CARRY:
        source = carry_source(ctx, old)
        if isinstance(source, tuple):
            return carried(ctx, *source), "carry", ""
        fill, note = Fill.NEAREST, f"carry is not defined here: {source}"
    index = ctx.tables.dense_index(state.site, state.fact.layout)
    if fill is Fill.ZEROS:
        return scattered(ctx, value, state.fact, index), "zeros", note
    return nearest(ctx, value, state.fact, index), "nearest", note


def scattered(ctx: SiteContext, value: fx.Node, fact, index: fx.Node) -> fx.Node:
    """The pruned `value` at full length, zeros at pruned positions."""
    if isinstance(fact, Grid):
        return ctx.call(ti.scatter_grid, value, index, fact.height, fact.width, fact.hdim, fact.wdim)
    return ctx.call(scatter_tokens, value, index, fact.layout.length, fact.dim)


def nearest(ctx: SiteContext, value: fx.Node, fact, index: fx.Node) -> fx.Node:
    """The pruned `value` at full length, each pruned position holding the nearest kept token's value."""
    coords = ctx.builder.constant("coords", slot_coordinates(fact))
    if isinstance(fact, Grid):
        return ctx.call(ti.nearest_grid, value, index, coords, fact.height, fact.width, fact.hdim, fact.wdim)
    return ctx.call(ti.nearest_tokens, value, index, coords, fact.dim)


def slot_coordinates(fact) -> torch.Tensor:
    """(L, c) float32 coordinates of the dense slots of `fact`'s layout: the original position on a token
    sequence, (row, column) of the original cell on a grid."""
    path = fact.layout.path
    if isinstance(fact, Grid):
        return torch.from_numpy(np.stack([path // fact.width, path % fact.width], axis=1).astype(np.float32))
    return torch.from_numpy(path.astype(np.float32)).unsqueeze(1)


def restore_outputs(rewrite, output: fx.Node, restorations: list):
    """The output node's argument with every pruned token tensor restored (`restore_tensor`); each one is
    recorded in `restorations` under its place in the model's output (pytree path)."""
    names = output_names(output)
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]

    def one(position: int, old):
        if not isinstance(old, fx.Node):
            return old
        state = rewrite.state.of(rewrite.env[old])
        if state is None:
            return rewrite.env[old]
        if state.fact is None or not isinstance(state.fact, (Tok, Grid)):
            raise UnsupportedModelError(f"the model output {names[position]} ({old.name}) holds pruned tokens in a "
                                        "form that cannot be restored (directions in different token orders)")
        node, fill, note = restore_tensor(rewrite.at(state.site), old)
        restorations.append(Restoration(names[position], state.site, fill, note))
        return node
    restored = [one(i, old) for i, old in enumerate(flat)]
    return type(output.args[0])(restored) if isinstance(output.args[0], (list, tuple)) else restored[0]


def emit_restored(ctx: SiteContext, old: fx.Node) -> fx.Node:
    """`old` (after the last token mixer: a neck's conv, an interpolation, ...) re-emitted densely, every
    pruned token tensor it reads restored first (once per tensor, recorded for the report)."""
    def dense(arg: fx.Node) -> fx.Node:
        state = ctx.state.of(ctx.env[arg])
        if state is None:
            return ctx.env[arg]

        def build():
            if not isinstance(state.fact, (Tok, Grid)):
                raise UnsupportedModelError(f"{old.name} reads {arg.name}, whose pruned tokens cannot be restored "
                                            f"({type(state.fact).__name__})")
            node, fill, note = restore_tensor(ctx.rewrite.at(state.site), arg)
            ctx.rewrite.restorations.append(Restoration(f"{module_of(old)}'s input {arg.name}", state.site, fill, note))
            return node
        return ctx.cached(("restored for dense", arg), build)
    return ctx.graph.node_copy(old, dense)


def output_names(output: fx.Node) -> list:
    """A name for each flat graph output: its path in the model's output (`output[1]`, `output['c3']`), from
    the graph's pytree output spec when it has one."""
    flat = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    spec = getattr(getattr(output.graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is not None and spec.num_leaves == len(flat):
        paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(flat))), spec))
        return ["output" + pytree.keystr(path) for path, _ in paths]
    return [f"output[{i}]" if len(flat) > 1 else "output" for i in range(len(flat))]


# ----------------------------------------------------------------------------------------------- carry
def carry_source(ctx: SiteContext, old: fx.Node):
    """(stream, chain) such that `old` is computed from the stream node by the per-token ops `chain` (old
    graph nodes in graph order, `old` last unless it is the stream itself), or a string saying why none is."""
    found = stream_and_chain(old, _pruned_ancestors(ctx, old), lambda n: _is_stream(ctx, n))
    if found is None:
        return f"{old.name} is not computed token by token from the token stream (a residual sum) of the pruned blocks"
    return found


def carried(ctx: SiteContext, stream: fx.Node, chain: list) -> fx.Node:
    """The chain re-emitted densely on the stream restored with every pruned token's value at its site."""
    dense = {stream: carried_stream(ctx, stream)}
    for node in chain:
        dense[node] = ctx.graph.node_copy(node, lambda a: dense[a] if a in dense else ctx.env[a])
    return dense[chain[-1] if chain else stream]


def carried_stream(ctx: SiteContext, stream: fx.Node) -> fx.Node:
    """The stream node `stream` (pruned) at full length: kept tokens as computed, every pruned token the value
    the stream had at the site where it was pruned."""
    state = ctx.state.of(ctx.env[stream])
    fact, tables = state.fact, ctx.tables
    first, *later = tables.sites_up_to(state.site)
    dense = crossing_stream(ctx, stream, first, 0)
    for key in later:
        dense = put(ctx, dense, crossing_stream(ctx, stream, key, tables.previous_site(key)), key, fact, previous=True)
    return put(ctx, dense, ctx.env[stream], state.site, fact)


def put(ctx: SiteContext, dense: fx.Node, pruned: fx.Node, site: int, fact, previous: bool = False) -> fx.Node:
    """`dense` with the tokens of `pruned` written at their places; `previous`: `pruned` holds the tokens kept
    at the site before `site` (the stream crossing `site`)."""
    tables = ctx.tables
    key = tables.previous_site(site) if previous else site
    index = tables.dense_index(key, fact.layout)
    if isinstance(fact, Grid):
        return ctx.call(ti.put_grid, dense, pruned, index, fact.hdim, fact.wdim)
    return ctx.call(put_tokens, dense, pruned, index, fact.dim)


def crossing_stream(ctx: SiteContext, like: fx.Node, key: int, at: int) -> fx.Node:
    """The stream crossing site `key` (the sum of the crossing tensors shaped like `like`: one for a stream
    updated inside the block, hidden + residual as in ViM), cut to the tokens kept at site `at` (0: dense)."""
    parts = ctx.analysis.stream_parts_like(like, key)
    if not parts:
        raise UnsupportedModelError(
            f"fill='carry' found no tensor like {like.name} crossing the site after block {key}. "
            "Use fill='nearest' or fill='zeros'.")
    return summed_stream(ctx, parts, at)


def _is_stream(ctx: SiteContext, node: fx.Node) -> bool:
    """A pruned residual sum shaped like the stream that crossed every site of its stage so far."""
    state = ctx.state.of(ctx.env.get(node))
    return state is not None and ctx.analysis.is_stream_sum(node, ctx.tables.sites_up_to(state.site))


def _pruned_ancestors(ctx: SiteContext, old: fx.Node) -> set:
    """`old` and its ancestors whose new value holds pruned tokens."""
    return ancestors_where(old, lambda node: ctx.state.of(ctx.env.get(node)) is not None)
