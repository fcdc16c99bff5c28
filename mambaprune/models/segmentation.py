"""Semantic segmentation: a ViM or PlainMamba backbone read at several depths (`out_indices`) and a light decoder.

The backbone returns one (B, C, H, W) map of its token stream per index in `out_indices` (PlainMamba:
the last one through the final norm, as its dense-prediction backbone applies `ln1` to its last output;
ViM: every one through its final RMSNorm); ViM's class token is left out of the maps. The decoder is
SegFormer's all-MLP head in spirit: each map projected by a 1x1 conv, resized to the first map's size,
concatenated and fused by a 1x1 conv, classified per cell and upsampled (bilinear) to the input size. Token pruning acts inside the backbone;
the maps it feeds are restored to full size before the decoder (rewrite/restore.py).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model
from .plainmamba import PlainMamba, _plainmamba
from .vim import VisionMamba, _vim


class LightDecoder(nn.Module):
    """1x1 projections of every map, resized to the first map's size, fused, classified per cell, upsampled."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width * len(in_channels), width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: List[torch.Tensor], size) -> torch.Tensor:
        first = maps[0].shape[-2:]
        projected = [F.interpolate(p(m), size=first, mode="bilinear", align_corners=False) for p, m in zip(self.proj, maps)]
        logits = self.cls(self.fuse(torch.cat(projected, dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _to_map(tokens: torch.Tensor, grid) -> torch.Tensor:
    """(B, H*W, C) raster-order tokens -> (B, C, H, W)."""
    height, width = grid
    return tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1]).permute(0, 3, 1, 2)


class ViMSegmenter(nn.Module):
    """A ViM backbone (`backbone`, its head unused) whose stream hidden + residual is read after the blocks
    `out_indices`, each through the final norm `norm_f` (ViM's residual stream grows with depth: unnormalised,
    the maps differ in scale by orders of magnitude), class token dropped, and a LightDecoder."""

    def __init__(self, backbone: VisionMamba, out_indices: Sequence[int], num_classes: int = 11, decoder_width: int = 64):
        super().__init__()
        self.backbone, self.out_indices = backbone, tuple(out_indices)
        self.grid = backbone.patch_embed.grid_size
        self.decode_head = LightDecoder([backbone.embed_dim] * len(self.out_indices), num_classes, decoder_width)

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        v, m = self.backbone, self.backbone.token_position
        hidden, residual, maps = v.embed_tokens(x), None, []
        for i, layer in enumerate(v.layers):
            hidden, residual = layer(hidden, residual)
            if i in self.out_indices:
                stream = v.norm_f(hidden + residual)
                maps.append(_to_map(torch.cat((stream[:, :m], stream[:, m + 1:]), dim=1), self.grid))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.features(x), x.shape[-2:])


class PlainMambaSegmenter(nn.Module):
    """A PlainMamba backbone (its head unused) read after the layers `out_indices` (the last through
    `norm1`), and a LightDecoder."""

    def __init__(self, backbone: PlainMamba, out_indices: Sequence[int], num_classes: int = 11, decoder_width: int = 64):
        super().__init__()
        self.backbone, self.out_indices = backbone, tuple(out_indices)
        self.grid = backbone.patch_embed.grid_size
        self.decode_head = LightDecoder([backbone.embed_dim] * len(self.out_indices), num_classes, decoder_width)

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        b = self.backbone
        tokens, maps = b.patch_embed(x) + b.pos_embed, []
        for i, layer in enumerate(b.layers):
            tokens = layer(tokens)
            if i in self.out_indices:
                maps.append(_to_map(b.norm1(tokens) if i == self.out_indices[-1] else tokens, self.grid))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.features(x), x.shape[-2:])


def _split(overrides: dict, depth: int):
    out_indices = tuple(overrides.pop("out_indices", (2, 5, 8, depth - 1)))
    num_classes = overrides.pop("num_classes", 11)
    width = overrides.pop("decoder_width", 64)
    return out_indices, num_classes, width


@register_model
def vim_t_seg(**overrides) -> ViMSegmenter:
    """ViM-T (overrides as for vim_t) with `out_indices` (default: 2, 5, 8 and the last block),
    `num_classes` (11: ten digits and the background) and `decoder_width` (64)."""
    out_indices, num_classes, width = _split(overrides, overrides.get("depth", 24))
    return ViMSegmenter(_vim(192, num_classes=0, **overrides), out_indices, num_classes, width)


@register_model
def plainmamba_l1_seg(**overrides) -> PlainMambaSegmenter:
    """PlainMamba-L1 (overrides as for plainmamba_l1) with `out_indices`, `num_classes` and `decoder_width`."""
    out_indices, num_classes, width = _split(overrides, overrides.get("depth", 24))
    return PlainMambaSegmenter(_plainmamba("plainmamba_l1", num_classes=0, **overrides), out_indices, num_classes, width)
