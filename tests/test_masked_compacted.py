"""The second formulation of the `none` alignments (rewrite/masked_compacted.py): `hold` in each site's
compacted coordinates, checked against a direct implementation of what `none` means (the later blocks run
on the kept tokens as a sequence of their own) and used by the pruned-run check."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import architectures as arch  # noqa: E402

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.analysis import Grid, Layout, Tok  # noqa: E402
from mambaprune.analysis.facts import TokenMap  # noqa: E402
from mambaprune.models import create_model  # noqa: E402
from mambaprune.rewrite.masked_compacted import compacting_order, moved  # noqa: E402
from test_verify_pruned import check_of, images  # noqa: E402


def _vim():
    torch.manual_seed(0)
    return create_model("vim_t", img_size=64, depth=6, embed_dim=32, num_classes=10).eval()


def direct_none(model, x, kept: torch.Tensor, site: int) -> torch.Tensor:
    """A ViM under `none` with one site after block `site`, written out: blocks 1..site on every token, then
    the kept tokens (in the order the site keeps them) as a sequence of K tokens through the later blocks,
    the class token read where that sequence holds it."""
    hidden, residual = model.embed_tokens(x), None
    for layer in model.layers[:site]:
        hidden, residual = layer(hidden, residual)
    rows = torch.arange(x.shape[0])[:, None]
    hidden, residual = hidden[rows, kept], residual[rows, kept]
    for layer in model.layers[site:]:
        hidden, residual = layer(hidden, residual)
    slot = (kept == model.token_position).float().argmax(dim=1)
    return model.head(model.norm_f(residual + hidden)[torch.arange(x.shape[0]), slot])


@pytest.mark.parametrize("alignment", ["none", "none-unsorted"])
def test_none_is_the_later_blocks_run_on_the_kept_tokens_as_a_sequence(alignment):
    model, x = _vim(), images(64, batch=2)
    pruned = compile_pruned(model, 0.3, (x,), schedule={2: 0.6}, alignment=alignment)
    with torch.no_grad():
        kept = pruned.kept_positions(x)[2]
        want, got = direct_none(model, x, kept, 2), pruned(x)
    assert kept.shape == (2, 11)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    if alignment == "none-unsorted":      # the kept tokens really are out of order: the test sees the order
        assert not bool((kept[:, 1:] > kept[:, :-1]).all())
        resorted = direct_none(model, x, kept.sort(dim=1).values, 2)
        assert (resorted - want).abs().max() > 1e-4 * want.abs().max()


def test_compacted_coordinates_hold_the_kept_tokens_first_in_slot_order():
    kept = torch.tensor([[4, 1, 6], [0, 2, 3]])
    order = compacting_order(kept, 8)
    assert order.tolist() == [[4, 1, 6, 0, 2, 3, 5, 7], [0, 2, 3, 1, 4, 5, 6, 7]]
    value = torch.arange(8.).repeat(2, 1)[:, None, :]           # (B, 1, L): each token holds its position
    flipped = Tok(2, Layout(list(range(7, -1, -1))))
    compact = moved(flipped, value.flip(-1), None, order)
    assert compact.flip(-1)[:, 0, :3].tolist() == [[4., 1., 6.], [0., 2., 3.]]     # in slot order, first
    assert torch.equal(moved(flipped, compact, order, None), value.flip(-1))         # and back
    grid = Grid(1, 2, Layout.identity(8), 2, 4)
    cells = value.reshape(2, 2, 4)
    assert moved(grid, cells, None, order).flatten(1)[:, :3].tolist() == [[4., 1., 6.], [0., 2., 3.]]


@pytest.mark.parametrize("model, size", [(None, 64), ("vmamba", 32), ("hierarchical", 32)],
                         ids=["vim", "vmamba", "hierarchical"])
@pytest.mark.parametrize("alignment", ["none", "none-unsorted"])
def test_outputs_a_site_feeds_are_compared_under_none(model, size, alignment):
    model = {None: _vim, "vmamba": lambda: arch.VMambaStyle(depths=(2, 3)),
             "hierarchical": lambda: arch.HierarchicalVim(depths=(3, 3))}[model]()
    _, _, check = check_of(model, images(size, batch=2), alignment=alignment)
    assert [o.compared_with for o in check.outputs] == ["masked"], check.describe()
    assert check.outputs[0].difference <= check.outputs[0].tolerance


def test_a_rearrangement_of_every_token_runs_in_compacted_coordinates_a_cut_does_not():
    windows = np.arange(8).reshape(2, 2, 2).transpose(1, 0, 2)      # (2 windows, 2 rows, 2) of a 2x4 grid
    assert TokenMap(windows, np.zeros_like(windows), 8, "view").rearranges
    stacked = np.stack([np.arange(8), np.arange(8)[::-1]])            # two directions on a new axis
    assert TokenMap(stacked, np.zeros_like(stacked), 8, "stack").rearranges
    cut = np.delete(np.arange(8), 4)                                   # a class token at 4 cut out
    assert not TokenMap(cut, np.zeros_like(cut), 8, "slice").rearranges
    padded = np.append(np.arange(8), -1)                               # a slot that holds no token
    assert not TokenMap(padded, np.zeros_like(padded), 8, "cat").rearranges
