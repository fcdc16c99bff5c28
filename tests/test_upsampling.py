"""An upsampling ends a stage (analysis/tokens/movement.py: `_upsampled`): a U-Net decoder's stages are
stages of their own, with sites of their own.

VM-UNet's decoder (tests/official_zoo/vmunet.py) expands with einops (`b h w (p1 p2 c) -> b (h p1) (w p2) c`);
here the same network expands with `F.pixel_shuffle` instead, and with an expansion written one side at a
time (not read as an upsampling: its decoder stays dense, and the model stays right).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune import compile_pruned
from mambaprune.api.compile import prepare
from tests import official_zoo
from tests.official_zoo import checks


class ShuffleExpand2D(nn.Module):
    """PatchExpand2D's contract (B, H, W, 2 * dim) -> (B, 2H, 2W, dim) by a pixel shuffle."""

    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.expand = nn.Linear(2 * dim, 4 * dim, bias=False)
        self.norm = norm_layer(dim)

    def forward(self, x):
        x = F.pixel_shuffle(self.expand(x).permute(0, 3, 1, 2), 2)
        return self.norm(x.permute(0, 2, 3, 1))


class SideBySideExpand2D(ShuffleExpand2D):
    """The same result as an einops expansion, but written one side at a time (two reshapes)."""

    def forward(self, x):
        B, H, W, _ = x.shape
        x = self.expand(x).view(B, H, W, 2, 2, -1)
        x = x.permute(0, 1, 2, 4, 3, 5).reshape(B, H, W * 2, 2, -1)       # widen first
        x = x.permute(0, 1, 3, 2, 4).reshape(B, H * 2, W * 2, -1)         # then heighten
        return self.norm(x)


def unet(expand_cls):
    with official_zoo.installed():
        family = official_zoo.family("vmunet")
        original = family.PatchExpand2D
        family.PatchExpand2D = expand_cls
        try:
            torch.manual_seed(0)
            return family.tiny().eval()
        finally:
            family.PatchExpand2D = original


def test_a_pixel_shuffle_decoder_has_stages_and_sites_of_its_own():
    model, x = unet(ShuffleExpand2D), checks.images(3, 32)
    with official_zoo.installed():
        analysis = prepare(model, (x[:1],)).analysis
        assert {9, 11} <= set(analysis.valid_sites)
        out = checks.run("VM-UNet with a pixel shuffle", model, model.img_size, ratio=0.2)
        pruned = compile_pruned(model, schedule={3: 0.5, 9: 0.5, 11: 0.5}, example_inputs=(x[:1],))  # verified
    assert checks.green(out), out
    assert pruned.report.sites == {3: 8, 9: 8, 11: 32}
    with torch.no_grad():
        together, alone = pruned(x), torch.cat([pruned(x[i:i + 1]) for i in range(len(x))])
    assert (together - alone).abs().max() <= checks.TOL and (together - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("expand_cls", [SideBySideExpand2D])
def test_an_expansion_one_side_at_a_time_leaves_the_decoder_dense_and_the_model_right(expand_cls):
    model, x = unet(expand_cls), checks.images(3, 32)
    with official_zoo.installed():
        analysis = prepare(model, (x[:1],)).analysis
        assert not {9, 11} & set(analysis.valid_sites)
        out = checks.run("VM-UNet expanding one side at a time", model, model.img_size, ratio=0.15)
    assert checks.green(out), out
