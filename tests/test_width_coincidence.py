"""A width equal to the token count or to the grid side is not read as the token axis (ViM-like).

ViM on a 32 x 32 image with 4 x 4 patches has an 8 x 8 grid and 65 tokens (a class token in the
middle). With embed_dim 65 the patch tokens are (B, 64, 65) and the sequence (B, 65, 65): the token
axis is the one the flatten of the conv2d's grid made (seeds.grid_axis), not the width that happens
to match. With embed_dim 8 the conv2d map is (B, 8, 8, 8). Both must be analysed and pruned exactly
as with a width that matches nothing (24). VMamba-like coincidences: tests/test_official_vmamba.py.
"""
from __future__ import annotations

import pytest
import torch

from mambaprune.api.compile import build, prepare
from mambaprune.models.vim import VisionMamba
from mambaprune.settings import PruneSettings

RATIO = 0.3


def vim(embed_dim: int):
    torch.manual_seed(0)
    model = VisionMamba(img_size=32, patch_size=4, num_classes=10, embed_dim=embed_dim, depth=6).eval()
    return model, prepare(model, (torch.randn(2, 3, 32, 32),))


@pytest.fixture(scope="module")
def reference():
    return vim(24)[1]


def sites_of(prepared):
    return prepared.analysis.valid_sites


@pytest.mark.parametrize("embed_dim", [65, 8], ids=["width_is_the_token_count", "width_is_the_grid_side"])
def test_a_coinciding_width_is_analysed_and_pruned_as_any_other(embed_dim, reference):
    model, prepared = vim(embed_dim)
    analysis = prepared.analysis
    assert analysis.token_length == 65 and not analysis.not_understood
    assert analysis.valid_sites == sites_of(reference) and analysis.class_tokens == reference.analysis.class_tokens == {32}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (build(prepared, PruneSettings(ratio=0.0))(images) - model(images)).abs().max().item() <= 1e-5
    pruned = build(prepared, PruneSettings(ratio=RATIO))
    assert pruned.report.sites == build(reference, PruneSettings(ratio=RATIO)).report.sites
    assert abs(pruned.report.achieved_ratio - RATIO) <= 0.03
