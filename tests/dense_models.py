"""Models that read per-token feature maps (detection / segmentation backbones), written as their authors'
code reads them: a ViM whose features are read after chosen blocks (the issue's example), PlainMamba with
several `out_indices` (its mmdet backbone), VMamba's detection backbone (`Backbone_VSSM`: one normalised map
per stage, read before the downsampling), and a light segmentation decoder over several maps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaprune import create_model
from tests.official_vmamba import vmamba as official_vmamba


class ViMFeatures(nn.Module):
    """The token features (hidden + residual) of a ViM after the blocks `out_indices`, and the final norm."""

    def __init__(self, vim: nn.Module, out_indices=(2, 11), as_dict: bool = False):
        super().__init__()
        self.v, self.out_indices, self.as_dict = vim, tuple(out_indices), as_dict

    def embed(self, x):
        h = self.v.patch_embed(x)
        m = h.shape[1] // 2
        return torch.cat([h[:, :m], self.v.cls_token.expand(h.shape[0], -1, -1), h[:, m:]], 1) + self.v.pos_embed

    def forward(self, x):
        h, res, feats = self.embed(x), None, []
        for i, layer in enumerate(self.v.layers):
            h, res = layer(h, res)
            if i in self.out_indices:
                feats.append(h + res)
        feats.append(self.v.norm_f(h + res))
        if self.as_dict:
            return {f"block{i}": f for i, f in zip(self.out_indices, feats)} | {"final": feats[-1]}
        return feats

    def stream_after(self, x, blocks: int):
        """hidden + residual after the first `blocks` blocks (the stream crossing a site there)."""
        h, res = self.embed(x), None
        for layer in list(self.v.layers)[:blocks]:
            h, res = layer(h, res)
        return h + res if res is not None else h


def vim_features(depth=12, **kwargs) -> ViMFeatures:
    torch.manual_seed(0)
    vim = create_model("vim_t", img_size=64, depth=depth, embed_dim=64, num_classes=10).eval()
    return ViMFeatures(vim, **kwargs).eval()


def plainmamba_backbone(num_layers=12, out_indices=(2, 5, 8, 11), img_size=32):
    """A tiny PlainMamba-L1-like dense-prediction backbone (import with the mamba_ssm stand-in installed:
    tests/mamba_ssm_stub.installed())."""
    import official_plainmamba

    class PlainMambaBackbone(official_plainmamba.PlainMamba):
        """PlainMamba as a dense-prediction backbone: the (B, C, H, W) maps after the layers `out_indices`
        (their backbone's outs, with ln1 after the last layer)."""

        def __init__(self, out_indices, **kwargs):
            super().__init__(**kwargs)
            self.out_indices = list(out_indices)

        def forward(self, x):
            return super().forward(x)[1]

        def stream_after(self, x, blocks: int):
            x, hw = self.patch_embed(x)
            x = x + self.pos_embed
            for layer in list(self.layers)[:blocks]:
                x = layer(x, hw_shape=hw)
            return x

    torch.manual_seed(0)
    return PlainMambaBackbone(
        out_indices=out_indices, img_size=img_size, patch_size=4, embed_dims=32, num_layers=num_layers,
        num_convs_patch_embed=1, layers_with_dwconv=[0],
        layer_cfgs={"use_rms_norm": False, "mamba_cfg": {"d_state": 4, "expand": 2, "conv_size": 7, "conv_bias": True,
                                                          "bias": True, "default_hw_shape": (img_size // 4,) * 2}}).eval()


class Backbone_VSSM(official_vmamba.VSSM):  # noqa: N801 (their name)
    """VMamba's detection backbone: after every stage's blocks, its map normalised by `outnorm{i}` and read
    (channels first) before the downsampling."""

    def __init__(self, out_indices=(0, 1, 2, 3), norm_layer="ln2d", **kwargs):
        super().__init__(norm_layer=norm_layer, **kwargs)
        self.out_indices = out_indices
        norm = dict(ln=nn.LayerNorm, ln2d=official_vmamba.LayerNorm2d)[norm_layer.lower()]
        for i in out_indices:
            self.add_module(f"outnorm{i}", norm(self.dims[i]))
        del self.classifier

    def forward(self, x):
        def layer_forward(layer, x):
            x = layer.blocks(x)
            return x, layer.downsample(x)

        x = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            o, x = layer_forward(layer, x)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(o)
                if not self.channel_first:
                    out = out.permute(0, 3, 1, 2)
                outs.append(out.contiguous())
        return outs


def vmamba_backbone(depths=(2, 2, 4, 2)) -> Backbone_VSSM:
    torch.manual_seed(0)
    config = official_vmamba._config(list(depths), 16, 0.0, 1, 1.0, False, "v05_noz", 4.0, "ln2d", "v3", "v2")
    return Backbone_VSSM(**config).eval()


class LightDecoder(nn.Module):
    """A light segmentation decoder (SegFormer's all-MLP head, in spirit): every map projected by a 1x1 conv,
    resized to the first map's size, fused by a 1x1 conv, classified per cell, upsampled to the image."""

    def __init__(self, in_channels: list, num_classes: int, width: int = 32):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Conv2d(width * len(in_channels), width, 1)
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats, size):
        first = feats[0].shape[-2:]
        maps = [F.interpolate(p(f), size=first, mode="bilinear", align_corners=False) for p, f in zip(self.proj, feats)]
        logits = self.cls(F.relu(self.fuse(torch.cat(maps, dim=1))))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, channels: list, num_classes: int = 11):
        super().__init__()
        self.backbone, self.decode_head = backbone, LightDecoder(channels, num_classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x), x.shape[-2:])


def mambavision_backbone(depths=(1, 3, 8, 4), img_size=224, dim=16, window_size=(8, 8, 14, 7), out_indices=(0, 1, 2, 3)):
    """MambaVision's detection / segmentation backbone (NVlabs' `MM_mamba_vision`), built on the installed
    `mambavision` package (import tests/mambavision_stubs.py and install it first): every level's map at
    its end, after window_reverse and before the downsampling, normalised by `outnorm{i}` (a channels-first
    LayerNorm), one (B, C, H, W) map per level. The default depths and windows are MambaVision-T's."""
    from mambavision.models import mamba_vision

    class MambaVisionBackbone(mamba_vision.MambaVision):
        def __init__(self, out_indices, **kwargs):
            super().__init__(**kwargs)
            self.out_indices = tuple(out_indices)
            self.dims = [kwargs["dim"] * 2 ** i for i in range(len(self.levels))]
            for i in self.out_indices:
                self.add_module(f"outnorm{i}", mamba_vision.LayerNorm2d(self.dims[i]))
            del self.norm, self.head

        @staticmethod
        def level_forward(level, x):
            """The level's own forward, but returning its map before the downsampling as well."""
            height, width = x.shape[-2:]
            if level.transformer_block:      # no padding: the test sizes divide by the windows
                assert height % level.window_size == 0 and width % level.window_size == 0
                x = mamba_vision.window_partition(x, level.window_size)
            for block in level.blocks:
                x = block(x)
            if level.transformer_block:
                x = mamba_vision.window_reverse(x, level.window_size, height, width)
            return x, (x if level.downsample is None else level.downsample(x))

        def forward(self, x):
            x = self.patch_embed(x)
            outs = []
            for i, level in enumerate(self.levels):
                out, x = self.level_forward(level, x)
                if i in self.out_indices:
                    outs.append(getattr(self, f"outnorm{i}")(out).contiguous())
            return outs

    torch.manual_seed(0)
    return MambaVisionBackbone(out_indices, dim=dim, in_dim=8, depths=list(depths), window_size=list(window_size),
                               mlp_ratio=4, num_heads=[2, 4, 8, 16], num_classes=10).eval()
