"""The merges of the masked formulation (rewrite/masked_merge.py): ToMe's size-weighted mean, by hand, and
the pruned graph's merges agreeing with it on the models of the mutation tests (test_verify_mutations.py
builds them under merge-nearest and merge-similar and injects merge faults)."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from mambaprune.analysis import Grid, Layout, Tok  # noqa: E402
from mambaprune.rewrite.masked_merge import _average  # noqa: E402


def test_a_kept_token_becomes_the_size_weighted_mean_of_what_it_absorbs():
    x = torch.tensor([1., 2., 3., 4., 5.]).reshape(1, 5, 1).expand(1, 5, 2)      # (B, L, C)
    owner = torch.tensor([[0, 0, 3, 3, 3]])            # 1 -> 0; 2 and 4 -> 3
    weight = torch.tensor([[2., 1., 1., 3., 1.]])      # sizes before the site
    size = torch.zeros(1, 5).scatter_add(1, owner, weight)
    kept = torch.tensor([[True, False, False, True, False]])
    merged = _average(x, Tok(1, Layout.identity(5)), owner, weight, size, kept)
    assert torch.allclose(merged[0, :, 0], torch.tensor([(2 * 1 + 2) / 3, 2., 3., (3 * 4 + 3 + 5) / 5, 5.]))
    grid = _average(x[:, :4].reshape(1, 2, 2, 2).permute(0, 3, 1, 2), Grid(2, 3, Layout.identity(4), 2, 2),
                    owner[:, :4], weight[:, :4], torch.zeros(1, 4).scatter_add(1, owner[:, :4], weight[:, :4]),
                    kept[:, :4])
    assert torch.allclose(grid[0, 0].flatten(), torch.tensor([4 / 3, 2., 3., (12 + 3) / 4]))


def test_the_unmerge_gives_each_token_the_value_of_the_one_it_ended_in_in_any_layout():
    from mambaprune.rewrite.masked_merge import _take
    x = torch.arange(5.).reshape(1, 5, 1).expand(1, 5, 2)      # slot j holds the value j
    source = torch.tensor([[0, 0, 3, 3, 3]])                    # original position p ends in source[p]
    identity = _take(x, Tok(1, Layout.identity(5)), source)
    assert identity[0, :, 0].tolist() == [0., 0., 3., 3., 3.]
    flipped = Layout.identity(5).reversed()                     # slot j holds position 4 - j
    taken = _take(x, Tok(1, flipped), source)
    # slot j (position 4 - j) takes the slot of position source[4 - j], i.e. slot 4 - source[4 - j]
    assert taken[0, :, 0].tolist() == [4 - source[0, 4 - j].item() for j in range(5)]
    grid = x[:, :4].reshape(1, 2, 2, 2).permute(0, 3, 1, 2)     # (B, C, H, W), cell (r, c) holds 2r + c
    cells = _take(grid, Grid(2, 3, Layout.identity(4), 2, 2), torch.tensor([[0, 0, 3, 3]]))
    assert cells[0, 0].flatten().tolist() == [0., 0., 3., 3.]
