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
